"""Training stages: preliminary-epoch difficulty per backbone, then baseline / mlc / mlc_cl models per
backbone x recipe, and their predicted embeddings.  Training runs in the "gpu" concurrency pool."""

import os
import time

import dagster as dg
import numpy as np
import polars as pl

from assets.common import (
    OBSERVE_CRON,
    PROFILE_CONFIG,
    SETTINGS,
    artifact_metadata,
    code_version,
    markdown_table,
    table_metadata,
)
from assets.data import filtered_pairs, prompt_embeddings, vocabulary, vocabulary_labels
from assets.listed_partitions import latest_observed_versions
from assets.own_images import table_of
from assets.plots import histogram_png, line_plot_png, md_image
from pipeline.constants import BACKBONE_NAMES
from pipeline.constants import RECIPES as RECIPE_NAMES
from pipeline.metrics import mean_cosine, mean_embedding_baseline
from pipeline.training.pairs import (
    SplitData,
    embedding_series,
    join_pairs,
    load_split,
    split_rows,
)
from resources import ComputeResource, StorageResource, Table, Tables, directory_in, table_in
from resources.settings import PROJECT_DIR

TRAIN_GROUP = "training"
BACKBONES = list(BACKBONE_NAMES)
RECIPES = list(RECIPE_NAMES)
backbone_partitions = dg.StaticPartitionsDefinition(BACKBONES)
model_partitions = dg.MultiPartitionsDefinition(
    {"backbone": backbone_partitions, "recipe": dg.StaticPartitionsDefinition(RECIPES)}
)
TRAIN = PROFILE_CONFIG.training  # the settings every backbone shares unless overridden


def training_spec(backbone: str):
    return PROFILE_CONFIG.training_for(backbone)


@dg.observable_source_asset(
    partitions_def=backbone_partitions,
    group_name=TRAIN_GROUP,
    # Observed once when it never was (so automation can train on a UI-only deployment), then daily.
    automation_condition=(
        dg.AutomationCondition.missing().newly_true() | dg.AutomationCondition.cron_tick_passed(OBSERVE_CRON)
    ).with_label("observe once, then daily"),
    description="The result-changing training settings of each backbone (epochs, lr, batch size, lambda, seed). "
    "Its data version per backbone is a hash of them, so changing one backbone's settings turns exactly that "
    "backbone's difficulty scores and models stale. Observed by `reverse-sd materialize` and the observe schedule.",
)
def training_settings() -> dg.DataVersionsByPartition:
    return dg.DataVersionsByPartition(training_settings_versions())


def training_settings_versions() -> dict[str, str]:
    """backbone -> the data version training_settings reports now (a dry run compares it, observing nothing)."""
    return {b: code_version("training_settings", **training_spec(b).as_dict()) for b in BACKBONES}


def changed_settings_versions(instance: dg.DagsterInstance) -> dict[str, str]:
    """backbone -> its settings' version now, where that differs from the last one observed (or none was)."""
    latest = latest_observed_versions(instance, training_settings.key)
    return {b: v for b, v in training_settings_versions().items() if latest.get(b) != v}


_BY_BACKBONE = dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name="backbone")


def load_splits(
    storage: StorageResource, splits=("train", "val", "test"), *, pairs: Table, embeddings: Table, labels: Table
) -> dict[str, SplitData]:
    """The pairs of ``splits`` with their images: each split's images a memory-mapped file under the storage
    root's local cache (pipeline.data.image_store), the missing ones built together in one pass over the parts
    and reused while the parts and the splits are unchanged.  ``pairs``, ``embeddings``, ``labels``: the
    filtered_pairs, prompt_embeddings and vocabulary_labels tables (the caller's ins); the images are read
    from the parts' and image folders' tables the pairs name."""
    from pipeline.data.image_store import split_images_many

    joined = join_pairs(pairs.read(), embeddings.read(), labels.read())
    rows = {s: split_rows(joined, s) for s in splits}

    # An image folder's pairs are read from its own table: their part key here is "images/<subfolder>" (a
    # DiffusionDB part key has no slash, so the two never meet).
    def table(key: str) -> tuple[str, str]:
        return table_of("images", key.removeprefix("images/")) if key.startswith("images/") else table_of("", key)

    def read_part(key: str, ids: list[str]) -> pl.DataFrame:
        images = storage.read_table(*table(key), columns=["image_id", "image"])
        return images.filter(pl.col("image_id").is_in(ids))

    def keyed(r: pl.DataFrame) -> pl.DataFrame:
        if "source" not in r.columns:
            return r.select("image_id", "part")
        own = pl.col("source") == "images"
        return r.select(
            "image_id", pl.when(own).then(pl.lit("images/") + pl.col("part")).otherwise("part").alias("part")
        )

    images = split_images_many(
        {s: keyed(r) for s, r in rows.items()},
        read_part,
        lambda key: storage.fingerprint(*table(key)),
        storage.local_dir("image_cache"),
    )
    return {s: load_split(rows[s], *images[s]) for s in splits}


def vocab_size(vocab: Table) -> int:
    return vocab.read(["word"]).height


def _train_config(compute: ComputeResource, backbone: str, recipe: str, **overrides):
    from pipeline.training.loop import TrainConfig

    spec = training_spec(backbone)
    return TrainConfig(
        epochs=overrides.pop("epochs", spec.epochs),
        batch_size=spec.batch_size,
        lr=spec.lr,
        lambda_vocab=0.0 if recipe == "baseline" else spec.lambda_vocab,
        seed=spec.seed,
        device=compute.device,
        num_workers=compute.num_workers,
        **overrides,
    )


def _create(backbone: str, compute: ComputeResource, vocab_size: int):
    from pipeline.models import create_model
    from pipeline.training.loop import seed_everything

    seed_everything(training_spec(backbone).seed)  # the same initial weights on every run
    model = create_model(
        backbone, variant=compute.backbone_variant, vocab_size=vocab_size, pretrained=compute.pretrained
    )
    return model


@dg.asset(
    partitions_def=backbone_partitions,
    deps=[training_settings],
    ins={
        "pairs": table_in(filtered_pairs),
        "embeddings": table_in(prompt_embeddings),
        "labels": table_in(vocabulary_labels),
    },
    group_name=TRAIN_GROUP,
    kinds={"pytorch", "parquet"},
    pool="gpu",
    code_version=code_version("difficulty_scores"),
    description="Preliminary epochs recording each training sample's cosine; difficulty = mean (higher = easier).",
)
def difficulty_scores(
    context: dg.AssetExecutionContext,
    pairs: Table,
    embeddings: Table,
    labels: Table,
    storage: StorageResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    from pipeline.training.curriculum import bucket_by_difficulty, difficulty_from_history
    from pipeline.training.loop import data_path, preliminary_cosines, run_figures

    backbone = context.partition_key
    splits = load_splits(storage, ("train",), pairs=pairs, embeddings=embeddings, labels=labels)
    train = splits["train"]
    # the vocabulary's size (not a declared parent: vocabulary_labels, which is, is built from it)
    model = _create(backbone, compute, vocab_size(Table(storage, "vocabulary")))
    preliminary_epochs = training_spec(backbone).preliminary_epochs
    config = _train_config(compute, backbone, "mlc", epochs=preliminary_epochs)
    started = time.perf_counter()
    run_metrics: dict = {}
    data = data_path(
        {"train": train},
        model,
        storage.local_dir("feature_cache"),
        num_workers=compute.num_workers,
        pixel_cache_bytes=compute.pixel_cache_bytes,
    )
    history = preliminary_cosines(model, data, config, epochs=preliminary_epochs, metrics=run_metrics)
    difficulty = difficulty_from_history(history)
    buckets = bucket_by_difficulty(difficulty)
    table = pl.DataFrame(
        {"image_id": train.image_ids, "difficulty": difficulty.astype(np.float32), "bucket": list(buckets)}
    )
    target = storage.write_table(table, "difficulty_scores", backbone)
    counts = dict(table.group_by("bucket").len().iter_rows())
    context.log.info(f"difficulty_scores[{backbone}]: {counts} in {time.perf_counter() - started:.1f} s")
    return dg.MaterializeResult(
        metadata={
            "samples": table.height,
            **{f"bucket_{k}": int(v) for k, v in counts.items()},
            "epoch_mean_cosines": [float(x) for x in history.mean(axis=1)],
            "histogram": dg.MetadataValue.md(
                md_image(histogram_png({"difficulty (mean cosine)": difficulty}, f"{backbone}: difficulty"))
            ),
            "seconds": round(time.perf_counter() - started, 1),
            **run_figures(run_metrics),
            **table_metadata(table, partitioned=True),
            **artifact_metadata(target),
        }
    )


def _split_key(context) -> tuple[str, str]:
    """(backbone, recipe): a run launched through the queue carries the key as its "vit|mlc" string."""
    keys = model_partitions.get_partition_key_from_str(str(context.partition_key)).keys_by_dimension
    return keys["backbone"], keys["recipe"]


@dg.asset(
    partitions_def=model_partitions,
    deps=[dg.AssetDep(training_settings, partition_mapping=_BY_BACKBONE)],
    ins={
        "pairs": table_in(filtered_pairs),
        "embeddings": table_in(prompt_embeddings),
        "vocab": table_in(vocabulary),
        "labels": table_in(vocabulary_labels),
        "difficulty": table_in(difficulty_scores, _BY_BACKBONE),
    },
    group_name=TRAIN_GROUP,
    kinds={"pytorch", "safetensors"},
    pool="gpu",
    code_version=code_version("trained_models"),
    description="A backbone trained from scratch with one recipe: baseline (cosine), mlc (+ vocabulary head), "
    "mlc_cl (+ curriculum: easy, easy+medium, all, all).",
)
def trained_models(
    context: dg.AssetExecutionContext,
    pairs: Table,
    embeddings: Table,
    vocab: Table,
    labels: Table,
    difficulty: Tables,
    storage: StorageResource,
    compute: ComputeResource,
    pipes: dg.PipesSubprocessClient,
) -> dg.MaterializeResult:
    from pipeline.training.curriculum import aligned_stages
    from pipeline.training.loop import data_path, run_figures, train_model

    backbone, recipe = _split_key(context)
    splits = load_splits(storage, ("train", "val"), pairs=pairs, embeddings=embeddings, labels=labels)
    train, val = splits["train"], splits["val"]
    n_words = 0 if recipe == "baseline" else vocab_size(vocab)
    stages = None
    if recipe == "mlc_cl":
        scores = difficulty.partition(backbone).read(["image_id", "bucket"])
        stages = aligned_stages(train.image_ids, scores["image_id"].to_list(), scores["bucket"].to_list())
    config = _train_config(compute, backbone, recipe)
    checkpoint_dir = storage.path("trained_models", backbone, recipe)

    def on_log(record: dict) -> None:
        context.log.info(f"{backbone}/{recipe}: " + ", ".join(f"{k}={v}" for k, v in record.items()))

    nodes = rendezvous(SETTINGS)
    if compute.nproc_per_node > 1 or nodes:
        model_kwargs = dict(
            backbone=backbone, variant=compute.backbone_variant, vocab_size=n_words, pretrained=compute.pretrained
        )
        # several nodes: no one local directory every rank sees, so each rank runs the frozen prefix itself
        cache = None if nodes else storage.local_dir("feature_cache")
        shared = storage.path("ddp_runs", context.run_id, backbone, recipe) if nodes else None
        result = _train_with_torchrun(
            context, pipes, compute, model_kwargs, train, val, config, checkpoint_dir, stages, cache, nodes, shared
        )
    else:
        model = _create(backbone, compute, n_words)
        data = data_path(
            {"train": train, "val": val},
            model,
            storage.local_dir("feature_cache"),
            num_workers=compute.num_workers,
            pixel_cache_bytes=compute.pixel_cache_bytes,
        )
        result = train_model(
            model,
            data,
            config=config,
            checkpoint_dir=checkpoint_dir,
            stages=stages,
            on_log=on_log,
            recipe=recipe,
            log=context.log,  # a damaged or foreign checkpoint passed over is a warning in the run's log
        )
    history = result.history
    curves = {
        "val cosine": [h["val_cosine"] for h in history],
        "train cosine": [h["train_cosine"] for h in history],
    }
    return dg.MaterializeResult(
        metadata={
            "best_val_cosine": float(result.best_val_cosine),
            "final_val_cosine": float(result.final_val_cosine),
            "images_per_s": float(result.images_per_s),
            **run_figures(result.to_dict()),
            "world_size": int(result.extra.get("world_size", 1)),
            "epochs": len(history),
            **artifact_metadata(str(result.checkpoint_path), "checkpoint"),
            "curves": dg.MetadataValue.md(md_image(line_plot_png(curves, f"{backbone}/{recipe}", "epoch", "cosine"))),
            "history": dg.MetadataValue.md(markdown_table(history)),
        }
    )


def rendezvous(settings) -> dict | None:
    """The torchrun rendezvous of multi-node training from the settings (REVERSE_SD_TRAIN_NNODES > 1), as
    keyword arguments of pipeline.training.ddp.torchrun_command / join_command; None on one node."""
    if settings.train_nnodes <= 1:
        return None
    return {
        "nnodes": settings.train_nnodes,
        "rdzv_endpoint": settings.train_rdzv_endpoint,
        "rdzv_id": settings.train_rdzv_id,
        "join_timeout_s": settings.train_join_timeout_s,
    }


def _train_with_torchrun(
    context,
    pipes,
    compute,
    model_kwargs,
    train,
    val,
    config,
    checkpoint_dir,
    stages,
    cache_dir=None,
    nodes: dict | None = None,
    shared_dir: str | None = None,
):
    """DistributedDataParallel over compute.nproc_per_node processes: torchrun launched through Dagster
    Pipes (its output streams into the run's logs), pipeline.training.ddp in each process, the same
    checkpoints and resume as in-process training.

    ``nodes`` (from ``rendezvous``): this step's torchrun is node 0 of a multi-node run; it hosts the c10d
    rendezvous and waits for the other nodes' agents (the join command, logged here).  The spec and its
    files then go to ``shared_dir`` on the storage root, which every node reads (an object store or a shared
    filesystem), and are removed when the step ends."""
    import contextlib
    import json
    import tempfile

    from pipeline import storage as artifact_storage
    from pipeline.training.ddp import join_command, torchrun_command, write_spec
    from pipeline.training.loop import TrainResult

    with_labels = model_kwargs["vocab_size"] > 0
    with contextlib.ExitStack() as stack:
        if shared_dir:
            stack.callback(_remove_tree, shared_dir)
        workdir = shared_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="reverse-sd-ddp-"))
        spec = write_spec(
            workdir,
            model_kwargs=model_kwargs,
            train=(train.images, train.targets, train.labels if with_labels else None),
            val=(val.images, val.targets, val.labels if with_labels else None),
            config=config,
            checkpoint_dir=checkpoint_dir,
            stages=stages,
            cache_dir=cache_dir,
            shared=nodes is not None,
            pixel_cache_bytes=compute.pixel_cache_bytes,
        )
        command = torchrun_command(spec, compute.nproc_per_node, **(nodes or {}))
        context.log.info("launching " + " ".join(command))
        if nodes:
            context.log.info(
                f"waiting up to {nodes['join_timeout_s']} s for the other {nodes['nnodes'] - 1} node(s); on each run "
                "(same project, same REVERSE_SD_HOME): " + " ".join(join_command(compute.nproc_per_node, **nodes))
            )
        launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        env = {k: v for k, v in os.environ.items() if k not in launcher_vars}  # torchrun sets its own
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_DIR), env.get("PYTHONPATH")]))
        pipes.run(command=command, context=context, env=env, cwd=str(PROJECT_DIR))
        metrics_path = f"{workdir.rstrip('/')}/metrics.json"
        with artifact_storage.verified_local_copy(metrics_path) as local:
            metrics = json.loads(local.read_text())
    return TrainResult(**metrics)


def _remove_tree(url: str) -> None:
    """Best effort: a multi-node run's spec files on the storage root, once its step ends."""
    import contextlib
    import shutil

    from pipeline.storage import as_path

    p = as_path(url)
    with contextlib.suppress(OSError, FileNotFoundError):
        if hasattr(p, "fs"):
            p.fs.rm(p.path, recursive=True)  # an object store has no directories to leave behind
            return
        shutil.rmtree(p)
        for parent in p.parents:  # <recipe>, <backbone>, <run id>, ddp_runs: while empty
            if parent.name == "ddp_runs":
                parent.rmdir()
                break
            parent.rmdir()


@dg.asset(
    partitions_def=model_partitions,
    ins={"checkpoints": directory_in(trained_models)},
    group_name=TRAIN_GROUP,
    kinds={"pytorch", "parquet"},
    pool="gpu",  # a full backbone over every pair: at DiffusionDB scale this is GPU work
    code_version=code_version("model_predictions"),
    description="Predicted embeddings of a trained model for every train / val / test pair.",
)
def model_predictions(
    context: dg.AssetExecutionContext, checkpoints: Tables, storage: StorageResource, compute: ComputeResource
) -> dg.MaterializeResult:
    from pipeline.training.checkpoint import latest_checkpoint, load_model
    from pipeline.training.data import data_path
    from pipeline.training.inference import predict_embeddings

    backbone, recipe = _split_key(context)
    checkpoint = latest_checkpoint(checkpoints.partition(f"{backbone}|{recipe}").directory)
    if checkpoint is None:
        raise dg.Failure(f"no checkpoint for {backbone}/{recipe}: materialize trained_models first")
    model = load_model(checkpoint)
    # the pairs, targets and labels of every split: not declared parents (trained_models, which is, reads them)
    tables = {name: Table(storage, name) for name in ("filtered_pairs", "prompt_embeddings", "vocabulary_labels")}
    splits = load_splits(
        storage,
        pairs=tables["filtered_pairs"],
        embeddings=tables["prompt_embeddings"],
        labels=tables["vocabulary_labels"],
    )
    data = data_path(
        splits,
        model,
        storage.local_dir("feature_cache"),
        num_workers=compute.num_workers,
        pixel_cache_bytes=compute.pixel_cache_bytes,
    )
    frames, metadata = [], {}
    for name, split in splits.items():
        run_metrics: dict = {}
        predictions = predict_embeddings(model, data, TRAIN.batch_size, compute.device, split=name, metrics=run_metrics)
        cache = run_metrics.get("feature_cache") or {}
        # "pixels built", "features reused", "none": what the split was read from
        what = "built" if cache.get("built") else ("reused" if cache.get("used") else None)
        metadata[f"{name}_feature_cache"] = f"{cache.get('kind', 'features')} {what}" if what else "none"
        metadata[f"{name}_cosine"] = mean_cosine(predictions, split.targets) if len(split) else float("nan")
        frames.append(
            pl.DataFrame({"image_id": split.image_ids, "split": [name] * len(split)}).with_columns(
                embedding_series("embedding", predictions)
            )
        )
    table = pl.concat(frames)
    target = storage.write_table(table, "model_predictions", f"{backbone}|{recipe}")
    metadata["val_mean_embedding_baseline"] = mean_embedding_baseline(splits["train"].targets, splits["val"].targets)
    return dg.MaterializeResult(
        metadata={
            **metadata,
            "rows": table.height,
            **table_metadata(table, partitioned=True),
            **artifact_metadata(target),
        }
    )


BLOCK_ON_BASELINE = SETTINGS.baseline_check == "block"  # REVERSE_SD_BASELINE_CHECK


@dg.asset_check(
    asset=model_predictions,
    blocking=BLOCK_ON_BASELINE,
    partitions_def=model_partitions,
    description="The model beats the mean-training-embedding baseline on val (checked per model partition)"
    + ("." if BLOCK_ON_BASELINE else "; REVERSE_SD_BASELINE_CHECK=warn: a failure is flagged, it stops nothing."),
)
def beats_mean_embedding_baseline(
    context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> dg.AssetCheckResult:
    key = context.partition_key
    joined = join_pairs(storage.read_table("filtered_pairs"), storage.read_table("prompt_embeddings"), None)
    train = joined.filter(pl.col("split") == "train")["embedding"].to_numpy()
    val = joined.filter(pl.col("split") == "val")
    baseline = float(mean_embedding_baseline(train, val["embedding"].to_numpy()))
    preds = storage.read_table("model_predictions", key).filter(pl.col("split") == "val")
    merged = preds.join(val.select("image_id", pl.col("embedding").alias("target")), on="image_id")
    cosine = float(mean_cosine(merged["embedding"].to_numpy(), merged["target"].to_numpy()))
    # Blocking: a model that does not beat the mean training embedding must not feed the ensemble (unless the
    # operator chose warn, e.g. for a sample too small to learn from).
    return dg.AssetCheckResult(
        passed=cosine > baseline,
        severity=dg.AssetCheckSeverity.ERROR if BLOCK_ON_BASELINE else dg.AssetCheckSeverity.WARN,
        metadata={
            "model": key,
            "val_cosine": round(cosine, 4),
            "baseline_val_cosine": round(baseline, 4),
            "margin": round(cosine - baseline, 4),
            "val_images": merged.height,
        },
    )


TRAINING_ASSETS = [training_settings, difficulty_scores, trained_models, model_predictions]
TRAINING_CHECKS = [beats_mean_embedding_baseline]
