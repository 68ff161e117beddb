"""The evaluation report (Table 1, baselines, plots, gallery) and the prompt bank predict retrieves from.

Thin wiring: each asset reads its inputs, calls one function of pipeline.evaluation, writes the result and
attaches metadata."""

import json

import dagster as dg
import numpy as np
import polars as pl

from assets.common import (
    PROFILE_CONFIG,
    SETTINGS,
    artifact_metadata,
    code_version,
    metadata_table,
    rounded_metadata,
    table_metadata,
)
from assets.data import filtered_pairs, prompt_embeddings
from assets.ensemble import (
    EVAL_GROUP,
    as_matrix,
    dakl_predictions,
    dakl_sweep_png,
    ensemble_predictions,
    predictions_by_model,
    target_embeddings,
)
from assets.generation import caption_predictions
from assets.jobs import GPU_POOL
from assets.own_images import table_of
from assets.plots import bar_plot_png, data_uri, gallery_png, grouped_bars_png, histogram_png, md_image
from assets.training import BACKBONES, RECIPES, TRAIN, difficulty_scores, load_splits, model_predictions
from pipeline import storage as store
from pipeline.ensemble.ensemble import BEST, ENSEMBLE_METHODS, ensemble_column
from pipeline.evaluation.by_source import pooled_mean, score_by_source
from pipeline.evaluation.report import (
    BASELINE_COLUMNS,
    GENERATION_COLUMNS,
    SOURCE_TEXT_COLUMNS,
    TABLE1_TEXT_COLUMNS,
    ZERO_SHOT_KEY,
    Report,
    SplitScores,
    score_test_split,
)
from pipeline.metrics import knn_baseline, row_cosines
from resources import ComputeResource, StorageResource, Table, Tables, table_in


def _knn_baseline(
    storage: StorageResource, compute: ComputeResource, split_tables: dict[str, Table]
) -> tuple[pl.DataFrame | None, str]:
    """The paper's k-NN baseline: 5 nearest training images by CLIP image features, their prompts' mean; per
    test image (image_id, cosine), or None when there is no clip model.

    The features come from the clip backbone's frozen tower as stored in its checkpoint (the same for every
    recipe): the pretrained ViT-H/14 on DiffusionDB, the tiny random-init twin on the sample profile.
    """
    from pipeline.training.checkpoint import latest_checkpoint, load_model
    from pipeline.training.datasets import PairDataset
    from pipeline.training.loop import backbone_features

    checkpoint = next(
        (c for r in RECIPES if (c := latest_checkpoint(storage.path("trained_models", "clip", r))) is not None), None
    )
    if checkpoint is None:
        return None, "k-NN baseline: not computed (no trained clip model to take CLIP image features from)."
    model = load_model(checkpoint)
    splits = load_splits(storage, ("train", "test"), **split_tables)
    train, test = splits["train"], splits["test"]
    features = {
        name: backbone_features(
            model, PairDataset.for_model(s.images, s.targets, None, model), TRAIN.batch_size, compute.device
        )
        for name, s in splits.items()
    }
    predicted = knn_baseline(features["train"], train.targets, features["test"], k=5)
    variant = "pretrained CLIP" if model.config_dict().get("variant") == "full" else "the tiny random-init CLIP twin's"
    return (
        pl.DataFrame({"image_id": test.image_ids, "cosine": row_cosines(predicted, test.targets)}),
        f"k-NN baseline: 5 nearest training images by {variant} image features (the paper: CLIP ViT-H/14).",
    )


def _zero_shot_baseline(
    storage: StorageResource, compute: ComputeResource, source_of: dict[str, str], split_tables: dict[str, Table]
) -> tuple[float | None, dict[str, float], str, str, bool]:
    """(mean test cosine, the same per data source, CLIP model, note, whether the model is the random-init twin) of
    zero-shot CLIP retrieval, the baseline with no training: each test image's top-1 prompt-bank prompt by CLIP
    image-text cosine (pipeline.zero_shot), scored by that prompt's SBERT embedding against the true prompt's.
    Each source's images are retrieved once (``source_of``: image id -> source). The
    sample profile ranks with its tiny random-init CLIP twin, any other with openai/clip-vit-large-patch14
    (what `reverse-sd predict --zero-shot` uses)."""
    from pipeline.zero_shot import (
        DEFAULT_CLIP,
        ZeroShotError,
        ZeroShotRetriever,
        ensure_tiny_clip,
        top1_sbert_cosine,
        twin_directory,
    )

    clip = ensure_tiny_clip(twin_directory(storage.local_dir(""))) if SETTINGS.is_sample else DEFAULT_CLIP
    try:
        retriever = ZeroShotRetriever(storage.root, clip, device=compute.device)
    except ZeroShotError as exc:
        return None, {}, "", f"zero-shot CLIP retrieval: not computed ({exc}).", False
    test = load_splits(storage, ("test",), **split_tables)["test"]
    sources = np.array([source_of.get(i, "diffusiondb") for i in test.image_ids], dtype=object)
    values, counts = {}, {}
    for source in sorted(set(sources.tolist())):
        rows = np.flatnonzero(sources == source)
        images = test.images if len(rows) == len(test) else [test.images[int(i)] for i in rows]
        values[source], counts[source] = top1_sbert_cosine(retriever, images, test.targets[rows]), len(rows)
    note = f"zero-shot CLIP retrieval: top-1 prompt-bank prompt by {retriever.description}'s image-text cosine"
    if retriever.toy_models:
        note += " (random-init on the sample profile: what a random bank prompt scores, not CLIP)"
    return pooled_mean(values, counts), values, retriever.description, note + ".", retriever.toy_models


@dg.asset(
    ins={"pairs": table_in(filtered_pairs), "embeddings": table_in(prompt_embeddings)},
    group_name=EVAL_GROUP,
    kinds={"parquet"},
    code_version=code_version("prompt_bank"),
    description="Training prompts and their embeddings: the retrieval bank of `reverse-sd predict`.",
)
def prompt_bank(
    context: dg.AssetExecutionContext, pairs: Table, embeddings: Table, storage: StorageResource
) -> dg.MaterializeResult:
    targets = target_embeddings(pairs, embeddings).filter(pl.col("split") == "train")
    bank = targets.select("prompt", pl.col("target").alias("embedding")).unique("prompt", maintain_order=True)
    target = storage.write_table(bank, "prompt_bank")
    return dg.MaterializeResult(metadata={"prompts": bank.height, **table_metadata(bank), **artifact_metadata(target)})


def caption_report_rows(captions: Tables) -> list[dict]:
    """Rows for the evaluation report, one per captioner whose caption_predictions exist (``captions``: its
    tables present): captioner, variant, sbert_cosine (mean, test split: the Kaggle metric), refclip_score,
    clip_s, test_images, kaggle_first_place."""
    from pipeline.captioning import report_rows

    frames = {
        name: captions[name].read(["sbert_cosine", "clip_s", "refclip_s"])
        for name in PROFILE_CONFIG.captioning.captioners
        if name in captions
    }
    return report_rows(frames, {name: SETTINGS.backbone_variant for name in frames})


# Bump when the report's layout changes (not its figures), so the UI marks the page stale.
# 2: Table 1 and the baselines as UI tables, plots and gallery as UI images; 3: zero-shot row; 4: per source
REPORT_LAYOUT = 4


@dg.asset(
    ins={
        "ensemble": table_in(ensemble_predictions),
        "dakl": table_in(dakl_predictions),
        "difficulty": table_in(difficulty_scores),
        "predictions": table_in(model_predictions),
        "pairs": table_in(filtered_pairs),
        "embeddings": table_in(prompt_embeddings),
        "bank": table_in(prompt_bank),
        "captions": table_in(caption_predictions),
    },
    group_name=EVAL_GROUP,
    kinds={"markdown", "html"},
    pool=GPU_POOL,  # the k-NN baseline runs the clip backbone over the train and test images
    code_version=code_version("evaluation_report", layout=REPORT_LAYOUT),
    description="The paper's Table 1 on this data (mean cosine on test), baselines and plots; "
    "reports/evaluation.{md,html,json} under the storage root.",
)
def evaluation_report(
    context: dg.AssetExecutionContext,
    ensemble: Table,
    dakl: Table,
    difficulty: Tables,
    predictions: Tables,
    pairs: Table,
    embeddings: Table,
    bank: Table,
    captions: Tables,
    storage: StorageResource,
    compute: ComputeResource,
) -> dg.MaterializeResult:
    # The baselines' splits (with images): vocabulary_labels is no declared parent, read by name.
    split_tables = {"pairs": pairs, "embeddings": embeddings, "labels": Table(storage, "vocabulary_labels")}
    targets = target_embeddings(pairs, embeddings).sort("image_id")
    pairs = pairs.read(["image_id", "part", "split", "source"])
    source_of = dict(zip(pairs["image_id"], pairs["source"]))
    test, train = targets.filter(pl.col("split") == "test"), targets.filter(pl.col("split") == "train")
    ensemble = test.select("image_id").join(ensemble.read(), on="image_id", how="left")
    dakl = test.select("image_id").join(dakl.read(), on="image_id", how="left")
    inputs = (
        as_matrix(test, "target"),
        as_matrix(train, "target"),
        {f"{b}/{r}": preds for (b, r), preds in predictions_by_model(predictions, test).items()},
        {
            (method, group): as_matrix(ensemble, ensemble_column(method, group))
            for method in ENSEMBLE_METHODS
            for group in (*RECIPES, BEST)
            if ensemble_column(method, group) in ensemble.columns
        },
        as_matrix(dakl, "embedding"),
    )
    scores = score_test_split(*inputs)
    cosine = scores.cosine
    knn_rows, knn_note = _knn_baseline(storage, compute, split_tables)
    extra_rows = {}
    if knn_rows is not None:
        cosine["baseline/knn"] = float(knn_rows["cosine"].mean())
        extra_rows["baseline/knn"] = (knn_rows["cosine"].to_numpy(), [source_of[i] for i in knn_rows["image_id"]])
    by_source = score_by_source([source_of[i] for i in test["image_id"]], *inputs, extra_rows=extra_rows)
    zero_shot_cosine, zero_shot_by_source, zero_shot_model, zero_shot_note, zero_shot_toy = _zero_shot_baseline(
        storage, compute, source_of, split_tables
    )
    for source, value in zero_shot_by_source.items():
        by_source.setdefault(source, {})[ZERO_SHOT_KEY] = value
    if zero_shot_cosine is not None and not zero_shot_toy:
        cosine[ZERO_SHOT_KEY] = zero_shot_cosine
    generation = caption_report_rows(captions)
    cosine.update({f"caption/{row['captioner']}": row["sbert_cosine"] for row in generation})
    sources = pairs["source"] if "source" in pairs.columns else ["diffusiondb"] * pairs.height
    id_parts = {i: table_of(s, p) for i, p, s in zip(pairs["image_id"], pairs["part"], sources)}
    figures = _figures(storage, scores, train, test, dakl, id_parts, difficulty, predictions, bank)
    if zero_shot_cosine is not None and zero_shot_toy:  # in the tables, not the plot: it would stretch its axis
        cosine[ZERO_SHOT_KEY] = zero_shot_cosine
    report = Report(
        profile=SETTINGS.profile,
        generation=generation,
        split="test",
        cosine=cosine,
        counts=dict(pairs.group_by("split").len().sort("split").iter_rows()),
        notes=[*_notes(knn_note, bool(generation)), zero_shot_note],
        figures={title: data_uri(png) for title, (_, png) in figures.items()},
        zero_shot_model=zero_shot_model,
        cosine_by_source=by_source,
        counts_by_source={
            source: dict(pairs.filter(pl.col("source") == source).group_by("split").len().sort("split").iter_rows())
            for source in by_source
        },
    )
    reports = storage.path("reports")
    for suffix, text in (("md", report.markdown()), ("html", report.html()), ("json", report.to_json())):
        store.write_text(text, f"{reports}/evaluation.{suffix}")
    return dg.MaterializeResult(metadata=_report_metadata(report, figures, reports))


def _notes(knn_note: str, generation: bool) -> list[str]:
    notes = [
        f"profile: {SETTINGS.profile}; backbones: {'tiny random-init twins' if SETTINGS.is_sample else 'pretrained'}",
        knn_note,
        "unet: the caption context is empty on the sample profile (no captioning model offline); a learned null context is used.",
    ]
    if generation and SETTINGS.is_sample:
        notes.append(
            "generated prompts: tiny random-init captioner and CLIP (sample profile); RefCLIPScore then measures nothing."
        )
    return notes


def _report_metadata(report: Report, figures: dict[str, tuple[str, bytes]], reports: str) -> dict:
    """What the UI shows, in page order: the tables, the plots and gallery as images, the notes, then every
    figure as a rounded scalar (plotted over time) and the report files."""
    tables = {
        # figures as fixed-decimal text ("0.6590" as in evaluation.html; a float cell shows as "0.659")
        "evaluation_table": metadata_table(report.table1_text_records(), TABLE1_TEXT_COLUMNS),
        # the same table as Markdown, every column (the typed table can be cut off at the panel's edge)
        "table_1": dg.MetadataValue.md(report.table1_markdown()),
        "baselines": metadata_table(report.baseline_records(), BASELINE_COLUMNS),
    }
    if report.cosine_by_source:
        # one row per data source of the test split (diffusiondb, images), even when there is only one
        tables["cosine_by_source"] = metadata_table(report.source_records(), SOURCE_TEXT_COLUMNS)
        tables["table_by_source"] = dg.MetadataValue.md(report.by_source_note() + "\n\n" + report.by_source_markdown())
    if report.generation:
        tables["generated_prompts"] = metadata_table(report.generation_records(), GENERATION_COLUMNS, digits=5)
    return {
        **tables,
        **{key: dg.MetadataValue.md(md_image(png, title)) for title, (key, png) in figures.items()},
        "notes": dg.MetadataValue.md("\n".join(f"- {note}" for note in report.notes)),
        **rounded_metadata({f"test_cosine/{k}": v for k, v in report.cosine.items()}),
        **{f"pairs_{split}": int(n) for split, n in report.counts.items()},
        **{
            name: dg.MetadataValue.path(f"{reports}/evaluation.{suffix}")
            for name, suffix in (("html", "html"), ("markdown", "md"), ("json", "json"))
        },
    }


def _figures(
    storage: StorageResource,
    scores: SplitScores,
    train: pl.DataFrame,
    test: pl.DataFrame,
    dakl: pl.DataFrame,
    id_parts: dict,
    difficulty: Tables,
    predictions: Tables,
    bank: Table,
) -> dict[str, tuple[str, bytes]]:
    """The report's figures as title -> (metadata key, PNG), in page order."""
    cosine = scores.cosine
    figures = {
        "Test cosine per model": (
            "plot_test_cosine",
            bar_plot_png(
                cosine,
                "Mean test cosine per model, ensemble and baseline",
                "mean cosine",
                reference=cosine.get("baseline/mean_embedding"),
                reference_label="mean training embedding",
            ),
        )
    }
    for backbone in BACKBONES:
        subset = {k: v for k, v in scores.per_row.items() if k.startswith(backbone + "/")}
        if subset:
            figures[f"Cosine histogram: {backbone}"] = (f"plot_histogram_{backbone}", histogram_png(subset, backbone))
    bucket_cosines = _bucket_cosines(difficulty, predictions, train)
    if bucket_cosines:
        figures["Train cosine by difficulty bucket (mlc_cl models)"] = (
            "plot_difficulty_buckets",
            grouped_bars_png(bucket_cosines, "mean train cosine per difficulty bucket", "cosine"),
        )
    sweep = json.loads(store.as_path(storage.path("models", "dakl.json")).read_text()).get("sweep", [])
    if sweep:
        figures["DAKL sweep on val"] = ("plot_dakl_sweep", dakl_sweep_png(sweep))
    figures["Test images: true prompt and top-3 retrieved (ensemble + DAKL)"] = (
        "gallery",
        _gallery(storage, bank, test, dakl, id_parts, n=4),
    )
    return figures


def _bucket_cosines(difficulty: Tables, predictions: Tables, train: pl.DataFrame) -> dict[str, dict[str, float]]:
    """Per backbone: the mlc_cl model's mean train cosine in each difficulty bucket."""
    out = {}
    for backbone in BACKBONES:
        if not (backbone in difficulty and f"{backbone}|mlc_cl" in predictions):
            continue
        frame = (
            train.select("image_id", "target")
            .join(difficulty[backbone].read().select("image_id", "bucket"), on="image_id")
            .join(
                predictions[f"{backbone}|mlc_cl"].read().sort("image_id").select("image_id", "embedding"),
                on="image_id",
            )
        )
        cos = row_cosines(as_matrix(frame, "embedding"), as_matrix(frame, "target"))
        buckets = frame["bucket"].to_numpy()
        out[backbone] = {b: float(cos[buckets == b].mean()) for b in ("easy", "medium", "hard") if (buckets == b).any()}
    return out


def _gallery(
    storage: StorageResource, prompts: Table, test: pl.DataFrame, predictions: pl.DataFrame, id_parts: dict, n: int
) -> bytes:
    """The first n test images with their true prompt and the top-3 prompt-bank prompts for the prediction; the
    images from the parts' and image folders' tables (``id_parts``: image id -> table, partition)."""
    bank = prompts.read()
    bank_matrix = as_matrix(bank, "embedding")
    rows = test.head(n)
    preds = rows.select("image_id").join(predictions.select("image_id", "embedding"), on="image_id", how="left")
    scores = as_matrix(preds, "embedding") @ bank_matrix.T
    images, captions = [], []
    for i, (image_id, prompt) in enumerate(rows.select("image_id", "prompt").iter_rows()):
        frame = storage.read_table(*id_parts[image_id], columns=["image_id", "image"])
        images.append(frame.filter(pl.col("image_id") == image_id)["image"][0])
        top = np.argsort(-scores[i])[:3]
        lines = [f"true prompt: {prompt}"] + [
            f"{r + 1}. ({scores[i, j]:.3f}) {bank['prompt'][int(j)]}" for r, j in enumerate(top)
        ]
        captions.append("\n".join(lines))
    return gallery_png(images, captions)


EVALUATION_ASSETS = [evaluation_report, prompt_bank]
