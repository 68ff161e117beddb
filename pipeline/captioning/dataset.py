"""Image-prompt pairs as the captioner trains on them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipeline.captioning.model import Captioner
from pipeline.training.datasets import LabelLists, image_tensor, multi_hot

PRELOAD_BYTES = 256 * 2**20


class CaptionDataset(torch.utils.data.Dataset):
    """(pixels, input_ids, attention_mask, multi-hot vocabulary labels, index) per pair.

    Prompts are tokenized once, padded to the captioner's max_length (the trainer trims each batch to its
    longest row).  Images are decoded in the captioner's preprocessing, as pipeline.training.datasets does: all at once
    when the decoded set fits in PRELOAD_BYTES (decoding was half of a tiny CPU epoch, every epoch), else
    lazily in the loader's workers.
    """

    def __init__(self, images, prompts: Sequence[str], labels: Sequence[np.ndarray] | None, captioner: Captioner):
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        # A memory-mapped ImageColumn (or any indexable sequence) stays as it is: never a copy of the split.
        self.images = images.to_list() if hasattr(images, "to_list") else images
        self.input_ids, self.attention_mask = captioner.encode_text(prompts)
        self.k = captioner.vocab_size
        self.labels = LabelLists(labels) if (labels is not None and self.k) else None
        if self.labels is not None:
            self.labels.check_range(self.k)
        self.size, self.mean, self.std = captioner.image_size, captioner.mean, captioner.std
        self.pixels = None
        if len(self.images) * 3 * self.size**2 * 4 <= PRELOAD_BYTES:
            self.pixels = torch.stack([self._decode(i) for i in range(len(self.images))]) if self.images else None

    def _decode(self, index: int) -> torch.Tensor:
        try:
            return image_tensor(self.images[index], self.size, self.mean, self.std)
        except Exception as exc:  # name the row: a silent skip would misalign the indices
            raise ValueError(f"cannot decode image at row {index}: {exc}") from exc

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        index = int(index)
        pixels = self.pixels[index] if self.pixels is not None else self._decode(index)
        labels = multi_hot(self.labels, index, self.k)
        return pixels, self.input_ids[index], self.attention_mask[index], labels, index


def trim_batch(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = int(mask.sum(dim=1).max())
    return ids[:, :n], mask[:, :n]
