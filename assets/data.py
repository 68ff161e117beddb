"""Data stages: DiffusionDB source -> parts -> filtered pairs -> prompt embeddings, vocabulary, labels.

Thin wiring: read inputs through resources, call pipeline/, write artifacts atomically, attach metadata.
Tables are written by the assets themselves (not an IO manager) so that downstream stages can scan
just the columns they need: filtered_pairs never loads image bytes.
"""

import hashlib
import time

import dagster as dg
import numpy as np
import polars as pl

from assets.common import (
    PROFILE_CONFIG,
    artifact_metadata,
    code_version,
    markdown_table,
    table_metadata,
    transient_retry,
)
from assets.listed_partitions import ListedPartitions
from assets.own_images import image_folders
from pipeline.constants import EMBED_DIM
from pipeline.data import filtering
from pipeline.data import vocabulary as vocab_words
from pipeline.data.embedding import embed_incremental
from resources import DiffusionDBResource, SentenceEncoderResource, StorageResource, Table, Tables, table_in

DATA_GROUP = "data"
parts_partitions = dg.DynamicPartitionsDefinition(name="diffusiondb_part")


@dg.observable_source_asset(
    partitions_def=parts_partitions,
    group_name=DATA_GROUP,
    description="The content of each DiffusionDB part: the sha256 of its zip (the local bytes, or the hub's LFS "
    "sha256). Observed per part by `reverse-sd materialize` and the observe schedule, so a changed part turns "
    "only itself and what reads it stale.",
)
def diffusiondb_source(context: dg.OpExecutionContext, diffusiondb: DiffusionDBResource) -> dg.DataVersionsByPartition:
    return dg.DataVersionsByPartition(changed_part_versions(context.instance, diffusiondb.source().list_parts()))


# The source's parts as partitions (the rule in assets/listed_partitions.py); a source listing no part at all is
# a wrong setting, not news, so it unregisters nothing.
PARTS = ListedPartitions(parts_partitions, dg.AssetKey("diffusiondb_source"), keep_all_when_none_listed=True)
part_changes, sync_parts, changed_part_versions = PARTS.changes, PARTS.sync, PARTS.changed_versions


def register_parts(instance: dg.DagsterInstance, diffusiondb: DiffusionDBResource) -> list[str]:
    """Add every part the source lists as a partition of diffusiondb_parts; return the new ones."""
    return sync_parts(instance, diffusiondb.source().list_parts())[0]


# Parts per run at most when runs cover a range of parts (a UI backfill, or `reverse-sd materialize` on many
# parts): Dagster's per-run cost is paid once per range instead of once per part.
MAX_PARTS_PER_RUN = 50


@dg.asset(
    partitions_def=parts_partitions,
    deps=[diffusiondb_source],
    group_name=DATA_GROUP,
    kinds={"polars", "parquet"},
    code_version=code_version("diffusiondb_parts", image_size=PROFILE_CONFIG.image_size),
    retry_policy=transient_retry(hub=True),
    backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=MAX_PARTS_PER_RUN),
    description="One DiffusionDB part: images decoded once, resized, re-encoded, with prompt and metadata.",
)
def diffusiondb_parts(
    context: dg.AssetExecutionContext, diffusiondb: DiffusionDBResource, storage: StorageResource
) -> dg.MaterializeResult:
    """One part per run, or a range of parts per run; each part gets its own metadata in the UI."""
    source = diffusiondb.source()
    versions = []
    started = time.perf_counter()
    records = skipped = 0
    for part in context.partition_keys:
        zip_path = source.fetch_part(part, cache_dir=storage.local_dir("downloads"))
        metadata = _ingest_part(context, part, zip_path, storage)
        context.add_asset_metadata(metadata, partition_key=part)
        versions.append((part, metadata["source_sha256"]))
        records, skipped = records + metadata["records"], skipped + metadata["skipped"]
    # One line per run, not per part (each event is a database write); each part's figures are in its metadata.
    span = versions[0][0] if len(versions) == 1 else f"{versions[0][0]} .. {versions[-1][0]} ({len(versions)} parts)"
    context.log.info(f"{span}: {records} records kept, {skipped} skipped, {time.perf_counter() - started:.1f} s")
    # A run of one part keeps the zip's sha256 as its data version; a range shares one version (Dagster records
    # one per run), the hash of its parts' hashes.  Each part's own hash is in its metadata (source_sha256).
    version = versions[0][1] if len(versions) == 1 else hashlib.sha256(repr(versions).encode()).hexdigest()
    return dg.MaterializeResult(metadata={"parts_in_run": len(versions)}, data_version=dg.DataVersion(version))


def _ingest_part(context: dg.AssetExecutionContext, part: str, zip_path, storage: StorageResource) -> dict:
    from pipeline.data.diffusiondb import file_sha256, read_part

    started = time.perf_counter()
    result = read_part(zip_path, part, image_size=PROFILE_CONFIG.image_size)
    target = storage.write_table(result.frame, "diffusiondb_parts", part)
    elapsed = time.perf_counter() - started
    for skipped in result.skipped[:50]:
        context.log.warning(f"{part}: skipped {skipped['id']}: {skipped['reason']}")
    skipped_md = markdown_table(
        [{"id": s["id"], "reason": s["reason"]} for s in result.skipped[:100]] or [{"id": "-", "reason": "none"}]
    )
    return {
        "records": result.frame.height,
        "skipped": len(result.skipped),
        "skipped_by_reason": dict(result.counts),
        "skipped_records": dg.MetadataValue.md(skipped_md),
        "seconds": round(elapsed, 2),
        "source_sha256": file_sha256(zip_path),
        **table_metadata(result.frame, partitioned=True),
        **artifact_metadata(target),
        "preview": dg.MetadataValue.md(
            markdown_table(result.frame.select("image_id", "prompt", "seed", "cfg").head(5).to_dicts())
        ),
    }


def _present_parts(context: dg.AssetExecutionContext, parts: Tables, folders: Tables) -> None:
    """Log the registered parts and image folders that have no table yet (they are left out); none of either
    is a Failure."""
    if parts.missing:
        context.log.warning(
            f"{len(parts.missing)} registered parts have no table yet and are left out: {parts.missing[:10]}"
        )
    if folders.missing:
        context.log.warning(f"{len(folders.missing)} registered image folders have no table yet and are left out")
    if not parts and not folders:
        raise dg.Failure(
            "No diffusiondb_parts or image_folders table exists: materialize diffusiondb_parts (or set "
            "REVERSE_SD_IMAGES and materialize image_folders) first."
        )


@dg.asset(
    ins={"parts": table_in(diffusiondb_parts), "folders": table_in(image_folders)},
    group_name=DATA_GROUP,
    kinds={"polars", "parquet"},
    code_version=code_version("filtered_pairs", ratios=PROFILE_CONFIG.split_ratios, seed=PROFILE_CONFIG.split_seed),
    description="The paper's prompt filter over all parts (DiffusionDB's, then the image folders'), and a "
    "deterministic train/val/test split; source is diffusiondb or images, part the DiffusionDB part or subfolder.",
)
def filtered_pairs(
    context: dg.AssetExecutionContext, parts: Tables, folders: Tables, storage: StorageResource
) -> dg.MaterializeResult:
    _present_parts(context, parts, folders)
    columns = ["image_id", "part", "prompt"]
    frame = pl.concat(
        [
            *(t.read(columns).with_columns(source=pl.lit("diffusiondb")) for t in parts.values()),
            *(t.read(columns).with_columns(source=pl.lit("images")) for t in folders.values()),
        ]
    )
    by_source_in = dict(frame.group_by("source").len().iter_rows())
    kept, counts = filtering.filter_report(frame)
    pairs = filtering.assign_split(kept, ratios=PROFILE_CONFIG.split_ratios, seed=PROFILE_CONFIG.split_seed)
    target = storage.write_table(pairs, "filtered_pairs")
    split_counts = dict(pairs.group_by("split").len().sort("split").iter_rows())
    by_source = dict(pairs.group_by("source").len().iter_rows())
    context.log.info(f"filtered_pairs: {frame.height} in, {pairs.height} kept, removed {counts}, split {split_counts}")
    return dg.MaterializeResult(
        metadata={
            "parts": len(parts),
            "image_folders": len(folders),
            "rows_in": frame.height,
            **{f"rows_in_{source}": int(n) for source, n in by_source_in.items()},
            **{f"rows_kept_{source}": int(n) for source, n in by_source.items()},
            "rows_kept": pairs.height,
            **{f"removed_{rule}": int(n) for rule, n in counts.items() if rule != "kept"},
            **{f"split_{name}": int(n) for name, n in split_counts.items()},
            **table_metadata(pairs),
            **artifact_metadata(target),
            "preview": dg.MetadataValue.md(markdown_table(pairs.head(8).to_dicts())),
        }
    )


@dg.asset(
    ins={"pairs": table_in(filtered_pairs)},
    group_name=DATA_GROUP,
    kinds={"pytorch", "parquet"},
    code_version=code_version("prompt_embeddings", model=PROFILE_CONFIG.encoder_model),
    description="all-MiniLM-L6-v2 embedding of every kept prompt; only prompts not embedded before are encoded.",
)
def prompt_embeddings(
    context: dg.AssetExecutionContext,
    pairs: Table,
    storage: StorageResource,
    sentence_encoder: SentenceEncoderResource,
) -> dg.MaterializeResult:
    prompts = pairs.read(["prompt"])["prompt"]
    # its own previous output, the cache of prompts embedded before (not lineage: read by name)
    cache = storage.read_table("prompt_embeddings") if storage.has_table("prompt_embeddings") else None
    encoder = sentence_encoder.encoder()
    started = time.perf_counter()
    embeddings, stats = embed_incremental(prompts, cache, encoder, model_id=encoder.model_id)
    elapsed = time.perf_counter() - started
    target = storage.write_table(embeddings, "prompt_embeddings")
    context.log.info(f"prompt_embeddings: {stats} in {elapsed:.1f} s")
    return dg.MaterializeResult(
        metadata={
            "prompts": embeddings.height,
            **{k: v for k, v in stats.items() if isinstance(v, (int, float, str))},
            "seconds": round(elapsed, 2),
            "prompts_per_s_encoded": round(stats.get("encoded", 0) / elapsed, 1) if elapsed > 0 else 0.0,
            "dimension": int(embeddings["embedding"].dtype.size) if embeddings.height else 0,
            **table_metadata(embeddings),
            **artifact_metadata(target),
        }
    )


@dg.asset(
    ins={"pairs": table_in(filtered_pairs)},
    group_name=DATA_GROUP,
    kinds={"scikitlearn", "parquet"},
    code_version=code_version("vocabulary", k=PROFILE_CONFIG.vocabulary_size),
    description="The top-K content words of the training prompts (the MLC head's classes).",
)
def vocabulary(context: dg.AssetExecutionContext, pairs: Table, storage: StorageResource) -> dg.MaterializeResult:
    train_prompts = pairs.read(["prompt", "split"]).filter(pl.col("split") == "train")["prompt"]
    words = vocab_words.build_vocabulary(train_prompts, k=PROFILE_CONFIG.vocabulary_size)
    target = storage.write_table(words, "vocabulary")
    return dg.MaterializeResult(
        metadata={
            "words": words.height,
            "training_prompts": train_prompts.len(),
            "top_words": dg.MetadataValue.md(markdown_table(words.head(20).to_dicts())),
            **table_metadata(words),
            **artifact_metadata(target),
        }
    )


@dg.asset(
    ins={"pairs": table_in(filtered_pairs), "vocab": table_in(vocabulary)},
    group_name=DATA_GROUP,
    kinds={"scikitlearn", "parquet"},
    code_version=code_version("vocabulary_labels"),
    description="Sparse multi-hot vocabulary labels (sorted word indices) for every kept pair.",
)
def vocabulary_labels(
    context: dg.AssetExecutionContext, pairs: Table, vocab: Table, storage: StorageResource
) -> dg.MaterializeResult:
    frame, words = pairs.read(["image_id", "prompt"]), vocab.read()
    table = frame.select("image_id").with_columns(vocab_words.label_series(frame["prompt"], words))
    target = storage.write_table(table, "vocabulary_labels")
    sizes = table["label_indices"].list.len()
    return dg.MaterializeResult(
        metadata={
            "pairs": table.height,
            "mean_labels_per_pair": round(float(sizes.mean() or 0.0), 2),
            "pairs_without_label": int((sizes == 0).sum()),
            **table_metadata(table),
            **artifact_metadata(target),
        }
    )


# ---- checks beside the assets ---------------------------------------------------------------------


@dg.asset_check(asset=prompt_embeddings, blocking=True, description="Finite, 384-d, unit-norm embeddings.")
def prompt_embeddings_are_unit_vectors(storage: StorageResource) -> dg.AssetCheckResult:
    frame = storage.read_table("prompt_embeddings", columns=["embedding"])
    matrix = frame["embedding"].to_numpy()
    finite = bool(np.isfinite(matrix).all())
    dim = int(matrix.shape[1]) if matrix.ndim == 2 else -1
    norms = np.linalg.norm(matrix.astype(np.float64), axis=1) if matrix.size else np.ones(1)
    worst = float(np.abs(norms - 1.0).max())
    return dg.AssetCheckResult(
        passed=finite and dim == EMBED_DIM and worst < 1e-3,
        metadata={"finite": finite, "dimension": dim, "max_norm_error": worst, "rows": frame.height},
    )


@dg.asset_check(asset=filtered_pairs, blocking=True, description="No prompt appears in two splits.")
def no_prompt_in_two_splits(storage: StorageResource) -> dg.AssetCheckResult:
    pairs = storage.read_table("filtered_pairs", columns=["prompt", "split"])
    leaking = pairs.group_by("prompt").agg(pl.col("split").n_unique().alias("splits")).filter(pl.col("splits") > 1)
    return dg.AssetCheckResult(
        passed=leaking.height == 0,
        metadata={"prompts_in_several_splits": leaking.height, "examples": str(leaking["prompt"].head(5).to_list())},
    )


def _splits_hold_pairs(storage: StorageResource, splits: tuple[str, ...]) -> dg.AssetCheckResult:
    pairs = storage.read_table("filtered_pairs", columns=["split"])
    counts = {name: 0 for name in splits} | {k: v for k, v in pairs.group_by("split").len().iter_rows() if k in splits}
    empty = [name for name in splits if counts[name] == 0]
    return dg.AssetCheckResult(
        passed=not empty,
        severity=dg.AssetCheckSeverity.ERROR if "train" in splits else dg.AssetCheckSeverity.WARN,
        metadata={
            **{f"split_{name}": int(n) for name, n in counts.items()},
            "empty_splits": ", ".join(empty) or "none",
            **({"remedy": "more pairs: more DiffusionDB parts or image folders"} if empty else {}),
        },
    )


@dg.asset_check(
    asset=filtered_pairs,
    blocking=True,
    description="Train and val each hold at least one pair: training and model selection need both, so too little "
    "data stops here rather than after the preliminary epochs.",
)
def train_and_val_hold_pairs(storage: StorageResource) -> dg.AssetCheckResult:
    return _splits_hold_pairs(storage, ("train", "val"))


@dg.asset_check(
    asset=filtered_pairs,
    description="The test split holds at least one pair (a warning: without one, the report and "
    "caption_predictions have nothing to score; embeddings, the prompt bank and training still run).",
)
def has_test_pairs(storage: StorageResource) -> dg.AssetCheckResult:
    return _splits_hold_pairs(storage, ("test",))


@dg.asset_check(
    asset=vocabulary_labels,
    additional_ins={"vocab": table_in(vocabulary)},
    blocking=True,
    description="Every label index is a vocabulary word.",
)
def labels_within_vocabulary(storage: StorageResource, vocab: Table) -> dg.AssetCheckResult:
    labels = storage.read_table("vocabulary_labels", columns=["label_indices"])["label_indices"].explode().drop_nulls()
    size = vocab.read(["word"]).height
    bad = int(((labels < 0) | (labels >= size)).sum())
    return dg.AssetCheckResult(passed=bad == 0, metadata={"out_of_range": bad, "vocabulary_size": size})


DATA_ASSETS = [diffusiondb_source, diffusiondb_parts, filtered_pairs, prompt_embeddings, vocabulary, vocabulary_labels]
DATA_CHECKS = [
    prompt_embeddings_are_unit_vectors,
    no_prompt_in_two_splits,
    train_and_val_hold_pairs,
    has_test_pairs,
    labels_within_vocabulary,
]
