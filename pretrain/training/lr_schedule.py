"""Learning rate as a pure function of the step: linear warm-up, then cosine/linear decay."""

from __future__ import annotations

import math

from pretrain.train_config import OptimizerConfig


def lr_at(step: int, opt: OptimizerConfig, train_steps: int) -> float:
    """LR for optimizer step ``step`` (0-based). Pure, so resume needs no scheduler state."""
    if opt.warmup_steps and step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    if opt.decay == "constant":
        return opt.lr
    decay_steps = (opt.decay_steps or train_steps) - opt.warmup_steps
    progress = min(1.0, (step - opt.warmup_steps) / max(1, decay_steps))
    if opt.decay == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return opt.min_lr + (opt.lr - opt.min_lr) * factor
