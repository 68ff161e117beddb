"""Result-changing settings per profile.

These values change what an asset computes, so they are folded into the assets' code versions
(assets/versioning.py): change one and exactly the assets that use it, and their downstream, turn stale.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

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
class ProfileConfig:
    sample: SampleSpec = field(default_factory=SampleSpec)
    image_size: int = 256  # what the largest backbone (swin, 256 px) needs
    split_ratios: tuple[int, int, int] = (670, 30, 30)
    split_seed: int = 0
    vocabulary_size: int = 1000
    encoder_model: str = "all-MiniLM-L6-v2"
    encoder_batch_size: int = 128
    training: TrainingSpec = field(default_factory=TrainingSpec)
    kmeans_k: int = 10_000

    def as_dict(self) -> dict:
        return asdict(self)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value <= 0:
        raise SettingsError(f"{name}={raw!r} must be positive")
    return value


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
            sample=sample, split_ratios=(80, 10, 10), vocabulary_size=300, training=training, kmeans_k=64
        )
    return ProfileConfig()
