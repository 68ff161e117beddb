"""The optimizer and its schedule: AdamW on the trainable parameters, linear warm-up then cosine decay over
all the optimizer steps of a run."""

from __future__ import annotations

import math

import torch

from pipeline.training.config import TrainConfig


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the optimizer sees: frozen towers (CLIP's, the unet's VAE, BLIP-2's OPT) are left out by their
    requires_grad, so one rule serves every model instead of a method per model class."""
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW on the trainable parameters; no weight decay on biases and norm scales (1-d tensors)."""
    params = trainable_parameters(model)
    if not params:
        raise ValueError("model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=config.lr)


def cosine_with_warmup(optimizer, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to 0 over ``total_steps`` (transformers' get_cosine_schedule_with_warmup)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return float(step + 1) / float(warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
