"""AdamW with decoupled weight decay on matrices only, and the warmup + constant/cosine LR schedule.

The MTP layers may learn at their own rate (``actor_rollout_ref.model.mtp.lr``; the schedule scales it as it
scales the actor's): trained on the policy's own rollouts with ``detach_encoder``, they are draft heads whose
only job is to follow the policy, and at an RL learning rate they barely move.

Only parameters with ``requires_grad`` enter the optimizer: frozen parameters (the trunk under
``sft.freeze_trunk``, the MTP layers when ``mtp.enable_train`` is off) are never touched, weight decay
included.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mtprl.config.schema import OptimConfig


MTP_PREFIX = "mtp_layers."  # parameter names of the MTP layers (CausalLM; FSDP2 keeps the names)


def build_optimizer(model: nn.Module, optim: OptimConfig, mtp_lr: float | None = None) -> torch.optim.AdamW:
    """Groups: matrices (weight decay) and the rest (none), at ``optim.lr``; with ``mtp_lr``, the MTP layers'
    parameters in two more groups of their own (same split) at that rate - so a checkpoint saved without it
    has 2 groups and one saved with it 4 (resuming across the change is refused by load_checkpoint)."""
    split = MTP_PREFIX if mtp_lr is not None else None
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {(m, d): [] for m in (False, True) for d in (True, False)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_mtp = split is not None and name.startswith(split)
        buckets[is_mtp, p.dim() >= 2].append(p)  # norms and biases are not decayed
    if not any(buckets.values()):
        raise ValueError("no trainable parameters: everything is frozen")
    groups = [{"params": buckets[False, True], "weight_decay": optim.weight_decay},
              {"params": buckets[False, False], "weight_decay": 0.0}]
    if split is not None:
        groups += [{"params": buckets[True, True], "weight_decay": optim.weight_decay, "lr": mtp_lr},
                   {"params": buckets[True, False], "weight_decay": 0.0, "lr": mtp_lr}]
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


def pending_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes AdamW's state will take on the parameters' device and has not taken yet (its two fp32 moments per
    parameter are allocated at the first step, beside the parameter): what the rollout engine's cache plan leaves
    room for before it. A DTensor shard counts its local part; parameters on the host (FSDP2's CPU offload) none."""
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            local = p.to_local() if hasattr(p, "to_local") else p
            if p not in optimizer.state and local.device.type != "cpu":
                total += 2 * local.numel() * 4
    return total
