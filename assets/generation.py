"""Beyond the embedding: captioners fine-tuned to write the prompt (vocabulary head + curriculum),
their prompts scored as the Kaggle competition scores them (SBERT cosine) and by RefCLIPScore, and the
fine-tuned U-Net encoder put back into Stable Diffusion after the first DDIM step.

Thin wiring over pipeline/captioning/recipe.py and pipeline/evaluation/unet_swap.py.  The sample profile runs tiny
random-init twins of every model (captioner, CLIP scorer, Stable Diffusion); its CLIP-based scores exercise the
code path and measure nothing, which the metadata says.
"""

import functools
import inspect
import time

import dagster as dg
import polars as pl

from assets.common import PROFILE_CONFIG, artifact_metadata, code_version, markdown_table, table_metadata
from assets.data import filtered_pairs, prompt_embeddings, vocabulary, vocabulary_labels
from assets.ensemble import target_embeddings
from assets.jobs import GPU_POOL
from assets.plots import line_plot_png, md_image
from assets.training import BACKBONES, difficulty_scores, load_splits, trained_models, training_spec, vocab_size
from resources import ComputeResource, SentenceEncoderResource, StorageResource, Table, Tables, directory_in, table_in

GEN_GROUP = "generation"
CAPTION = PROFILE_CONFIG.captioning
captioner_partitions = dg.StaticPartitionsDefinition(list(CAPTION.captioners))
SWAP_RECIPES = ("mlc_cl", "mlc", "baseline")  # the encoder swapped in: the first of these that was trained
TRAIN_SETTINGS = {
    k: getattr(CAPTION, k)
    for k in ("stage_epochs", "batch_size", "lr", "lambda_vocab", "difficulty", "preliminary_epochs", "seed")
}
DECODE_SETTINGS = {k: getattr(CAPTION, k) for k in ("num_beams", "no_repeat_ngram_size", "clip_model")}
SWAP_SETTINGS = {
    k: getattr(CAPTION, k) for k in ("swap_prompts", "swap_steps", "swap_size", "swap_guidance", "seed", "clip_model")
}
NOT_A_MEASURE = "tiny random-init CLIP (sample profile): CLIP-based scores exercise the code path, they measure nothing"


def _in_tiny_threads(body):
    """The asset body ``body`` run with one torch thread for the tiny models on CPU (pipeline.captioning.recipe)."""

    @functools.wraps(body)
    def run(*args, **kwargs):
        from pipeline.captioning.recipe import tiny_threads

        compute = inspect.signature(body).bind(*args, **kwargs).arguments["compute"]
        with tiny_threads(compute.backbone_variant, compute.device):
            return body(*args, **kwargs)

    return run


def _note(compute: ComputeResource) -> dict:
    return {"note": NOT_A_MEASURE} if compute.backbone_variant == "tiny" else {}


@dg.asset(
    partitions_def=captioner_partitions,
    ins={
        "pairs": table_in(filtered_pairs),
        "embeddings": table_in(prompt_embeddings),
        "vocab": table_in(vocabulary),
        "labels": table_in(vocabulary_labels),
        "difficulty": table_in(difficulty_scores, dg.AllPartitionMapping()),
    },
    group_name=GEN_GROUP,
    kinds={"pytorch", "safetensors"},
    pool=GPU_POOL,
    code_version=code_version("trained_captioners", **TRAIN_SETTINGS),
    description="A captioner (BLIP, or BLIP-2 via REVERSE_SD_CAPTIONERS) fine-tuned to write the prompt: "
    "LM loss + lambda * BCE of a vocabulary head "
    "on the pooled vision features, curriculum easy, easy+medium, all, all.",
)
@_in_tiny_threads
def trained_captioners(
    context: dg.AssetExecutionContext,
    pairs: Table,
    embeddings: Table,
    vocab: Table,
    labels: Table,
    difficulty: Tables,
    storage: StorageResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    from pipeline.captioning.recipe import DIFFICULTY_SOURCES, fit_recipe

    name = context.partition_key
    if CAPTION.difficulty not in DIFFICULTY_SOURCES:
        raise dg.Failure(f"captioning difficulty {CAPTION.difficulty!r} is not one of: {', '.join(DIFFICULTY_SOURCES)}")
    started = time.perf_counter()
    splits = load_splits(storage, ("train", "val"), pairs=pairs, embeddings=embeddings, labels=labels)
    by_backbones = CAPTION.difficulty == "backbones"
    scores = {b: difficulty[b].read(["image_id", "difficulty"]) for b in BACKBONES if b in difficulty and by_backbones}

    def on_log(record: dict) -> None:
        fields = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        context.log.info(f"{name}: " + ", ".join(fields))

    run = fit_recipe(
        name,
        CAPTION,
        splits["train"],
        splits["val"],
        vocab_size(vocab),
        scores,
        variant=compute.backbone_variant,
        pretrained=compute.pretrained,
        device=compute.device,
        num_workers=compute.num_workers,
        directory=storage.path("trained_captioners", name),
        progress_dir=storage.path("trained_captioners", name, "progress"),  # per-epoch, so a killed run resumes
        on_log=on_log,
        warn=context.log.warning,
    )
    history = run.history
    curves = {"train LM loss": [h["train_lm"] for h in history], "val LM loss": [h["val_lm"] for h in history]}
    return dg.MaterializeResult(
        metadata={
            **run.figures(),  # at the selected (lowest-val-LM-loss) epoch
            "seconds": round(time.perf_counter() - started, 1),
            **artifact_metadata(run.weights, "checkpoint"),
            "curves": dg.MetadataValue.md(md_image(line_plot_png(curves, f"{name}: LM loss", "epoch", "loss"))),
            "history": dg.MetadataValue.md(markdown_table(history)),
            "val_samples": dg.MetadataValue.md(markdown_table([{"true": t, "generated": g} for t, g in run.preview])),
        }
    )


@dg.asset(
    partitions_def=captioner_partitions,
    ins={
        "captioner": directory_in(trained_captioners),
        "pairs": table_in(filtered_pairs),
        "embeddings": table_in(prompt_embeddings),
    },
    group_name=GEN_GROUP,
    kinds={"pytorch", "parquet"},
    pool=GPU_POOL,  # beam search of the captioner over the test images
    code_version=code_version("caption_predictions", **DECODE_SETTINGS),
    check_specs=[dg.AssetCheckSpec("generated_prompt_per_test_image", asset="caption_predictions")],
    description="Generated prompts for the test split with their SBERT cosine to the true prompt (the Kaggle "
    "metric) and RefCLIPScore; caption_predictions/<captioner>.parquet.",
)
@_in_tiny_threads
def caption_predictions(
    context: dg.AssetExecutionContext,
    captioner: Tables,
    pairs: Table,
    embeddings: Table,
    storage: StorageResource,
    compute: ComputeResource,
    sentence_encoder: SentenceEncoderResource,
) -> dg.MaterializeResult:
    from pipeline.captioning.recipe import score_captions
    from pipeline.training.checkpoint import latest_checkpoint
    from pipeline.training.loop import resolve_device

    name = context.partition_key
    directory = captioner.partition(name).directory
    if latest_checkpoint(directory) is None:
        raise dg.Failure(f"no checkpoint for captioner {name!r}: materialize trained_captioners first")
    # the split's images and labels: vocabulary_labels is no declared parent, read by name
    labels = Table(storage, "vocabulary_labels")
    test = load_splits(storage, ("test",), pairs=pairs, embeddings=embeddings, labels=labels)["test"]
    if not len(test):
        raise dg.Failure("the test split is empty: no image to write a prompt for")
    started = time.perf_counter()
    train = target_embeddings(pairs, embeddings).filter(pl.col("split") == "train")
    scored = score_captions(
        directory,
        CAPTION,
        test,
        train["target"].to_numpy().astype("float32"),
        sentence_encoder.encoder().encode,
        variant=compute.backbone_variant,
        device=str(resolve_device(compute.device)),
    )
    table = scored.table
    target = storage.write_table(table, "caption_predictions", name)
    check = dg.AssetCheckResult(
        check_name="generated_prompt_per_test_image",
        passed=table.height == len(test) and scored.finite,
        metadata={"rows": table.height, "test_pairs": len(test), "empty": scored.empty, "finite": scored.finite},
    )
    return dg.MaterializeResult(
        metadata={
            **scored.figures(),
            **_note(compute),
            "seconds": round(time.perf_counter() - started, 1),
            "preview": dg.MetadataValue.md(
                markdown_table(table.select("prompt", "generated", "sbert_cosine", "refclip_s").head(8).to_dicts())
            ),
            **table_metadata(table, partitioned=True),
            **artifact_metadata(target),
        },
        check_results=[check],
    )


@dg.asset(
    ins={
        "models": directory_in(
            trained_models, dg.SpecificPartitionsPartitionMapping([f"unet|{r}" for r in SWAP_RECIPES])
        )
    },
    group_name=GEN_GROUP,
    kinds={"pytorch", "png"},
    pool=GPU_POOL,
    code_version=code_version("unet_swap_report", **SWAP_SETTINGS),
    description="Stable Diffusion 2 with and without the fine-tuned U-Net encoder swapped in after the first DDIM "
    "step: images for a fixed prompt list, CLIP prompt alignment side by side, reports/unet_swap.{png,json,md}.",
)
@_in_tiny_threads
def unet_swap_report(
    context: dg.AssetExecutionContext, models: Tables, storage: StorageResource, compute: ComputeResource
) -> dg.MaterializeResult:
    from pipeline.evaluation.unet_swap import first_checkpoint, swap_report, write_swap_report
    from pipeline.training.loop import resolve_device

    started = time.perf_counter()
    found = first_checkpoint([(r, models.partition(f"unet|{r}").directory) for r in SWAP_RECIPES])
    if found is None:
        raise dg.Failure("no trained unet model: materialize trained_models for backbone unet first")
    recipe, checkpoint = found
    summary = swap_report(
        checkpoint,
        f"unet/{recipe}",
        CAPTION,
        variant=compute.backbone_variant,
        device=str(resolve_device(compute.device)),
        tiny_seed=training_spec("unet").seed,  # the tiny twin: the seed the unet backbone was initialised with
    )
    grid, table_md, reports = summary.pop("grid"), markdown_table(summary["prompts"]), storage.path("reports")
    write_swap_report(reports, summary, grid, table_md)
    return dg.MaterializeResult(
        metadata={
            "clip_score_sd": summary["clip_score_sd"],
            "clip_score_swap": summary["clip_score_swap"],
            "mean_abs_pixel_change": summary["mean_abs_pixel_change"],
            "encoder": summary["encoder"],
            "pipeline": summary["pipeline"],
            **_note(compute),
            "table": dg.MetadataValue.md(table_md),
            "grid": dg.MetadataValue.md(md_image(grid, "with and without the swap")),
            "seconds": round(time.perf_counter() - started, 1),
            "png": dg.MetadataValue.path(f"{reports}/unet_swap.png"),
            "json": dg.MetadataValue.path(f"{reports}/unet_swap.json"),
        }
    )


GENERATION_ASSETS = [trained_captioners, caption_predictions, unet_swap_report]
