"""Result-changing settings per profile.

These values change what an asset computes, so they are folded into the assets' code versions
(assets/versioning.py): change one and exactly the assets that use it, and their downstream, turn stale.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace

from resources.settings import Settings, SettingsError


@dataclass(frozen=True)
class SampleSpec:
    """Size of the generated sample mirror (sample profile only)."""

    n_parts: int = 4
    images_per_part: int = 250
    seed: int = 0


@dataclass(frozen=True)
class TrainingSpec:
    """Training settings shared by every backbone; each one changes results (part of code versions)."""

    epochs: int = 3
    preliminary_epochs: int = 2
    batch_size: int = 64
    lr: float = 1e-4
    lambda_vocab: float = 0.1
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CaptionerSpec:
    """Prompt generation (captioners) and the U-Net swap report; each setting changes results (code versions)."""

    captioners: tuple[str, ...] = ("blip",)  # partitions of trained_captioners / caption_predictions
    stage_epochs: int = 1  # per curriculum stage (easy, easy+medium, all, all)
    batch_size: int = 32
    lr: float = 5e-5
    lambda_vocab: float = 0.1
    difficulty: str = "backbones"  # backbones (rank-average of difficulty_scores) | self (own preliminary pass)
    preliminary_epochs: int = 2  # difficulty="self" only
    num_beams: int = 3
    no_repeat_ngram_size: int = 2
    clip_model: str = "openai/clip-vit-large-patch14"
    swap_prompts: int = 8
    swap_steps: int = 50
    swap_size: int = 512
    swap_guidance: float = 7.5
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ProfileConfig:
    sample: SampleSpec = field(default_factory=SampleSpec)
    image_size: int = 256  # what the largest backbone (swin, 256 px) needs
    split_ratios: tuple[int, int, int] = (670, 30, 30)
    split_seed: int = 0
    vocabulary_size: int = 1000
    encoder_model: str = "all-MiniLM-L6-v2"
    encoder_batch_size: int = 128
    training: TrainingSpec = field(default_factory=TrainingSpec)
    # Per-backbone departures from `training` (backbone -> {field: value}); see training_for().
    training_overrides: dict[str, dict] = field(default_factory=dict)
    kmeans_k: int = 10_000
    captioning: CaptionerSpec = field(default_factory=CaptionerSpec)

    def training_for(self, backbone: str) -> TrainingSpec:
        """The training settings of one backbone: the shared spec, then the profile's and the user's
        per-backbone overrides (REVERSE_SD_TRAIN_<BACKBONE>_EPOCHS / _LR)."""
        overrides = dict(self.training_overrides.get(backbone, {}))
        prefix = f"REVERSE_SD_TRAIN_{backbone.upper()}_"
        epochs = _env_int(prefix + "EPOCHS", 0)
        if epochs:
            overrides["epochs"] = epochs
        lr = _env_float(prefix + "LR")
        if lr is not None:
            overrides["lr"] = lr
        return replace(self.training, **overrides)

    def as_dict(self) -> dict:
        return asdict(self)


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"{name}={raw!r} must be at least {minimum}")
    return value


def _env_float(name: str) -> float | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if not value > 0:
        raise SettingsError(f"{name}={raw!r} must be positive")
    return value


def _env_captioners(default: tuple[str, ...]) -> tuple[str, ...]:
    """REVERSE_SD_CAPTIONERS: comma-separated registered captioners (e.g. "blip,blip2"), the partitions of
    trained_captioners; BLIP-2 is opt-in (it needs a large GPU)."""
    raw = os.environ.get("REVERSE_SD_CAPTIONERS", "").strip()
    if not raw:
        return default
    from pipeline.captioning.captioner import available_captioners

    names = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    unknown = [n for n in names if n not in available_captioners()]
    if unknown or not names:
        raise SettingsError(
            f"REVERSE_SD_CAPTIONERS={raw!r} names no registered captioner {unknown or ''}; "
            f"use a comma-separated list of: {', '.join(available_captioners())}"
        )
    return names


def profile_config(settings: Settings) -> ProfileConfig:
    if settings.is_sample:
        sample = SampleSpec(
            n_parts=_env_int("REVERSE_SD_SAMPLE_PARTS", 4),
            images_per_part=_env_int("REVERSE_SD_SAMPLE_IMAGES_PER_PART", 250),
        )
        # A small sample needs a larger share of val/test for the figures to mean anything.
        # Tiny random-init backbones learn in a few epochs only with a larger learning rate.
        training = TrainingSpec(
            epochs=_env_int("REVERSE_SD_TRAIN_EPOCHS", 8), preliminary_epochs=2, batch_size=32, lr=2e-3
        )
        return ProfileConfig(
            sample=sample,
            split_ratios=(80, 10, 10),
            split_seed=_env_int("REVERSE_SD_SPLIT_SEED", 0, minimum=0),
            vocabulary_size=300,
            training=training,
            # The tiny U-Net on frozen random-VAE latents peaks on val after 2-3 epochs and then memorises the
            # 800 training images (train cosine 0.83, val falling below the baseline by epoch 8): early
            # stopping keeps the best epoch anyway, so stop paying for the rest.
            training_overrides={"unet": {"epochs": 4}},
            kmeans_k=64,
            # The tiny random-init captioner learns in ~9 epochs (3 per curriculum stage) only at a larger
            # learning rate; greedy decoding does as well as beams at this size; the swap runs at 32 px.
            captioning=CaptionerSpec(
                captioners=_env_captioners(CaptionerSpec.captioners),
                stage_epochs=3, lr=3e-3, num_beams=1, swap_prompts=4, swap_steps=3, swap_size=32,
            ),
        )
    return ProfileConfig(
        split_seed=_env_int("REVERSE_SD_SPLIT_SEED", 0, minimum=0),
        captioning=CaptionerSpec(captioners=_env_captioners(CaptionerSpec.captioners)),
    )
