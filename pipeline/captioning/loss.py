"""The captioner's loss: next-token LM loss plus lambda * BCE of the vocabulary head (the paper's "MLC"
applied to prompt generation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss_per_sample(token_logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Next-token cross-entropy: (mean over all target tokens, mean per sample [B]); padding is ignored.

    Position t predicts token t + 1, so [DEC] is never a target and [SEP] is (the model learns to stop).
    """
    logits = token_logits[:, :-1].float()
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    token = token.view(targets.shape)
    mask = (targets != -100).to(token.dtype)
    counts = mask.sum(dim=1)
    per_sample = (token * mask).sum(dim=1) / counts.clamp(min=1)
    mean = (token * mask).sum() / counts.sum().clamp(min=1)
    return mean, per_sample


def caption_loss(
    token_logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    vocab_logits: torch.Tensor | None = None,
    vocab_labels: torch.Tensor | None = None,
    lambda_vocab: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """(LM loss + lambda * BCE, {"lm", "bce"} detached, per-sample LM loss detached)."""
    lm, per_sample = lm_loss_per_sample(token_logits, input_ids, attention_mask)
    total = lm
    bce = torch.zeros((), device=lm.device)
    if vocab_logits is not None and vocab_labels is not None and vocab_labels.shape[-1]:
        bce = F.binary_cross_entropy_with_logits(vocab_logits.float(), vocab_labels.to(torch.float32))
        if lambda_vocab > 0:
            total = lm + lambda_vocab * bce
    return total, {"lm": lm.detach(), "bce": bce.detach()}, per_sample.detach()
