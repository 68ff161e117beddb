"""Ensemble, k-means centroids, DAKL, the evaluation report and the prompt bank."""


import json
import time

import dagster as dg
import numpy as np
import polars as pl

from assets.common import PROFILE_CONFIG, SETTINGS, code_version, markdown_table
from assets.data import filtered_pairs, prompt_embeddings
from assets.generation import caption_report_rows
from assets.plots import bar_plot_png, data_uri, gallery_png, grouped_bars_png, histogram_png, line_plot_png, md_image
from assets.training import BACKBONES, RECIPES, TRAIN, difficulty_scores, load_splits, model_predictions
from pipeline import storage as store
from pipeline.evaluation.report import Report, knn_baseline, normalise_rows, row_cosines
from pipeline.training.pairs import embedding_series, join_pairs, mean_embedding_baseline
from resources import ComputeResource, StorageResource

EVAL_GROUP = "evaluation"
ENSEMBLE_METHODS = ("median", "mean")
DAKL_GAMMAS = (0.001, 0.01, 0.1, 1.0, 10.0)
DAKL_ALPHAS = (0.01, 0.1, 1.0)


def _targets(storage: StorageResource) -> pl.DataFrame:
    joined = join_pairs(storage.read_table("filtered_pairs"), storage.read_table("prompt_embeddings"), None)
    return joined.select("image_id", "split", "prompt", pl.col("embedding").alias("target"))


def _matrix(frame: pl.DataFrame, column: str) -> np.ndarray:
    return frame[column].to_numpy().astype(np.float32, copy=False)


def _predictions(storage: StorageResource, backbone: str, recipe: str) -> pl.DataFrame:
    return storage.read_table("model_predictions", f"{backbone}|{recipe}").sort("image_id")


@dg.asset(
    deps=[model_predictions],
    group_name=EVAL_GROUP,
    kinds={"numpy", "parquet"},
    code_version=code_version("ensemble_predictions"),
    description="Element-wise median and mean over backbones: per recipe, and over each backbone's best recipe on val.",
)
def ensemble_predictions(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    targets = _targets(storage)
    ids = targets.sort("image_id")
    val_mask = (ids["split"] == "val").to_numpy()
    val_targets = _matrix(ids, "target")[val_mask]
    per_model: dict[tuple[str, str], np.ndarray] = {}
    for backbone in BACKBONES:
        for recipe in RECIPES:
            if storage.has_table("model_predictions", f"{backbone}|{recipe}"):
                preds = _predictions(storage, backbone, recipe)
                aligned = ids.select("image_id").join(preds.select("image_id", "embedding"), on="image_id", how="left")
                if aligned["embedding"].null_count():
                    raise dg.Failure(f"model_predictions[{backbone}|{recipe}] does not cover every pair: re-materialize it")
                per_model[(backbone, recipe)] = _matrix(aligned, "embedding")
    if not per_model:
        raise dg.Failure("no model_predictions: materialize trained_models and model_predictions first")
    best_recipe = {}
    for backbone in BACKBONES:
        scored = {r: float(row_cosines(per_model[(backbone, r)][val_mask], val_targets).mean())
                  for r in RECIPES if (backbone, r) in per_model}
        if scored:
            best_recipe[backbone] = max(scored, key=scored.get)
    columns = {"image_id": ids["image_id"], "split": ids["split"]}
    groups = {r: [per_model[(b, r)] for b in BACKBONES if (b, r) in per_model] for r in RECIPES}
    groups["best"] = [per_model[(b, r)] for b, r in best_recipe.items()]
    metadata = {}
    for group, members in groups.items():
        if not members:
            continue
        stack = np.stack(members)
        for method in ENSEMBLE_METHODS:
            combined = normalise_rows(np.median(stack, axis=0) if method == "median" else stack.mean(axis=0))
            name = f"{method}_{group}"
            columns[name] = embedding_series(name, combined)
            metadata[f"val_cosine_{name}"] = float(row_cosines(combined[val_mask], val_targets).mean())
    table = pl.DataFrame(columns)
    target = storage.write_table(table, "ensemble_predictions")
    # What `reverse-sd predict` loads: each backbone's best recipe, combined by the median.
    store.write_text(
        json.dumps({"members": best_recipe, "method": "median"}, indent=2), storage.path("models", "ensemble.json")
    )
    return dg.MaterializeResult(
        metadata={
            **metadata,
            "best_recipe_per_backbone": dg.MetadataValue.json(best_recipe),
            "models": len(per_model),
            "path": dg.MetadataValue.path(target),
        }
    )


# The ensemble the DAKL stage starts from: each backbone's best recipe, combined by the median (the paper's).
DAKL_INPUT = "median_best"


@dg.asset(
    deps=[ensemble_predictions],
    group_name=EVAL_GROUP,
    kinds={"faiss", "parquet"},
    code_version=code_version("kmeans_centroids", k=PROFILE_CONFIG.kmeans_k),
    description="k-means on the ensemble's training predictions; each centroid labelled with the true "
    "embedding of the training sample whose prediction is nearest.",
)
def kmeans_centroids(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    from pipeline.ensemble.clustering import inertia, kmeans_centroids as fit_kmeans, label_centroids

    column = DAKL_INPUT
    ensemble = storage.read_table("ensemble_predictions").filter(pl.col("split") == "train").sort("image_id")
    targets = ensemble.select("image_id").join(_targets(storage), on="image_id", how="left")
    train_preds = _matrix(ensemble, column)
    train_targets = _matrix(targets, "target")
    k = min(PROFILE_CONFIG.kmeans_k, len(train_preds))
    started = time.perf_counter()
    centroids = fit_kmeans(train_preds, k, seed=0)
    labels, nearest = label_centroids(centroids, train_preds, train_targets)
    elapsed = time.perf_counter() - started
    table = pl.DataFrame(
        {
            "centroid": embedding_series("centroid", centroids),
            "label": embedding_series("label", labels),
            "nearest_image_id": [ensemble["image_id"][int(i)] for i in nearest],
        }
    )
    target = storage.write_table(table, "kmeans_centroids")
    return dg.MaterializeResult(
        metadata={
            "k": k,
            "train_points": len(train_preds),
            "inertia_cosine": float(inertia(train_preds, centroids, metric="cosine")),
            "seconds": round(elapsed, 2),
            "ensemble": column,
            "path": dg.MetadataValue.path(target),
        }
    )


@dg.asset(
    deps=[kmeans_centroids, ensemble_predictions],
    group_name=EVAL_GROUP,
    kinds={"scikitlearn", "parquet"},
    code_version=code_version("dakl_predictions", gammas=DAKL_GAMMAS, alphas=DAKL_ALPHAS),
    description="Domain-adaptive kernel regression of the ensemble: gamma and alpha chosen on val "
    "(val as the unlabeled target), then refit with test as the unlabeled target.",
)
def dakl_predictions(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    from pipeline.ensemble.dakl import DAKLRegressor

    column = DAKL_INPUT
    centroids = storage.read_table("kmeans_centroids")
    X, Y = _matrix(centroids, "centroid"), _matrix(centroids, "label")
    ensemble = storage.read_table("ensemble_predictions").sort("image_id")
    targets = ensemble.select("image_id").join(_targets(storage), on="image_id", how="left")
    by_split = {
        s: (ensemble.filter(pl.col("split") == s), targets.filter(pl.col("split") == s)) for s in ("val", "test")
    }
    val_x = _matrix(by_split["val"][0], column)
    val_y = _matrix(by_split["val"][1], "target")
    sweep = []
    for gamma in DAKL_GAMMAS:
        for alpha in DAKL_ALPHAS:
            model = DAKLRegressor(gamma=gamma, alpha=alpha).fit(X, Y, val_x)
            sweep.append({"gamma": gamma, "alpha": alpha, "val_cosine": float(row_cosines(model.predict(val_x), val_y).mean())})
    best = max(sweep, key=lambda r: r["val_cosine"])
    context.log.info(f"DAKL sweep best on val: {best}")
    frames = []
    for split, (frame, _) in by_split.items():
        x = _matrix(frame, column)
        model = DAKLRegressor(gamma=best["gamma"], alpha=best["alpha"]).fit(X, Y, x)
        frames.append(frame.select("image_id", "split").with_columns(embedding_series("embedding", normalise_rows(model.predict(x)))))
    table = pl.concat(frames)
    target = storage.write_table(table, "dakl_predictions")
    store.write_text(
        json.dumps({"gamma": best["gamma"], "alpha": best["alpha"], "ensemble": column, "sweep": sweep}, indent=2),
        storage.path("models", "dakl.json"),
    )
    val_plain = float(row_cosines(val_x, val_y).mean())
    curves = {f"alpha={a}": [r["val_cosine"] for r in sweep if r["alpha"] == a] for a in DAKL_ALPHAS}
    sweep_plot = md_image(line_plot_png(curves, f"DAKL on val (x: gamma {DAKL_GAMMAS})", "gamma index", "val cosine"))
    return dg.MaterializeResult(
        metadata={
            "gamma": best["gamma"],
            "alpha": best["alpha"],
            "val_cosine_dakl": best["val_cosine"],
            "val_cosine_ensemble": val_plain,
            "sweep": dg.MetadataValue.md(markdown_table(sweep) + "\n\n" + sweep_plot),
            "path": dg.MetadataValue.path(target),
        }
    )


def _knn_baseline(storage: StorageResource, compute: ComputeResource) -> tuple[float | None, str]:
    """The paper's k-NN baseline: 5 nearest training images by CLIP image features, their prompts' mean.

    The features come from the clip backbone's frozen tower as stored in its checkpoint (the same for every
    recipe): the pretrained ViT-H/14 on DiffusionDB, the tiny random-init twin on the sample profile.
    """
    from pipeline.training.checkpoint import latest_checkpoint, load_model_weights
    from pipeline.models import create_model
    from pipeline.training.datasets import PairDataset
    from pipeline.training.loop import backbone_features

    checkpoint = next(
        (c for r in RECIPES if (c := latest_checkpoint(storage.path("trained_models", "clip", r))) is not None), None
    )
    if checkpoint is None:
        return None, "k-NN baseline: not computed (no trained clip model to take CLIP image features from)."
    state, config = load_model_weights(checkpoint)
    model = create_model(**config)
    model.load_state_dict(state)
    splits = load_splits(storage, ("train", "test"))
    train, test = splits["train"], splits["test"]
    features = {
        name: backbone_features(
            model, PairDataset.for_model(s.images, s.targets, None, model), TRAIN.batch_size, compute.device
        )
        for name, s in splits.items()
    }
    predicted = knn_baseline(features["train"], train.targets, features["test"], k=5)
    variant = "pretrained CLIP" if config.get("variant") == "full" else "the tiny random-init CLIP twin's"
    return (
        float(row_cosines(predicted, test.targets).mean()),
        f"k-NN baseline: 5 nearest training images by {variant} image features (the paper: CLIP ViT-H/14).",
    )


@dg.asset(
    deps=[
        ensemble_predictions,
        dakl_predictions,
        difficulty_scores,
        model_predictions,
        filtered_pairs,
        prompt_embeddings,
        "prompt_bank",
        "caption_predictions",
    ],
    group_name=EVAL_GROUP,
    kinds={"markdown", "html"},
    pool="gpu",  # the k-NN baseline runs the clip backbone over the train and test images
    code_version=code_version("evaluation_report"),
    description="The paper's Table 1 on this data (mean cosine on test), baselines and plots; "
    "reports/evaluation.{md,html,json} under the storage root.",
)
def evaluation_report(
    context: dg.AssetExecutionContext, storage: StorageResource, compute: ComputeResource
) -> dg.MaterializeResult:
    pairs = storage.read_table("filtered_pairs", columns=["image_id", "part", "split"])
    targets = _targets(storage).sort("image_id")
    test = targets.filter(pl.col("split") == "test")
    train = targets.filter(pl.col("split") == "train")
    test_y, train_y = _matrix(test, "target"), _matrix(train, "target")
    cosine: dict[str, float] = {}
    histograms = {}
    for backbone in BACKBONES:
        for recipe in RECIPES:
            if storage.has_table("model_predictions", f"{backbone}|{recipe}"):
                preds = test.select("image_id").join(_predictions(storage, backbone, recipe), on="image_id", how="left")
                values = row_cosines(_matrix(preds, "embedding"), test_y)
                cosine[f"{backbone}/{recipe}"] = float(values.mean())
                histograms[f"{backbone}/{recipe}"] = values
    ensemble = test.select("image_id").join(storage.read_table("ensemble_predictions"), on="image_id", how="left")
    for method in ENSEMBLE_METHODS:
        for group in (*RECIPES, "best"):
            name = f"{method}_{group}"
            if name in ensemble.columns:
                value = float(row_cosines(_matrix(ensemble, name), test_y).mean())
                cosine[f"ensemble/{method}" if group == "best" else f"ensemble/{method}/{group}"] = value
    dakl = test.select("image_id").join(storage.read_table("dakl_predictions"), on="image_id", how="left")
    cosine["ensemble+dakl"] = float(row_cosines(_matrix(dakl, "embedding"), test_y).mean())
    cosine["baseline/mean_embedding"] = mean_embedding_baseline(train_y, test_y)
    id_parts = dict(pairs.select("image_id", "part").iter_rows())
    knn_cosine, knn_note = _knn_baseline(storage, compute)
    if knn_cosine is not None:
        cosine["baseline/knn"] = knn_cosine

    figures = {
        "Test cosine per model": data_uri(bar_plot_png(cosine, "test mean cosine", "cosine")),
    }
    for backbone in BACKBONES:
        subset = {k: v for k, v in histograms.items() if k.startswith(backbone + "/")}
        if subset:
            figures[f"Cosine histogram: {backbone}"] = data_uri(histogram_png(subset, backbone))
    bucket_cosines = _bucket_cosines(storage, train)
    if bucket_cosines:
        figures["Train cosine by difficulty bucket (mlc_cl models)"] = data_uri(
            grouped_bars_png(bucket_cosines, "mean train cosine per difficulty bucket", "cosine")
        )
    dakl_params = json.loads(store.as_path(storage.path("models", "dakl.json")).read_text())
    sweep = dakl_params.get("sweep", [])
    if sweep:
        curves = {
            f"alpha={a}": [r["val_cosine"] for r in sweep if r["alpha"] == a] for a in sorted({r["alpha"] for r in sweep})
        }
        figures[f"DAKL sweep on val (gamma = {', '.join(str(g) for g in DAKL_GAMMAS)})"] = data_uri(
            line_plot_png(curves, "DAKL: val cosine by gamma", "gamma (index)", "val cosine")
        )
    figures["Test images: true prompt and top-3 retrieved"] = data_uri(
        _gallery(storage, test, dakl, id_parts, n=4)
    )
    notes = [
        f"profile: {SETTINGS.profile}; backbones: {'tiny random-init twins' if SETTINGS.is_sample else 'pretrained'}",
        knn_note,
        "unet: the caption context is empty on the sample profile (no captioning model offline); a learned null context is used.",
    ]
    generation = caption_report_rows(storage)
    for row in generation:
        cosine[f"caption/{row['captioner']}"] = row["sbert_cosine"]
    if generation and SETTINGS.is_sample:
        notes.append(
            "generated prompts: tiny random-init captioner and CLIP (sample profile); RefCLIPScore then measures nothing."
        )
    report = Report(
        profile=SETTINGS.profile,
        generation=generation,
        split="test",
        cosine=cosine,
        counts=dict(pairs.group_by("split").len().sort("split").iter_rows()),
        notes=notes,
        figures=figures,
    )
    reports = storage.path("reports")
    store.write_text(report.markdown(), f"{reports}/evaluation.md")
    store.write_text(report.html(), f"{reports}/evaluation.html")
    store.write_text(report.to_json(), f"{reports}/evaluation.json")
    table_md = report.markdown().split("\n## ")[0]
    return dg.MaterializeResult(
        metadata={
            "evaluation_table": dg.MetadataValue.md(table_md),
            **{f"test_cosine/{k}": v for k, v in cosine.items()},
            "html": dg.MetadataValue.path(f"{reports}/evaluation.html"),
            "json": dg.MetadataValue.path(f"{reports}/evaluation.json"),
        }
    )


def _bucket_cosines(storage: StorageResource, train: pl.DataFrame) -> dict[str, dict[str, float]]:
    """Per backbone: the mlc_cl model's mean train cosine in each difficulty bucket."""
    out = {}
    for backbone in BACKBONES:
        if not (
            storage.has_table("difficulty_scores", backbone)
            and storage.has_table("model_predictions", f"{backbone}|mlc_cl")
        ):
            continue
        frame = (
            train.select("image_id", "target")
            .join(storage.read_table("difficulty_scores", backbone).select("image_id", "bucket"), on="image_id")
            .join(_predictions(storage, backbone, "mlc_cl").select("image_id", "embedding"), on="image_id")
        )
        cos = row_cosines(_matrix(frame, "embedding"), _matrix(frame, "target"))
        buckets = frame["bucket"].to_numpy()
        out[backbone] = {b: float(cos[buckets == b].mean()) for b in ("easy", "medium", "hard") if (buckets == b).any()}
    return out


def _gallery(storage: StorageResource, test: pl.DataFrame, predictions: pl.DataFrame, id_parts: dict, n: int) -> bytes:
    """The first n test images with their true prompt and the top-3 prompt-bank prompts for the prediction."""
    bank = storage.read_table("prompt_bank")
    bank_matrix = _matrix(bank, "embedding")
    rows = test.head(n)
    preds = rows.select("image_id").join(predictions.select("image_id", "embedding"), on="image_id", how="left")
    scores = _matrix(preds, "embedding") @ bank_matrix.T
    images, captions = [], []
    for i, (image_id, prompt) in enumerate(rows.select("image_id", "prompt").iter_rows()):
        frame = storage.read_table("diffusiondb_parts", id_parts[image_id], columns=["image_id", "image"])
        images.append(frame.filter(pl.col("image_id") == image_id)["image"][0])
        top = np.argsort(-scores[i])[:3]
        lines = [f"true: {prompt}"] + [f"{r + 1}. ({scores[i, j]:.3f}) {bank['prompt'][int(j)]}" for r, j in enumerate(top)]
        captions.append("\n".join(lines))
    return gallery_png(images, captions)


@dg.asset(
    deps=[filtered_pairs, prompt_embeddings],
    group_name=EVAL_GROUP,
    kinds={"parquet"},
    code_version=code_version("prompt_bank"),
    description="Training prompts and their embeddings: the retrieval bank of `reverse-sd predict`.",
)
def prompt_bank(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
    targets = _targets(storage).filter(pl.col("split") == "train")
    bank = targets.select("prompt", pl.col("target").alias("embedding")).unique("prompt", maintain_order=True)
    target = storage.write_table(bank, "prompt_bank")
    return dg.MaterializeResult(metadata={"prompts": bank.height, "path": dg.MetadataValue.path(target)})


EVALUATION_ASSETS = [ensemble_predictions, kmeans_centroids, dakl_predictions, evaluation_report, prompt_bank]
