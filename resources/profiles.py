"""Result-changing settings per profile, as plain data built from the validated ``Settings``.

These values change what an asset computes, so they are folded into the assets' code versions
(assets/common.py, ``code_version``): change one and exactly the assets that use it, and their
downstream, turn stale.  Nothing here reads the environment: resources/settings.py does, once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from resources.settings import SAMPLE_SEED, Settings


class _AsDict:
    """as_dict of a dataclass: its settings as a plain dict (for code versions)."""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SampleSpec:
    """Size of the generated sample mirror (sample profile only)."""

    n_parts: int = 4
    images_per_part: int = 250
    seed: int = SAMPLE_SEED  # part of the mirror's directory name (resources/settings.py, sample_mirror_dir)


@dataclass(frozen=True)
class TrainingSpec(_AsDict):
    """Training settings shared by every backbone; each one changes results (part of code versions)."""

    epochs: int = 3
    preliminary_epochs: int = 2
    batch_size: int = 64
    lr: float = 1e-4
    lambda_vocab: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class CaptionerSpec(_AsDict):
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
        """The training settings of one backbone: the shared spec with that backbone's overrides."""
        return replace(self.training, **self.training_overrides.get(backbone, {}))

    def as_dict(self) -> dict:
        return asdict(self)


def _with_user_overrides(profile: dict[str, dict], settings: Settings) -> dict[str, dict]:
    """The profile's per-backbone departures, then the user's (REVERSE_SD_TRAIN_<BACKBONE>_EPOCHS / _LR) on top."""
    merged = {backbone: dict(values) for backbone, values in profile.items()}
    for backbone, values in settings.train_overrides.items():
        merged.setdefault(backbone, {}).update(values)
    return merged


def profile_config(settings: Settings) -> ProfileConfig:
    """The result-changing numbers of the settings' profile."""
    captioners = settings.captioners or CaptionerSpec.captioners
    if settings.is_sample:
        # A small sample needs a larger share of val/test for the figures to mean anything.
        # Tiny random-init backbones learn in a few epochs only with a larger learning rate.
        training = TrainingSpec(epochs=settings.train_epochs or 8, preliminary_epochs=2, batch_size=32, lr=2e-3)
        return ProfileConfig(
            sample=SampleSpec(n_parts=settings.sample_parts, images_per_part=settings.sample_images_per_part),
            split_ratios=(80, 10, 10),
            split_seed=settings.split_seed,
            vocabulary_size=300,
            training=training,
            # The tiny U-Net on frozen random-VAE latents peaks on val after 2-3 epochs and then memorises the
            # training images: early stopping keeps the best epoch anyway, so stop paying for the rest.
            training_overrides=_with_user_overrides({"unet": {"epochs": 4}}, settings),
            kmeans_k=64,
            # The tiny random-init captioner learns in ~9 epochs (3 per curriculum stage) only at a larger
            # learning rate; greedy decoding does as well as beams at this size; the swap runs at 32 px.
            captioning=CaptionerSpec(
                captioners=captioners,
                stage_epochs=3,
                lr=3e-3,
                num_beams=1,
                swap_prompts=4,
                swap_steps=3,
                swap_size=32,
            ),
        )
    return ProfileConfig(
        split_seed=settings.split_seed,
        training_overrides=_with_user_overrides({}, settings),
        captioning=CaptionerSpec(captioners=captioners),
    )
