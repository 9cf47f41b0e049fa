"""Optimizer and learning-rate schedule: AdamW (fused on CUDA), linear warmup then cosine decay."""

from __future__ import annotations

import math

import torch

from gemma3vl.train.config import OptimSettings


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, settings: OptimSettings, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on norms, biases and 1-D parameters."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        from gemma3vl.errors import Gemma3VLError

        raise Gemma3VLError("nothing to train: every parameter is frozen (check train.freeze_* and peft.*)")
    fused = device.type == "cuda" if settings.fused == "auto" else settings.fused in ("true", "1", True)
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=settings.lr,
        betas=(settings.beta1, settings.beta2),
        eps=settings.eps,
        fused=fused or None,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, settings: OptimSettings, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(
            step, warmup_steps=settings.warmup_steps, total_steps=total_steps, min_ratio=settings.min_lr_ratio
        ),
    )
