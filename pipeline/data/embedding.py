"""Prompt embeddings: all-MiniLM-L6-v2 (SBERT) vectors of prompt texts, with an incremental cache.

The targets of the whole method are these 384-d unit vectors.  This module keys them by a stable content
hash of the prompt text and by the model id, so a materialisation only encodes prompts it has never seen,
and a model change re-encodes everything.  The encoder itself lives in ``pipeline.data.prompt_encoder``
(loading, precision probe, chunked tokenising) and ``pipeline.data.encoder_forward`` (packed kernel,
length bands); its public names are re-exported here, the import path assets/, bench/ and tests use.  They
are imported on first use (PEP 562): both load torch, which the code server, the command line and the runs
that only read or filter data need not pay for.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from pipeline.constants import EMBED_DIM as EMBEDDING_DIM

if TYPE_CHECKING:
    from pipeline.data.encoder_forward import length_bands
    from pipeline.data.prompt_encoder import (
        DEFAULT_MODEL,
        LOCAL_ALIASES,
        ProgressCallback,
        PromptEncoder,
        resolve_model_location,
    )

_REEXPORTED = {
    "DEFAULT_MODEL": "pipeline.data.prompt_encoder",
    "LOCAL_ALIASES": "pipeline.data.prompt_encoder",
    "ProgressCallback": "pipeline.data.prompt_encoder",
    "PromptEncoder": "pipeline.data.prompt_encoder",
    "resolve_model_location": "pipeline.data.prompt_encoder",
    "length_bands": "pipeline.data.encoder_forward",
}


def __getattr__(name: str):
    if name in _REEXPORTED:
        return getattr(importlib.import_module(_REEXPORTED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDING_DIM",
    "LOCAL_ALIASES",
    "ProgressCallback",
    "PromptEncoder",
    "embed_incremental",
    "embedding_schema",
    "length_bands",
    "prompt_ids",
    "resolve_model_location",
]


def prompt_ids(prompts: Sequence[str] | pl.Series) -> pl.Series:
    """Stable 64-bit content hashes (blake2b) of prompt texts: the same text gives the same id in any
    process, polars version or machine (unlike ``pl.Series.hash``), so ids can key a cache on disk."""
    values = prompts.to_list() if isinstance(prompts, pl.Series) else list(prompts)
    ids = [int.from_bytes(hashlib.blake2b(p.encode("utf-8"), digest_size=8).digest(), "little") for p in values]
    return pl.Series("prompt_id", ids, dtype=pl.UInt64)


# --------------------------------------------------------------------------------------------------
# Incremental cache
# --------------------------------------------------------------------------------------------------


def embedding_schema(dimension: int = EMBEDDING_DIM) -> dict[str, pl.DataType]:
    return {
        "prompt_id": pl.UInt64,
        "prompt": pl.String,
        "model_id": pl.String,
        "embedding": pl.Array(pl.Float32, dimension),
    }


def _usable_cache(cache: pl.DataFrame | None, model_id: str, dimension: int) -> tuple[pl.DataFrame | None, str]:
    """The cache if its rows came from ``model_id`` with the right shape, else None and the reason."""
    if cache is None or cache.height == 0:
        return None, "empty"
    want = embedding_schema(dimension)
    missing = [c for c in want if c not in cache.columns]
    if missing:
        return None, f"missing columns {missing}"
    if cache.schema["embedding"] != want["embedding"]:
        return None, f"embedding dtype {cache.schema['embedding']} != {want['embedding']}"
    models = cache["model_id"].unique().to_list()
    if models != [model_id]:
        return None, f"model changed: cache from {models}, now {model_id!r}"
    return cache.select(list(want)).cast(want), "ok"


def embed_incremental(
    prompts: pl.Series | Sequence[str],
    cache: pl.DataFrame | None,
    encoder: PromptEncoder,
    model_id: str | None = None,
    on_progress: ProgressCallback | None = None,
) -> tuple[pl.DataFrame, dict]:
    """Embeddings of the unique requested prompts, re-using a previous output for those it holds.

    Returns (frame, stats).  frame has one row per distinct non-null prompt, in first-seen order,
    with columns prompt_id (stable blake2b-64 of the text), prompt, model_id and embedding
    (Array[Float32, dim], unit length).  ``cache`` is a previous frame of this function: rows whose
    prompt_id and text match are copied, only the rest is encoded.  A cache written by another model
    (``model_id``, default encoder.model_id) or with another shape is ignored as a whole.  stats:
    cached, encoded, removed (cache rows no longer requested), null_prompts, cache_status, model_id.
    """
    model_id = model_id or encoder.model_id
    series = prompts if isinstance(prompts, pl.Series) else pl.Series("prompt", list(prompts), dtype=pl.String)
    series = series.cast(pl.String).rename("prompt")
    nulls = int(series.null_count())
    wanted = series.drop_nulls().unique(maintain_order=True)
    request = pl.DataFrame({"prompt_id": prompt_ids(wanted), "prompt": wanted}).with_row_index("_order")
    dimension = encoder.dimension
    usable, cache_status = _usable_cache(cache, model_id, dimension)
    if usable is None:
        usable = pl.DataFrame(schema=embedding_schema(dimension))
    # Join on id *and* text: a 64-bit collision can never hand one prompt another's vector.
    usable = usable.unique(subset=["prompt_id", "prompt"], keep="first")
    hits = request.join(usable.drop("model_id"), on=["prompt_id", "prompt"], how="inner")
    misses = request.join(usable.select("prompt_id", "prompt"), on=["prompt_id", "prompt"], how="anti")
    vectors = (
        encoder.encode(misses["prompt"], on_progress=on_progress)
        if misses.height
        else np.empty((0, dimension), np.float32)
    )
    encoded = misses.with_columns(pl.Series("embedding", vectors, dtype=pl.Array(pl.Float32, dimension)))
    frame = (
        pl.concat([hits, encoded.select(hits.columns)])
        .sort("_order")
        .select(
            "prompt_id",
            "prompt",
            pl.lit(model_id, dtype=pl.String).alias("model_id"),
            "embedding",
        )
    )
    removed = usable.height - hits.height if cache_status == "ok" else 0
    stats = {
        "cached": hits.height,
        "encoded": encoded.height,
        "removed": int(removed),
        "invalidated": int(cache.height) if cache is not None and cache_status not in ("ok", "empty") else 0,
        "null_prompts": nulls,
        "cache_status": cache_status,
        "model_id": model_id,
        "backend": encoder.backend,
    }
    return frame, stats
