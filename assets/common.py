"""Shared wiring helpers: the active settings, code versions that include result-changing config,
and Markdown rendering for UI metadata."""

from __future__ import annotations

import hashlib
import json
import math

import dagster as dg

from resources import load_settings, profile_config

SETTINGS = load_settings()
OBSERVE_CRON = SETTINGS.observe_cron  # when sources are observed (daily by default)
PROFILE_CONFIG = profile_config(SETTINGS)


def transient_retry(hub: bool = False) -> dg.RetryPolicy | None:
    """A RetryPolicy for steps whose failure can be transient: hub downloads (``hub``) and writes to an
    object-store storage root; None when the step only touches local files (a retry would fail the same way)."""
    from pipeline.data.diffusiondb import is_local_location

    remote_source = hub and not is_local_location(SETTINGS.diffusiondb)
    if remote_source or "://" in SETTINGS.home and not SETTINGS.home.startswith("file://"):
        return dg.RetryPolicy(max_retries=3, delay=10, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)
    return None


# Bump an entry when the code of that stage changes what it computes.
CODE_REVISIONS = {
    "diffusiondb_parts": 1,
    "image_folders": 1,
    "filtered_pairs": 2,  # 2: a source column, and the pairs of REVERSE_SD_IMAGES
    "prompt_embeddings": 1,
    "vocabulary": 2,  # 2: words of two or more letters (was three)
    "vocabulary_labels": 2,
    "difficulty_scores": 2,  # 2: heads start from the data's prior
    "training_settings": 1,
    "trained_models": 2,  # 2: heads from the data's prior, best-val epoch kept
    "model_predictions": 1,
    "ensemble_predictions": 1,
    "kmeans_centroids": 1,
    "dakl_predictions": 1,
    "evaluation_report": 2,  # 2: k-NN on CLIP features, generated-prompt rows
    "prompt_bank": 1,
    "trained_captioners": 2,
    "caption_predictions": 1,
    "unet_swap_report": 1,
}


def code_version(stage: str, **config) -> str:
    """'v<revision>-<hash of config>': a setting that changes results makes the asset stale in the UI."""
    payload = json.dumps(config, sort_keys=True, default=str)
    digest = hashlib.sha1(payload.encode()).hexdigest()[:10]
    return f"v{CODE_REVISIONS[stage]}-{digest}"


def _cell(value) -> str:
    if isinstance(value, float):
        text = f"{value:.4f}"
    elif isinstance(value, (bytes, bytearray)):
        text = f"<{len(value)} bytes>"
    else:
        text = str(value)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "..."


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "_(empty)_"
    headers = list(rows[0].keys())
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(_cell(row.get(h)) for h in headers) + " |" for row in rows]
    return "\n".join(lines)


# ---- metadata helpers: Dagster's standard table entries, typed tables, rounded figures -----------------

DIGITS = 4  # figures in UI metadata are rounded to 4 decimals


def _plain(value, digits: int = DIGITS):
    """A JSON-safe metadata cell: numpy scalars as Python ones, floats rounded, NaN / inf as None."""
    if getattr(value, "ndim", None) == 0:  # a numpy scalar
        value = value.item()
    if isinstance(value, float):
        return round(value, digits) if math.isfinite(value) else None
    return value


def table_schema(frame) -> dg.TableSchema:
    """The TableSchema of a polars frame: one column per field, typed by its polars dtype ("String", ...)."""
    return dg.TableSchema(columns=[dg.TableColumn(name, str(dtype)) for name, dtype in frame.schema.items()])


def table_metadata(frame, partitioned: bool = False) -> dict:
    """dagster/row_count and dagster/column_schema of the table an asset wrote (for a partitioned asset, its
    partition's table, also as dagster/partition_row_count): the catalog shows rows and columns from these."""
    metadata = {
        "dagster/row_count": dg.MetadataValue.int(frame.height),
        "dagster/column_schema": dg.MetadataValue.table_schema(table_schema(frame)),
    }
    if partitioned:
        metadata["dagster/partition_row_count"] = dg.MetadataValue.int(frame.height)
    return metadata


def metadata_table(records: list[dict], columns: list[tuple[str, str]], digits: int = DIGITS) -> dg.TableMetadataValue:
    """Records as a UI table with a schema of (name, type) ``columns``, floats rounded to ``digits``."""
    schema = dg.TableSchema(columns=[dg.TableColumn(name, kind) for name, kind in columns])
    rows = [dg.TableRecord({name: _plain(r.get(name), digits) for name, _ in columns}) for r in records]
    return dg.MetadataValue.table(records=rows, schema=schema)


def rounded_metadata(metadata: dict, digits: int = DIGITS) -> dict:
    """The same metadata with every plain float (and numpy scalar) rounded to ``digits`` decimals."""
    return {
        k: _plain(v, digits) if isinstance(v, float) or getattr(v, "ndim", None) == 0 else v
        for k, v in metadata.items()
    }


def artifact_metadata(path: str, key: str = "path") -> dict:
    """The artifact's path and its SHA-256 (from the sidecar written with it), which readers verify."""
    from pipeline import storage

    record = storage.recorded_hash(path) or {}
    sha = {f"{key}_sha256": record["sha256"]} if record.get("sha256") else {}
    return {key: dg.MetadataValue.path(path), **sha}
