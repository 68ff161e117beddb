"""Assemble the supervised pairs a model trains on: image bytes, target embedding, vocabulary labels.

Joins the stage tables by their keys (image_id, prompt), keeps split membership, and reads image bytes
part by part with only the rows that are needed, so nothing else of a part is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl


@dataclass
class SplitData:
    """One split's pairs, aligned row by row."""

    image_ids: list[str]
    images: list[bytes]
    targets: np.ndarray  # (n, 384) float32, unit length
    labels: list[np.ndarray]  # sorted vocabulary indices per pair
    prompts: list[str]

    def __len__(self) -> int:
        return len(self.image_ids)


def join_pairs(pairs: pl.DataFrame, embeddings: pl.DataFrame, labels: pl.DataFrame | None) -> pl.DataFrame:
    """filtered_pairs + the prompt's embedding + the pair's labels; every pair must have an embedding."""
    joined = pairs.join(embeddings.select("prompt", "embedding"), on="prompt", how="left")
    missing = joined.filter(pl.col("embedding").is_null())
    if missing.height:
        raise ValueError(
            f"{missing.height} pairs have no prompt embedding (e.g. image {missing['image_id'][0]!r}): "
            "re-materialize prompt_embeddings"
        )
    if labels is not None:
        joined = joined.join(labels.select("image_id", "label_indices"), on="image_id", how="left")
    return joined


def load_split(
    joined: pl.DataFrame,
    split: str,
    read_images: Callable[[str, list[str]], pl.DataFrame],
    limit: int | None = None,
) -> SplitData:
    """The rows of one split with their image bytes; read_images(part, image_ids) -> (image_id, image)."""
    rows = joined.filter(pl.col("split") == split).sort("image_id")
    if limit is not None:
        rows = rows.head(limit)
    chunks = []
    for part, group in rows.group_by("part", maintain_order=True):
        ids = group["image_id"].to_list()
        images = read_images(part[0], ids)
        chunks.append(group.join(images.select("image_id", "image"), on="image_id", how="inner"))
    full = pl.concat(chunks).sort("image_id") if chunks else rows.with_columns(pl.lit(b"").alias("image")).head(0)
    targets = (
        full["embedding"].to_numpy().astype(np.float32, copy=False)
        if full.height
        else np.zeros((0, 384), np.float32)
    )
    labels = (
        [np.asarray(x if x is not None else [], dtype=np.int64) for x in full["label_indices"].to_list()]
        if "label_indices" in full.columns
        else [np.zeros(0, np.int64) for _ in range(full.height)]
    )
    return SplitData(
        image_ids=full["image_id"].to_list(),
        images=full["image"].to_list(),
        targets=targets,
        labels=labels,
        prompts=full["prompt"].to_list(),
    )


def mean_embedding_baseline(train_targets: np.ndarray, eval_targets: np.ndarray) -> float:
    """Mean cosine of the (normalised) mean training embedding against each evaluation target."""
    from pipeline.evaluation import mean_cosine, normalise_rows

    mean = normalise_rows(train_targets.mean(axis=0, keepdims=True))
    return mean_cosine(np.broadcast_to(mean, eval_targets.shape), eval_targets)


def embedding_series(name: str, matrix: np.ndarray) -> pl.Series:
    """A (n, d) matrix as a fixed-size float32 array column, the layout of every embedding table."""
    return pl.Series(name, matrix.astype(np.float32, copy=False), dtype=pl.Array(pl.Float32, matrix.shape[1]))
