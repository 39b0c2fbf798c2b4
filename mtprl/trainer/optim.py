"""AdamW with decoupled weight decay on matrices only, and the warmup + constant/cosine LR schedule.

Only parameters with ``requires_grad`` enter the optimizer: frozen parameters (the trunk under
``sft.freeze_trunk``, the MTP layers when ``mtp.enable_train`` is off) are never touched, weight decay
included.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mtprl.config.schema import OptimConfig


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)  # norms and biases are not decayed
    if not decay and not no_decay:
        raise ValueError("no trainable parameters: everything is frozen")
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=1e-8)


def warmup_steps(optim: OptimConfig, total_steps: int) -> int:
    if optim.lr_warmup_steps >= 0:
        return optim.lr_warmup_steps
    return int(optim.lr_warmup_steps_ratio * total_steps)


def lr_factor(step: int, *, warmup: int, total: int, style: str, min_lr_ratio: float) -> float:
    """Multiplier of the base lr for scheduler step ``step`` (0-based): linear warmup ``step / warmup``
    (0 at step 0, as verl's ``get_constant_schedule_with_warmup`` / ``get_cosine_schedule_with_warmup``),
    then constant 1, or cosine from 1 down to ``min_lr_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return step / warmup
    if style == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """One scheduler step per training step; ``optim.total_training_steps`` (> 0) overrides the run length."""
    total_steps = optim.total_training_steps if optim.total_training_steps > 0 else total_steps
    warm = warmup_steps(optim, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, warmup=warm, total=total_steps, style=optim.warmup_style,
                               min_lr_ratio=optim.min_lr_ratio),
    )


def clip_and_check(model: nn.Module, max_norm: float) -> tuple[float, bool]:
    """Clip the global grad norm; returns (norm before clipping, finite). A non-finite norm leaves the
    gradients unscaled so the caller can skip the step."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0, True
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], error_if_nonfinite=False)
    if hasattr(norm, "full_tensor"):  # FSDP2: per-rank shards' norms -> the global norm (a collective)
        norm = norm.full_tensor()
    norm = float(norm)
    if math.isfinite(norm):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.tensor(norm))
    return norm, math.isfinite(norm)
