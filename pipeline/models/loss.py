"""The joint loss of the paper: L = mean(1 - cos(pred, target)) + lambda * BCE(vocab logits, multi-hot labels)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def multi_hot(index_lists: Sequence[Sequence[int]], k: int) -> torch.Tensor:
    """[len(index_lists), k] float tensor with 1.0 at each row's vocabulary indices (duplicates are fine)."""
    rows = [i for i, idx in enumerate(index_lists) for _ in idx]
    cols = [int(j) for idx in index_lists for j in idx]
    out = torch.zeros(len(index_lists), k, dtype=torch.float32)
    if cols:
        bad = [j for j in cols if not 0 <= j < k]
        if bad:
            raise ValueError(f"vocabulary index {bad[0]} outside [0, {k})")
        out[torch.tensor(rows), torch.tensor(cols)] = 1.0
    return out


class ReverseSDLoss(nn.Module):
    """Cosine loss on the embedding plus ``lambda_vocab`` times BCE-with-logits on the vocabulary head.

    Returns ``(total, {"cosine": ..., "bce": ...})`` with the parts detached for logging.  With
    ``lambda_vocab == 0`` or no logits / labels the total is the cosine loss alone (the baseline recipe);
    "bce" is then still reported when logits and labels are given (0 otherwise), but never enters the total.
    """

    def __init__(self, lambda_vocab: float = 0.1):
        super().__init__()
        if lambda_vocab < 0:
            raise ValueError(f"lambda_vocab must be >= 0, got {lambda_vocab}")
        self.lambda_vocab = float(lambda_vocab)

    def forward(
        self,
        embedding: torch.Tensor,
        target: torch.Tensor,
        vocab_logits: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cosine = (1.0 - F.cosine_similarity(embedding, target.to(embedding.dtype), dim=-1)).mean()
        bce = torch.zeros((), device=embedding.device, dtype=cosine.dtype)
        total = cosine
        if vocab_logits is not None and labels is not None:
            if labels.shape != vocab_logits.shape:
                raise ValueError(f"labels {tuple(labels.shape)} do not match logits {tuple(vocab_logits.shape)}")
            if self.lambda_vocab > 0:
                bce = F.binary_cross_entropy_with_logits(vocab_logits, labels.to(vocab_logits.dtype))
                total = cosine + self.lambda_vocab * bce
            else:
                with torch.no_grad():
                    bce = F.binary_cross_entropy_with_logits(vocab_logits, labels.to(vocab_logits.dtype))
        return total, {"cosine": cosine.detach(), "bce": bce.detach()}
