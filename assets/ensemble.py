"""Ensemble, k-means centroids and DAKL: the paper's steps after the per-backbone models.

Thin wiring: each asset reads its inputs, calls one function of pipeline.ensemble, writes the result and
attaches metadata."""

import json
import time

import dagster as dg
import numpy as np
import polars as pl

from assets.common import (
    PROFILE_CONFIG,
    artifact_metadata,
    code_version,
    metadata_table,
    rounded_metadata,
    table_metadata,
)
from assets.plots import line_plot_png, md_image
from assets.training import BACKBONES, RECIPES, model_predictions
from pipeline import storage as store
from pipeline.ensemble.ensemble import DAKL_INPUT, build_ensembles
from pipeline.ensemble.selection import DAKL_ALPHAS, DAKL_GAMMAS, select_dakl
from pipeline.metrics import row_cosines
from pipeline.training.pairs import embedding_series, join_pairs
from resources import StorageResource, Table, Tables, table_in

EVAL_GROUP = "evaluation"


def target_embeddings(pairs: Table, embeddings: Table) -> pl.DataFrame:
    """Every kept pair's split, prompt and target embedding, from the filtered_pairs and prompt_embeddings tables."""
    joined = join_pairs(pairs.read(), embeddings.read(), None)
    return joined.select("image_id", "split", "prompt", pl.col("embedding").alias("target"))


def undeclared_targets(storage: StorageResource) -> pl.DataFrame:
    """target_embeddings for the ensemble stages, which do not declare filtered_pairs and prompt_embeddings as
    parents (they reach them through model_predictions): read by name, the graph left as it is."""
    return target_embeddings(Table(storage, "filtered_pairs"), Table(storage, "prompt_embeddings"))


def as_matrix(frame: pl.DataFrame, column: str) -> np.ndarray:
    return frame[column].to_numpy().astype(np.float32, copy=False)


def predictions_by_model(predictions: Tables, rows: pl.DataFrame) -> dict[tuple[str, str], np.ndarray]:
    """(backbone, recipe) -> that model's predictions for ``rows`` (by image_id, in their order), for every
    model with predictions (``predictions``: the model_predictions tables present); a model that misses one of
    the rows fails the run."""
    out = {}
    for backbone in BACKBONES:
        for recipe in RECIPES:
            if f"{backbone}|{recipe}" in predictions:
                preds = predictions[f"{backbone}|{recipe}"].read().sort("image_id").select("image_id", "embedding")
                aligned = rows.select("image_id").join(preds, on="image_id", how="left")
                if aligned["embedding"].null_count():
                    raise dg.Failure(
                        f"model_predictions[{backbone}|{recipe}] does not cover every pair: re-materialize it"
                    )
                out[(backbone, recipe)] = as_matrix(aligned, "embedding")
    return out


@dg.asset(
    ins={"predictions": table_in(model_predictions)},
    group_name=EVAL_GROUP,
    kinds={"numpy", "parquet"},
    code_version=code_version("ensemble_predictions"),
    description="Element-wise median and mean over backbones: per recipe, and over each backbone's best recipe on val.",
)
def ensemble_predictions(
    context: dg.AssetExecutionContext, predictions: Tables, storage: StorageResource
) -> dg.MaterializeResult:
    ids = undeclared_targets(storage).sort("image_id")
    per_model = predictions_by_model(predictions, ids)
    if not per_model:
        raise dg.Failure("no model_predictions: materialize trained_models and model_predictions first")
    val_mask = (ids["split"] == "val").to_numpy()
    result = build_ensembles(per_model, val_mask, as_matrix(ids, "target")[val_mask], BACKBONES, RECIPES)
    table = pl.DataFrame(
        {
            "image_id": ids["image_id"],
            "split": ids["split"],
            **{name: embedding_series(name, matrix) for name, matrix in result.predictions.items()},
        }
    )
    target = storage.write_table(table, "ensemble_predictions")
    # What `reverse-sd predict` loads: each backbone's best recipe, combined by the median.
    store.write_text(
        json.dumps({"members": result.best_recipe, "method": "median"}, indent=2),
        storage.path("models", "ensemble.json"),
    )
    return dg.MaterializeResult(
        metadata={
            **rounded_metadata({f"val_cosine_{name}": value for name, value in result.val_cosine.items()}),
            "best_recipe_per_backbone": dg.MetadataValue.json(result.best_recipe),
            "models": len(per_model),
            **table_metadata(table),
            **artifact_metadata(target),
        }
    )


@dg.asset(
    ins={"ensemble": table_in(ensemble_predictions)},
    group_name=EVAL_GROUP,
    kinds={"faiss", "parquet"},
    code_version=code_version("kmeans_centroids", k=PROFILE_CONFIG.kmeans_k),
    description="k-means on the ensemble's training predictions; each centroid labelled with the true "
    "embedding of the training sample whose prediction is nearest.",
)
def kmeans_centroids(
    context: dg.AssetExecutionContext, ensemble: Table, storage: StorageResource
) -> dg.MaterializeResult:
    from pipeline.ensemble.clustering import inertia, label_centroids
    from pipeline.ensemble.clustering import kmeans_centroids as fit_kmeans

    column = DAKL_INPUT
    train = ensemble.read().filter(pl.col("split") == "train").sort("image_id")
    targets = train.select("image_id").join(undeclared_targets(storage), on="image_id", how="left")
    train_preds = as_matrix(train, column)
    train_targets = as_matrix(targets, "target")
    k = min(PROFILE_CONFIG.kmeans_k, len(train_preds))
    started = time.perf_counter()
    centroids = fit_kmeans(train_preds, k, seed=0)
    labels, nearest = label_centroids(centroids, train_preds, train_targets)
    elapsed = time.perf_counter() - started
    table = pl.DataFrame(
        {
            "centroid": embedding_series("centroid", centroids),
            "label": embedding_series("label", labels),
            "nearest_image_id": [train["image_id"][int(i)] for i in nearest],
        }
    )
    target = storage.write_table(table, "kmeans_centroids")
    return dg.MaterializeResult(
        metadata={
            "k": k,
            "train_points": len(train_preds),
            "inertia_cosine": round(float(inertia(train_preds, centroids, metric="cosine")), 4),
            "seconds": round(elapsed, 2),
            "ensemble": column,
            **table_metadata(table),
            **artifact_metadata(target),
        }
    )


@dg.asset(
    ins={"centroids": table_in(kmeans_centroids), "ensemble": table_in(ensemble_predictions)},
    group_name=EVAL_GROUP,
    kinds={"scikitlearn", "parquet"},
    code_version=code_version("dakl_predictions", gammas=DAKL_GAMMAS, alphas=DAKL_ALPHAS),
    description="Domain-adaptive kernel regression of the ensemble: gamma and alpha chosen on val "
    "(val as the unlabeled target), then refit with test as the unlabeled target.",
)
def dakl_predictions(
    context: dg.AssetExecutionContext, centroids: Table, ensemble: Table, storage: StorageResource
) -> dg.MaterializeResult:
    centroid_table, predictions = centroids.read(), ensemble.read().sort("image_id")
    targets = predictions.select("image_id").join(undeclared_targets(storage), on="image_id", how="left")
    frames = {s: predictions.filter(pl.col("split") == s) for s in ("val", "test")}
    val_x = as_matrix(frames["val"], DAKL_INPUT)
    val_y = as_matrix(targets.filter(pl.col("split") == "val"), "target")
    result = select_dakl(
        as_matrix(centroid_table, "centroid"),
        as_matrix(centroid_table, "label"),
        val_x,
        val_y,
        {s: as_matrix(frame, DAKL_INPUT) for s, frame in frames.items()},
        DAKL_GAMMAS,
        DAKL_ALPHAS,
    )
    context.log.info(
        f"DAKL sweep best on val: gamma={result.gamma}, alpha={result.alpha}, val cosine={result.val_cosine:.4f}"
    )
    table = pl.concat(
        frame.select("image_id", "split").with_columns(embedding_series("embedding", result.predictions[s]))
        for s, frame in frames.items()
    )
    target = storage.write_table(table, "dakl_predictions")
    store.write_text(
        json.dumps(
            {"gamma": result.gamma, "alpha": result.alpha, "ensemble": DAKL_INPUT, "sweep": result.sweep}, indent=2
        ),
        storage.path("models", "dakl.json"),
    )
    return dg.MaterializeResult(
        metadata={
            "gamma": result.gamma,
            "alpha": result.alpha,
            **rounded_metadata(
                {"val_cosine_dakl": result.val_cosine, "val_cosine_ensemble": float(row_cosines(val_x, val_y).mean())}
            ),
            "sweep": metadata_table(result.sweep, [("gamma", "float"), ("alpha", "float"), ("val_cosine", "float")]),
            "sweep_plot": dg.MetadataValue.md(md_image(dakl_sweep_png(result.sweep), "DAKL sweep")),
            **table_metadata(table),
            **artifact_metadata(target),
        }
    )


def dakl_sweep_png(sweep: list[dict]) -> bytes:
    """Val cosine against gamma (log axis), one line per alpha."""
    gammas = sorted({r["gamma"] for r in sweep})
    curves = {
        f"alpha={a}": [next(r["val_cosine"] for r in sweep if r["alpha"] == a and r["gamma"] == g) for g in gammas]
        for a in sorted({r["alpha"] for r in sweep})
    }
    return line_plot_png(curves, "DAKL on val: cosine by gamma", "gamma", "val cosine", x=gammas, logx=True)


ENSEMBLE_ASSETS = [ensemble_predictions, kmeans_centroids, dakl_predictions]
