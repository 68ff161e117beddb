"""Assemble the supervised pairs a model trains on: image bytes, target embedding, vocabulary labels.

Joins the stage tables by their keys (image_id, prompt) and keeps split membership; a split's images come
from an image source (pipeline.data.image_store: built part by part, memory-mapped), never a list in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from pipeline.constants import EMBED_DIM


@dataclass
class SplitData:
    """One split's pairs, aligned row by row."""

    image_ids: list[str]
    images: Sequence[bytes]  # e.g. a memory-mapped pipeline.data.image_store.ImageColumn
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


def split_rows(joined: pl.DataFrame, split: str, limit: int | None = None) -> pl.DataFrame:
    """The rows of one split, sorted by image id (the first ``limit`` of them when given)."""
    rows = joined.filter(pl.col("split") == split).sort("image_id")
    return rows.head(limit) if limit is not None else rows


def load_split(rows: pl.DataFrame, images: Sequence[bytes], found: list[str]) -> SplitData:
    """One split's pairs from its rows (split_rows) and their images.

    ``images`` holds the images of the ids in ``found``, in the rows' order, e.g. a memory-mapped
    pipeline.data.image_store column, so the split's images are never all in memory.  Pairs whose image is
    missing (not in ``found``) are left out.
    """
    if len(found) != rows.height:
        rows = rows.join(pl.DataFrame({"image_id": found}, schema={"image_id": pl.String}), on="image_id", how="semi")
    if len(images) != rows.height:
        raise ValueError(f"{len(images)} images for {rows.height} pairs")
    targets = (
        rows["embedding"].to_numpy().astype(np.float32, copy=False)
        if rows.height
        else np.zeros((0, EMBED_DIM), np.float32)
    )
    labels = (
        [np.asarray(x if x is not None else [], dtype=np.int64) for x in rows["label_indices"].to_list()]
        if "label_indices" in rows.columns
        else [np.zeros(0, np.int64) for _ in range(rows.height)]
    )
    return SplitData(
        image_ids=rows["image_id"].to_list(),
        images=images,
        targets=targets,
        labels=labels,
        prompts=rows["prompt"].to_list(),
    )


def embedding_series(name: str, matrix: np.ndarray) -> pl.Series:
    """A (n, d) matrix as a fixed-size float32 array column, the layout of every embedding table."""
    return pl.Series(name, matrix.astype(np.float32, copy=False), dtype=pl.Array(pl.Float32, matrix.shape[1]))
