"""The generation stages' recipe, as the assets run it: fine-tune a captioner with the paper's curriculum (its
difficulty from the backbones' difficulty scores or its own preliminary pass), and write and score the test
split's prompts.  ``spec`` is the profile's captioning settings (resources.profiles.CaptionerSpec, plain data:
stage_epochs, batch_size, lr, lambda_vocab, difficulty, preliminary_epochs, seed, num_beams,
no_repeat_ngram_size, clip_model)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import polars as pl

from pipeline.metrics import mean_embedding_baseline

DIFFICULTY_SOURCES = ("backbones", "self")


@contextlib.contextmanager
def tiny_threads(variant: str, device: str):
    """One torch thread for the tiny models on CPU, restored after: on the 2 shared cores of the sample
    profile, two threads made a tiny captioner epoch 10-15x slower (OpenMP waits under contention)."""
    import torch

    from pipeline.training.loop import resolve_device

    if variant != "tiny" or resolve_device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_config(spec, device: str, num_workers: int):
    from pipeline.captioning.training import CaptionTrainConfig

    return CaptionTrainConfig(
        stage_epochs=spec.stage_epochs,
        batch_size=spec.batch_size,
        lr=spec.lr,
        lambda_vocab=spec.lambda_vocab,
        seed=spec.seed,
        device=device,
        num_workers=num_workers,
    )


def new_captioner(name: str, spec, variant: str, pretrained: bool, vocab_size: int, corpus: list[str]):
    """A fresh captioner, seeded: the same initial weights on every run."""
    from pipeline.captioning.registry import create_captioner
    from pipeline.training.loop import seed_everything

    seed_everything(spec.seed)
    return create_captioner(name, variant=variant, vocab_size=vocab_size, pretrained=pretrained, corpus=corpus)


def backbone_difficulty(scores: Mapping[str, pl.DataFrame], image_ids: list[str]) -> tuple[list[np.ndarray], list[str]]:
    """Each backbone's difficulty scores (``scores``: backbone -> image_id, difficulty) aligned to ``image_ids``
    (NaN where a sample was not scored), and the backbones used, in ``scores``' order."""
    arrays, used = [], []
    for backbone, frame in scores.items():
        aligned = pl.DataFrame({"image_id": image_ids}).join(frame, on="image_id", how="left", maintain_order="left")
        arrays.append(aligned["difficulty"].cast(pl.Float64).fill_null(float("nan")).to_numpy())
        used.append(backbone)
    return arrays, used


@dataclass
class CaptionerRun:
    """What fine-tuning a captioner produced: its history, the selected (lowest-val-LM-loss) epoch, the saved
    weights, the difficulty's source and the curriculum stages, and generated prompts for a few val images."""

    history: list[dict]
    selected: int
    weights: str
    tokens: int
    difficulty_source: str
    stages: list
    preview: list[tuple[str, str]]  # (true prompt, generated) for the first val images

    def figures(self) -> dict:
        """The run's figures at its selected epoch, the difficulty's source and the curriculum's stage sizes."""
        best = self.history[self.selected]
        return {
            "final_val_lm_loss": float(best["val_lm"]),
            "selected_epoch": self.selected,
            "final_train_bce": float(best["train_bce"]),
            "epochs": len(self.history),
            "tokens": self.tokens,
            "difficulty_source": self.difficulty_source,
            **{f"stage_{i}_size": int(len(s)) for i, s in enumerate(self.stages)},
        }


def fit_recipe(
    name: str,
    spec,
    train,
    val,
    vocab_size: int,
    backbone_scores: Mapping[str, pl.DataFrame],
    *,
    variant: str,
    pretrained: bool,
    device: str,
    num_workers: int,
    directory: str,
    progress_dir: str,
    on_log: Callable[[dict], None] | None = None,
    warn: Callable[[str], None] = lambda message: None,
) -> CaptionerRun:
    """Fine-tune captioner ``name`` on ``train`` (a SplitData) with the curriculum, select its epoch on ``val``,
    save it to ``directory`` (per-epoch progress under ``progress_dir``, removed once saved, so a killed run
    resumes).  The difficulty is the rank-average of ``backbone_scores`` (spec.difficulty "backbones", when
    any), else the captioner's own preliminary pass."""
    from pipeline.captioning.checkpoint import save_captioner
    from pipeline.captioning.dataset import CaptionDataset
    from pipeline.captioning.generation import generate_prompts
    from pipeline.captioning.training import combined_difficulty, fit_captioner, preliminary_loss_history
    from pipeline.training.checkpoint import remove_checkpoints
    from pipeline.training.curriculum import bucket_by_difficulty, curriculum_stages, difficulty_from_history

    if spec.difficulty not in DIFFICULTY_SOURCES:
        raise ValueError(f"captioning difficulty {spec.difficulty!r} is not one of: {', '.join(DIFFICULTY_SOURCES)}")
    config = train_config(spec, device, num_workers)
    create = lambda: new_captioner(name, spec, variant, pretrained, vocab_size, train.prompts)  # noqa: E731
    arrays, used = ([], []) if spec.difficulty == "self" else backbone_difficulty(backbone_scores, train.image_ids)
    if arrays:
        difficulty = combined_difficulty(arrays)
        source = "rank-average of difficulty_scores: " + ", ".join(used)
    else:
        if spec.difficulty == "backbones":
            warn("no difficulty_scores table: falling back to the captioner's own preliminary pass")
        prelim = create()
        prelim_set = CaptionDataset(train.images, train.prompts, train.labels, prelim)
        history = preliminary_loss_history(prelim, prelim_set, config, spec.preliminary_epochs)
        difficulty = difficulty_from_history(history)
        source = f"own preliminary pass ({spec.preliminary_epochs} epochs, minus per-sample LM loss)"
    stages = curriculum_stages(bucket_by_difficulty(difficulty))
    captioner = create()
    train_set = CaptionDataset(train.images, train.prompts, train.labels, captioner)
    val_set = CaptionDataset(val.images, val.prompts, val.labels, captioner)
    result = fit_captioner(
        captioner, train_set, config, stages=stages, val_set=val_set, on_log=on_log, checkpoint_dir=progress_dir
    )
    history = result.history
    captioner.generation = {"num_beams": spec.num_beams, "no_repeat_ngram_size": spec.no_repeat_ngram_size}
    weights = save_captioner(captioner, directory, progress={"history": history}, config=config.result_dict())
    remove_checkpoints(progress_dir)  # the saved captioner is complete: its progress is not needed any more
    generated = generate_prompts(captioner, val.images[:4], device=device)
    return CaptionerRun(
        history=history,
        selected=int(result.extra["selected_epoch"]),
        weights=str(weights),
        tokens=len(captioner.tokenizer),
        difficulty_source=source,
        stages=stages,
        preview=list(zip(val.prompts[:4], generated)),
    )


@dataclass
class CaptionScores:
    """The test split's generated prompts scored: the caption_predictions table (prompt, generated,
    sbert_cosine, clip_s, refclip_s, ...), the mean-training-embedding baseline, the CLIP scorer's description."""

    table: pl.DataFrame
    baseline: float
    empty: int
    finite: bool
    clip_description: str

    def figures(self) -> dict:
        """Mean scores over the test images (sbert_cosine is the Kaggle metric), the baseline, empty generations."""
        from pipeline.captioning.scoring import KAGGLE_FIRST_PLACE

        mean = lambda column: float(self.table[column].mean())  # noqa: E731
        return {
            "test_images": self.table.height,
            "sbert_cosine": mean("sbert_cosine"),
            "refclip_score": mean("refclip_s"),
            "clip_s": mean("clip_s"),
            "baseline_mean_embedding": self.baseline,
            "kaggle_first_place": KAGGLE_FIRST_PLACE,
            "empty_generations": self.empty,
            "clip_model": self.clip_description,
        }


def score_captions(
    directory: str, spec, test, train_targets: np.ndarray, encode: Callable[[list[str]], np.ndarray], *, variant, device
) -> CaptionScores:
    """Load the captioner saved in ``directory``, write a prompt for every ``test`` image (beam search), and score
    each against the true prompt: SBERT cosine (``encode``: the SBERT encoder), CLIP-S and RefCLIPScore."""
    from pipeline.captioning.checkpoint import load_captioner
    from pipeline.captioning.generation import generate_prompts
    from pipeline.captioning.scoring import caption_table, load_clip_scorer

    captioner = load_captioner(directory, device)
    generated = generate_prompts(
        captioner,
        test.images,
        spec.batch_size,
        spec.num_beams,
        device=device,
        no_repeat_ngram_size=spec.no_repeat_ngram_size,
    )
    scorer = load_clip_scorer(variant, spec.clip_model, device, seed=spec.seed)
    table = caption_table(test, generated, encode(generated), scorer)
    return CaptionScores(
        table=table,
        baseline=float(mean_embedding_baseline(train_targets, test.targets)),
        empty=sum(1 for g in generated if not g),
        finite=bool(np.isfinite(table.select("sbert_cosine", "clip_s", "refclip_s").to_numpy()).all()),
        clip_description=scorer.description if variant == "tiny" else spec.clip_model,
    )
