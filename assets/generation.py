"""Beyond the embedding: captioners fine-tuned to write the prompt (vocabulary head + curriculum),
their prompts scored as the Kaggle competition scores them (SBERT cosine) and by RefCLIPScore, and the
fine-tuned U-Net encoder put back into Stable Diffusion after the first DDIM step.

Thin wiring over pipeline/captioning/ and pipeline/evaluation/unet_swap.py.  The sample profile runs tiny random-init
twins of every model (captioner, CLIP scorer, Stable Diffusion); its CLIP-based scores exercise the code path
and measure nothing, which the metadata says.
"""

import contextlib
import functools
import inspect
import json
import time

import dagster as dg
import numpy as np
import polars as pl

from assets.common import PROFILE_CONFIG, SETTINGS, artifact_metadata, code_version, markdown_table, table_metadata
from assets.data import filtered_pairs, prompt_embeddings, vocabulary, vocabulary_labels
from assets.jobs import GPU_POOL
from assets.plots import line_plot_png, md_image
from assets.training import BACKBONES, difficulty_scores, load_splits, trained_models, training_spec
from pipeline import storage as store
from pipeline.metrics import mean_embedding_baseline
from pipeline.training.pairs import join_pairs
from resources import ComputeResource, SentenceEncoderResource, StorageResource

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


def _variant(compute: ComputeResource) -> str:
    return compute.backbone_variant


@contextlib.contextmanager
def _tiny_threads(compute: ComputeResource):
    """One torch thread for the tiny models on CPU, restored after: on the 2 shared cores of the sample
    profile, two threads made a tiny captioner epoch 10-15x slower (OpenMP waits under contention)."""
    import torch

    from pipeline.training.loop import resolve_device

    if _variant(compute) != "tiny" or resolve_device(compute.device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _in_tiny_threads(body):
    """The asset body ``body`` run under _tiny_threads of its ``compute`` resource."""

    @functools.wraps(body)
    def run(*args, **kwargs):
        with _tiny_threads(inspect.signature(body).bind(*args, **kwargs).arguments["compute"]):
            return body(*args, **kwargs)

    return run


def _train_config(compute: ComputeResource):
    from pipeline.captioning import CaptionTrainConfig

    return CaptionTrainConfig(
        stage_epochs=CAPTION.stage_epochs,
        batch_size=CAPTION.batch_size,
        lr=CAPTION.lr,
        lambda_vocab=CAPTION.lambda_vocab,
        seed=CAPTION.seed,
        device=compute.device,
        num_workers=compute.num_workers,
    )


def _create(name: str, compute: ComputeResource, vocab_size: int, corpus: list[str]):
    from pipeline.captioning import create_captioner
    from pipeline.training.loop import seed_everything

    seed_everything(CAPTION.seed)  # the same initial weights on every run
    return create_captioner(
        name, variant=_variant(compute), vocab_size=vocab_size, pretrained=compute.pretrained, corpus=corpus
    )


def _backbone_difficulty(storage: StorageResource, image_ids: list[str]) -> tuple[list[np.ndarray], list[str]]:
    """Each backbone's difficulty_scores aligned to ``image_ids`` (NaN where a sample was not scored)."""
    arrays, used = [], []
    for backbone in BACKBONES:
        if not storage.has_table("difficulty_scores", backbone):
            continue
        scores = storage.read_table("difficulty_scores", backbone, columns=["image_id", "difficulty"])
        aligned = pl.DataFrame({"image_id": image_ids}).join(scores, on="image_id", how="left", maintain_order="left")
        arrays.append(aligned["difficulty"].cast(pl.Float64).fill_null(float("nan")).to_numpy())
        used.append(backbone)
    return arrays, used


@dg.asset(
    partitions_def=captioner_partitions,
    deps=[
        filtered_pairs,
        prompt_embeddings,
        vocabulary,
        vocabulary_labels,
        dg.AssetDep(difficulty_scores, partition_mapping=dg.AllPartitionMapping()),
    ],
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
    context: dg.AssetExecutionContext, storage: StorageResource, compute: ComputeResource
) -> dg.MaterializeResult:
    from pipeline.captioning import (
        CaptionDataset,
        combined_difficulty,
        fit_captioner,
        generate_prompts,
        preliminary_loss_history,
        save_captioner,
    )
    from pipeline.training.checkpoint import remove_checkpoints
    from pipeline.training.curriculum import bucket_by_difficulty, curriculum_stages, difficulty_from_history

    name = context.partition_key
    if CAPTION.difficulty not in ("backbones", "self"):
        raise dg.Failure(f"captioning difficulty {CAPTION.difficulty!r} is not one of: backbones, self")
    started = time.perf_counter()
    splits = load_splits(storage, ("train", "val"))
    train, val = splits["train"], splits["val"]
    vocab_size = storage.read_table("vocabulary", columns=["word"]).height
    config = _train_config(compute)
    arrays, used = ([], []) if CAPTION.difficulty == "self" else _backbone_difficulty(storage, train.image_ids)
    if arrays:
        difficulty = combined_difficulty(arrays)
        source = "rank-average of difficulty_scores: " + ", ".join(used)
    else:
        if CAPTION.difficulty == "backbones":
            context.log.warning("no difficulty_scores table: falling back to the captioner's own preliminary pass")
        prelim = _create(name, compute, vocab_size, train.prompts)
        prelim_set = CaptionDataset(train.images, train.prompts, train.labels, prelim)
        history = preliminary_loss_history(prelim, prelim_set, config, CAPTION.preliminary_epochs)
        difficulty = difficulty_from_history(history)
        source = f"own preliminary pass ({CAPTION.preliminary_epochs} epochs, minus per-sample LM loss)"
    buckets = bucket_by_difficulty(difficulty)
    stages = curriculum_stages(buckets)
    captioner = _create(name, compute, vocab_size, train.prompts)
    train_set = CaptionDataset(train.images, train.prompts, train.labels, captioner)
    val_set = CaptionDataset(val.images, val.prompts, val.labels, captioner)

    def on_log(record: dict) -> None:
        fields = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        context.log.info(f"{name}: " + ", ".join(fields))

    directory = storage.path("trained_captioners", name)
    progress_dir = storage.path("trained_captioners", name, "progress")  # per-epoch, so a killed run resumes
    result = fit_captioner(
        captioner, train_set, config, stages=stages, val_set=val_set, on_log=on_log, checkpoint_dir=progress_dir
    )
    history, selected = result.history, int(result.extra["selected_epoch"])  # the lowest-val-LM-loss epoch
    captioner.generation = {"num_beams": CAPTION.num_beams, "no_repeat_ngram_size": CAPTION.no_repeat_ngram_size}
    weights = save_captioner(captioner, directory, progress={"history": history}, config=config.result_dict())
    remove_checkpoints(progress_dir)  # the saved captioner is complete: its progress is not needed any more
    preview = val.images[:4]
    generated = generate_prompts(captioner, preview, device=compute.device)
    curves = {"train LM loss": [h["train_lm"] for h in history], "val LM loss": [h["val_lm"] for h in history]}
    return dg.MaterializeResult(
        metadata={
            "final_val_lm_loss": float(history[selected]["val_lm"]),
            "selected_epoch": selected,
            "final_train_bce": float(history[selected]["train_bce"]),
            "epochs": len(history),
            "tokens": len(captioner.tokenizer),
            "difficulty_source": source,
            **{f"stage_{i}_size": int(len(s)) for i, s in enumerate(stages)},
            "seconds": round(time.perf_counter() - started, 1),
            **artifact_metadata(str(weights), "checkpoint"),
            "curves": dg.MetadataValue.md(md_image(line_plot_png(curves, f"{name}: LM loss", "epoch", "loss"))),
            "history": dg.MetadataValue.md(markdown_table(history)),
            "val_samples": dg.MetadataValue.md(
                markdown_table([{"true": t, "generated": g} for t, g in zip(val.prompts[:4], generated)])
            ),
        }
    )


def _targets(storage: StorageResource) -> pl.DataFrame:
    return join_pairs(storage.read_table("filtered_pairs"), storage.read_table("prompt_embeddings"), None)


@dg.asset(
    partitions_def=captioner_partitions,
    deps=[trained_captioners, filtered_pairs, prompt_embeddings],
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
    storage: StorageResource,
    compute: ComputeResource,
    sentence_encoder: SentenceEncoderResource,
) -> dg.MaterializeResult:
    from pipeline.captioning import (
        KAGGLE_FIRST_PLACE,
        caption_table,
        generate_prompts,
        load_captioner,
        load_clip_scorer,
    )
    from pipeline.training.checkpoint import latest_checkpoint
    from pipeline.training.loop import resolve_device

    name = context.partition_key
    directory = storage.path("trained_captioners", name)
    if latest_checkpoint(directory) is None:
        raise dg.Failure(f"no checkpoint for captioner {name!r}: materialize trained_captioners first")
    test = load_splits(storage, ("test",))["test"]
    if not len(test):
        raise dg.Failure("the test split is empty: no image to write a prompt for")
    started = time.perf_counter()
    device = str(resolve_device(compute.device))
    captioner = load_captioner(directory, device)
    generated = generate_prompts(
        captioner,
        test.images,
        CAPTION.batch_size,
        CAPTION.num_beams,
        device=device,
        no_repeat_ngram_size=CAPTION.no_repeat_ngram_size,
    )
    scorer = load_clip_scorer(_variant(compute), CAPTION.clip_model, device, seed=CAPTION.seed)
    table = caption_table(test, generated, sentence_encoder.encoder().encode(generated), scorer)
    target = storage.write_table(table, "caption_predictions", name)
    pairs = _targets(storage)
    train_y = pairs.filter(pl.col("split") == "train")["embedding"].to_numpy().astype(np.float32)
    baseline = mean_embedding_baseline(train_y, test.targets)
    empty = sum(1 for g in generated if not g)
    scores_finite = bool(np.isfinite(table.select("sbert_cosine", "clip_s", "refclip_s").to_numpy()).all())
    check = dg.AssetCheckResult(
        check_name="generated_prompt_per_test_image",
        passed=table.height == len(test) and scores_finite,
        metadata={"rows": table.height, "test_pairs": len(test), "empty": empty, "finite": scores_finite},
    )
    mean = lambda column: float(table[column].mean())  # noqa: E731
    return dg.MaterializeResult(
        metadata={
            "test_images": table.height,
            "sbert_cosine": mean("sbert_cosine"),
            "refclip_score": mean("refclip_s"),
            "clip_s": mean("clip_s"),
            "baseline_mean_embedding": float(baseline),
            "kaggle_first_place": KAGGLE_FIRST_PLACE,
            "empty_generations": empty,
            "clip_model": scorer.description if _variant(compute) == "tiny" else CAPTION.clip_model,
            **({"note": NOT_A_MEASURE} if _variant(compute) == "tiny" else {}),
            "seconds": round(time.perf_counter() - started, 1),
            "preview": dg.MetadataValue.md(
                markdown_table(table.select("prompt", "generated", "sbert_cosine", "refclip_s").head(8).to_dicts())
            ),
            **table_metadata(table, partitioned=True),
            **artifact_metadata(target),
        },
        check_results=[check],
    )


def caption_report_rows(storage: StorageResource) -> list[dict]:
    """Rows for the evaluation report, one per captioner whose caption_predictions exist: captioner, variant,
    sbert_cosine (mean, test split: the Kaggle metric), refclip_score, clip_s, test_images, kaggle_first_place."""
    from pipeline.captioning import report_rows

    frames = {
        name: storage.read_table("caption_predictions", name, columns=["sbert_cosine", "clip_s", "refclip_s"])
        for name in CAPTION.captioners
        if storage.has_table("caption_predictions", name)
    }
    return report_rows(frames, {name: SETTINGS.backbone_variant for name in frames})


def _unet_checkpoint(storage: StorageResource):
    from pipeline.training.checkpoint import latest_checkpoint

    for recipe in SWAP_RECIPES:
        checkpoint = latest_checkpoint(storage.path("trained_models", "unet", recipe))
        if checkpoint is not None:
            return recipe, checkpoint
    raise dg.Failure("no trained unet model: materialize trained_models for backbone unet first")


@dg.asset(
    deps=[
        dg.AssetDep(
            trained_models, partition_mapping=dg.SpecificPartitionsPartitionMapping([f"unet|{r}" for r in SWAP_RECIPES])
        )
    ],
    group_name=GEN_GROUP,
    kinds={"pytorch", "png"},
    pool=GPU_POOL,
    code_version=code_version("unet_swap_report", **SWAP_SETTINGS),
    description="Stable Diffusion 2 with and without the fine-tuned U-Net encoder swapped in after the first DDIM "
    "step: images for a fixed prompt list, CLIP prompt alignment side by side, reports/unet_swap.{png,json,md}.",
)
@_in_tiny_threads
def unet_swap_report(
    context: dg.AssetExecutionContext, storage: StorageResource, compute: ComputeResource
) -> dg.MaterializeResult:
    from pipeline.captioning import load_clip_scorer
    from pipeline.evaluation.unet_swap import (
        DEFAULT_PROMPTS,
        SD_HUB_ID,
        clip_scores,
        generate_images,
        load_finetuned_encoder,
        load_sd_pipeline,
        swap_grid,
        tiny_sd_pipeline,
    )
    from pipeline.training.loop import resolve_device

    started = time.perf_counter()
    recipe, checkpoint = _unet_checkpoint(storage)
    encoder, config = load_finetuned_encoder(checkpoint)
    device = str(resolve_device(compute.device))
    if config.get("variant") == "full":
        pipe, pipeline_name = load_sd_pipeline(SD_HUB_ID, device), SD_HUB_ID
    else:  # the tiny twin, drawn from the seed the unet backbone was initialised with
        pipe, pipeline_name = tiny_sd_pipeline(training_spec("unet").seed).to(device), "tiny Stable Diffusion twin"
    prompts = list(DEFAULT_PROMPTS[: CAPTION.swap_prompts])
    settings = dict(
        seed=CAPTION.seed,
        steps=CAPTION.swap_steps,
        height=CAPTION.swap_size,
        width=CAPTION.swap_size,
        guidance_scale=CAPTION.swap_guidance,
    )
    plain = generate_images(pipe, prompts, None, **settings)
    swapped = generate_images(pipe, prompts, encoder, **settings)
    scorer = load_clip_scorer(_variant(compute), CAPTION.clip_model, device, seed=CAPTION.seed)
    columns = {"SD": plain, "SD + fine-tuned encoder": swapped}
    scores = {name: clip_scores(scorer, images, prompts) for name, images in columns.items()}
    grid = swap_grid(prompts, columns, scores)
    pixel_change = float(np.mean([np.abs(np.subtract(a, b, dtype=np.float32)).mean() for a, b in zip(plain, swapped)]))
    rows = [
        {"prompt": p, "clip_sd": float(scores["SD"][i]), "clip_swap": float(scores["SD + fine-tuned encoder"][i])}
        for i, p in enumerate(prompts)
    ]
    summary = {
        "pipeline": pipeline_name,
        "encoder": f"unet/{recipe}",
        "clip_model": scorer.description if _variant(compute) == "tiny" else CAPTION.clip_model,
        "clip_score_sd": float(np.mean(scores["SD"])),
        "clip_score_swap": float(np.mean(scores["SD + fine-tuned encoder"])),
        "mean_abs_pixel_change": pixel_change,
        "settings": settings,
        "prompts": rows,
    }
    reports = storage.path("reports")
    store.write_bytes(grid, f"{reports}/unet_swap.png")
    store.write_text(json.dumps(summary, indent=2), f"{reports}/unet_swap.json")
    table_md = markdown_table(rows)
    store.write_text(
        "# Stable Diffusion with the fine-tuned U-Net encoder after step 1\n\n"
        f"pipeline: {pipeline_name}; encoder: unet/{recipe}; CLIP score = 100 * max(cos, 0)\n\n"
        f"{table_md}\n\n![grid](unet_swap.png)\n",
        f"{reports}/unet_swap.md",
    )
    return dg.MaterializeResult(
        metadata={
            "clip_score_sd": summary["clip_score_sd"],
            "clip_score_swap": summary["clip_score_swap"],
            "mean_abs_pixel_change": pixel_change,
            "encoder": summary["encoder"],
            "pipeline": pipeline_name,
            **({"note": NOT_A_MEASURE} if _variant(compute) == "tiny" else {}),
            "table": dg.MetadataValue.md(table_md),
            "grid": dg.MetadataValue.md(md_image(grid, "with and without the swap")),
            "seconds": round(time.perf_counter() - started, 1),
            "png": dg.MetadataValue.path(f"{reports}/unet_swap.png"),
            "json": dg.MetadataValue.path(f"{reports}/unet_swap.json"),
        }
    )


GENERATION_ASSETS = [trained_captioners, caption_predictions, unet_swap_report]
