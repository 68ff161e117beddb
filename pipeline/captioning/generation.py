"""Prompt generation with a trained captioner."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.captioning.model import Captioner
from pipeline.training.datasets import image_tensor


def generate_prompts(
    captioner: Captioner,
    images: Sequence[bytes],
    batch_size: int = 32,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    device: str | torch.device = "auto",
    **kwargs,
) -> list[str]:
    """Generated prompt text for encoded images, in order; settings not given are the captioner's own
    (``kwargs``: see Captioner.generate)."""
    from pipeline.training.loop import resolve_device

    dev = resolve_device(device) if isinstance(device, str) else device
    captioner.to(dev).eval()
    out: list[str] = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        pixels = torch.stack([image_tensor(b, captioner.image_size, captioner.mean, captioner.std) for b in batch])
        out += captioner.generate(pixels.to(dev), num_beams=num_beams, max_new_tokens=max_new_tokens, **kwargs)
    return out
