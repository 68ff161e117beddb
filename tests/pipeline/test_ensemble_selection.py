"""The method's steps moved out of the assets: ensembles and recipe choice, the DAKL sweep, curriculum
alignment; each checked on small numpy inputs, and against the code the assets ran before, number for number."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.ensemble.dakl import DAKLRegressor
from pipeline.ensemble.ensemble import BEST, DAKL_INPUT, build_ensembles, combine, ensemble_column
from pipeline.ensemble.selection import best_recipes, select_dakl, sweep_dakl
from pipeline.metrics import normalise_rows, row_cosines
from pipeline.training.curriculum import align_buckets, aligned_stages, curriculum_stages

BACKBONES = ["vit", "swin", "clip", "unet"]
RECIPES = ["baseline", "mlc", "mlc_cl"]


def _unit(rng, n, d=8):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _models(rng, n=30, d=8, missing=()):
    """Predictions that are noisy copies of the targets, noisier for some models, so val picks a recipe."""
    targets = _unit(rng, n, d)
    per_model = {}
    for i, b in enumerate(BACKBONES):
        for j, r in enumerate(RECIPES):
            if (b, r) not in missing:
                noise = 0.3 + 0.4 * ((i + 2 * j) % 3)
                per_model[(b, r)] = (targets + noise * rng.normal(size=targets.shape)).astype(np.float32)
    val_mask = np.zeros(n, dtype=bool)
    val_mask[::3] = True
    return per_model, val_mask, targets


def _old_ensemble_asset(per_model, val_mask, val_targets):
    """assets/evaluation.py's ensemble_predictions before the move into pipeline/, verbatim but for I/O and
    the recipe choice: that loop moved unchanged into best_recipes, which the known-answer tests below check."""
    best_recipe = best_recipes(per_model, val_mask, val_targets, BACKBONES, RECIPES)
    columns, metadata = {}, {}
    groups = {r: [per_model[(b, r)] for b in BACKBONES if (b, r) in per_model] for r in RECIPES}
    groups["best"] = [per_model[(b, r)] for b, r in best_recipe.items()]
    for group, members in groups.items():
        if not members:
            continue
        stack = np.stack(members)
        for method in ("median", "mean"):
            combined = normalise_rows(np.median(stack, axis=0) if method == "median" else stack.mean(axis=0))
            name = f"{method}_{group}"
            columns[name] = combined
            metadata[f"val_cosine_{name}"] = float(row_cosines(combined[val_mask], val_targets).mean())
    return best_recipe, columns, metadata


def test_combine_is_the_normalised_median_or_mean():
    rng = np.random.default_rng(0)
    members = [rng.normal(size=(5, 4)) for _ in range(3)]
    assert np.allclose(combine(members, "median"), normalise_rows(np.median(np.stack(members), axis=0)))
    assert np.allclose(combine(members, "mean"), normalise_rows(np.mean(np.stack(members), axis=0)))
    assert np.allclose(np.linalg.norm(combine(members), axis=1), 1.0)
    with pytest.raises(ValueError, match="not one of"):
        combine(members, "max")
    with pytest.raises(ValueError, match="one or more"):
        combine([])


def test_combine_matches_what_predict_computed_before():
    """predict's old inline ensemble: the median of several members, the member itself when alone."""
    rng = np.random.default_rng(1)
    outputs = [rng.normal(size=(6, 8)).astype(np.float32) for _ in range(3)]
    np.testing.assert_array_equal(combine(outputs, "median"), normalise_rows(np.median(np.stack(outputs), axis=0)))
    np.testing.assert_array_equal(combine(outputs[:1], "median"), normalise_rows(outputs[0]))
    assert combine(outputs, "median").dtype == np.float32


def test_predictor_uses_the_ensemble_function():
    import pipeline.predictor as predictor

    assert predictor.combine is combine


def test_best_recipe_is_the_highest_val_cosine_first_on_ties():
    targets = np.eye(4, dtype=np.float32)
    good, bad = targets.copy(), np.roll(targets, 1, axis=0)
    val = np.ones(4, dtype=bool)
    per_model = {("vit", "baseline"): bad, ("vit", "mlc"): good, ("vit", "mlc_cl"): good, ("swin", "mlc_cl"): bad}
    assert best_recipes(per_model, val, targets, BACKBONES, RECIPES) == {"vit": "mlc", "swin": "mlc_cl"}


def test_only_val_rows_choose_the_recipe():
    targets = np.eye(4, dtype=np.float32)
    good_on_val = targets.copy()
    good_on_val[2:] = np.roll(targets, 1, axis=0)[2:]  # wrong on the non-val rows
    good_off_val = targets.copy()
    good_off_val[:2] = np.roll(targets, 1, axis=0)[:2]
    val = np.array([True, True, False, False])
    per_model = {("vit", "baseline"): good_off_val, ("vit", "mlc"): good_on_val}
    assert best_recipes(per_model, val, targets[val], ["vit"], RECIPES) == {"vit": "mlc"}


@pytest.mark.parametrize("missing", [(), (("unet", "baseline"), ("unet", "mlc"), ("unet", "mlc_cl"), ("vit", "mlc"))])
def test_build_ensembles_gives_the_same_numbers_as_the_asset_did(missing):
    rng = np.random.default_rng(2)
    per_model, val_mask, targets = _models(rng, missing=missing)
    result = build_ensembles(per_model, val_mask, targets[val_mask], BACKBONES, RECIPES)
    best, columns, metadata = _old_ensemble_asset(per_model, val_mask, targets[val_mask])
    assert result.best_recipe == best and list(result.best_recipe) == list(best)
    assert list(result.predictions) == list(columns)  # the table's column order
    for name, matrix in columns.items():
        np.testing.assert_array_equal(result.predictions[name], matrix)
    assert {f"val_cosine_{k}": v for k, v in result.val_cosine.items()} == metadata
    assert DAKL_INPUT == ensemble_column("median", BEST) == "median_best"


def test_build_ensembles_leaves_out_empty_groups():
    rng = np.random.default_rng(3)
    per_model, val_mask, targets = _models(rng, missing=[(b, "mlc") for b in BACKBONES])
    result = build_ensembles(per_model, val_mask, targets[val_mask], BACKBONES, RECIPES)
    assert "median_mlc" not in result.predictions and "median_best" in result.predictions
    assert set(result.best_recipe.values()) <= {"baseline", "mlc_cl"}


def _dakl_data(rng, k=12, n_val=9, n_test=7, d=6):
    X, Y = _unit(rng, k, d), _unit(rng, k, d)
    val_x, val_y, test_x = _unit(rng, n_val, d), _unit(rng, n_val, d), _unit(rng, n_test, d)
    return X, Y, val_x, val_y, test_x


def test_dakl_selection_gives_the_same_numbers_as_the_asset_did():
    rng = np.random.default_rng(4)
    X, Y, val_x, val_y, test_x = _dakl_data(rng)
    gammas, alphas = (0.01, 1.0, 10.0), (0.1, 1.0)
    result = select_dakl(X, Y, val_x, val_y, {"val": val_x, "test": test_x}, gammas, alphas)
    # the asset's loop before the move
    sweep = []
    for gamma in gammas:
        for alpha in alphas:
            model = DAKLRegressor(gamma=gamma, alpha=alpha).fit(X, Y, val_x)
            sweep.append(
                {"gamma": gamma, "alpha": alpha, "val_cosine": float(row_cosines(model.predict(val_x), val_y).mean())}
            )
    best = max(sweep, key=lambda r: r["val_cosine"])
    assert result.sweep == sweep
    assert (result.gamma, result.alpha, result.val_cosine) == (best["gamma"], best["alpha"], best["val_cosine"])
    for split, x in (("val", val_x), ("test", test_x)):
        model = DAKLRegressor(gamma=best["gamma"], alpha=best["alpha"]).fit(X, Y, x)
        np.testing.assert_array_equal(result.predictions[split], normalise_rows(model.predict(x)))
    assert list(result.predictions) == ["val", "test"]


def test_dakl_sweep_covers_every_pair_gamma_major():
    rng = np.random.default_rng(5)
    X, Y, val_x, val_y, _ = _dakl_data(rng)
    sweep = sweep_dakl(X, Y, val_x, val_y, (0.1, 1.0), (0.01, 1.0, 10.0))
    assert [(r["gamma"], r["alpha"]) for r in sweep] == [(g, a) for g in (0.1, 1.0) for a in (0.01, 1.0, 10.0)]
    assert all(-1.0 <= r["val_cosine"] <= 1.0 for r in sweep)


def test_dakl_picks_the_best_val_setting():
    """Labels that are the centroids themselves: a small ridge term must win over a large one."""
    rng = np.random.default_rng(6)
    X = _unit(rng, 20, 6)
    result = select_dakl(X, X, X, X, {"val": X}, gammas=(1.0,), alphas=(1e-3, 100.0))
    assert result.alpha == 1e-3
    assert result.val_cosine == max(r["val_cosine"] for r in result.sweep)


def _old_alignment(image_ids, scored):
    """assets/training.py's trained_models block before the move."""
    position = {image_id: i for i, image_id in enumerate(image_ids)}
    buckets = np.array(["hard"] * len(image_ids), dtype=object)
    for image_id, bucket in scored:
        if image_id in position:
            buckets[position[image_id]] = bucket
    return curriculum_stages(buckets)


def test_buckets_follow_the_training_order_and_default_to_hard():
    buckets = align_buckets(["c", "a", "b", "d"], ["a", "b", "c", "zz"], ["easy", "medium", "easy", "easy"])
    assert list(buckets) == ["easy", "easy", "medium", "hard"]  # d has no score; zz is not trained on


def test_aligned_stages_match_the_asset_before():
    rng = np.random.default_rng(7)
    image_ids = [f"img{i:03d}" for i in rng.permutation(40)]
    scored_ids = [f"img{i:03d}" for i in rng.permutation(45)[:35]]  # some unscored, some not in train
    scored_buckets = list(rng.choice(["easy", "medium", "hard"], size=len(scored_ids)))
    stages = aligned_stages(image_ids, scored_ids, scored_buckets)
    expected = _old_alignment(image_ids, zip(scored_ids, scored_buckets))
    assert len(stages) == len(expected) == 4
    for got, want in zip(stages, expected):
        np.testing.assert_array_equal(got, want)


def test_aligned_stages_reject_unknown_buckets():
    with pytest.raises(ValueError, match="unknown difficulty buckets"):
        aligned_stages(["a"], ["a"], ["trivial"])
