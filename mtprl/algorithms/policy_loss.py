"""Clipped policy-gradient loss with clip-higher (DAPO) and dual-clip.

Papers: PPO (Schulman et al. 2017, arXiv:1707.06347, eq. 7); decoupled clip range "clip-higher"
(DAPO, Yu et al. 2025, arXiv:2503.14476, eq. 8-10); dual-clip (Ye et al. 2020, arXiv:1912.09729,
eq. 5). Per token, with δ = logπ - logπ_old:

    ρ   = exp(clamp(δ, -20, 20))
    L1  = -A ρ
    L2  = -A clip(ρ, 1 - ε_low, 1 + ε_high)
    Lc  = max(L1, L2)
    L   = min(-A c, Lc)   if A < 0   (dual clip: the loss of a negative-advantage token is bounded)
          Lc              otherwise
Metrics (masked means over the tokens of this call):
    pg_clipfrac       = mean[L2 > L1]
    pg_clipfrac_lower = mean[(Lc > -A c) ∧ (A < 0)]
    ppo_kl            = mean(logπ_old - logπ)

Same maths as verl ``compute_policy_loss_vanilla``. Where we differ: ``ppo_kl`` uses the unclamped δ,
as SPEC §4 writes it (verl averages the clamped δ; the two differ only when |δ| > 20); the metrics
are detached 0-d tensors (no host sync); advantages may be given per sequence [B] and are then
broadcast over the tokens; bad clip settings are ValueErrors, not asserts. The [B,T] loss matrix and
its aggregation are separate steps (``policy_loss_matrix`` + ``aggregate_loss``).
"""

from __future__ import annotations

import torch

from mtprl.algorithms.aggregate import aggregate_loss
from mtprl.algorithms.registry import Registry

__all__ = ["POLICY_LOSSES", "get_policy_loss", "masked_mean", "policy_loss", "policy_loss_matrix"]

# Each entry: (old_logprobs, logprobs, advantages, mask, clip_ratio_low, clip_ratio_high, clip_ratio_c)
# -> (loss matrix [B,T], metrics). Only the DAPO/PPO loss for now ("vanilla", verl's name).
POLICY_LOSSES: Registry = Registry("policy loss")

LOG_RATIO_CLAMP = 20.0


def get_policy_loss(name: str):
    """The policy-loss-matrix function registered as ``name`` (``vanilla``)."""
    return POLICY_LOSSES.get(name)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ values·M / Σ M over all entries; 0 when the mask is all zero. Masked-out NaN/inf ignored."""
    mask_f = mask.to(torch.promote_types(values.dtype, torch.float32))
    total = torch.where(mask_f != 0, values * mask_f, torch.zeros_like(values, dtype=mask_f.dtype)).sum()
    count = mask_f.sum()
    return total / torch.where(count > 0, count, torch.ones_like(count))


def _check_inputs(old_logprobs, logprobs, advantages, mask, clip_ratio_low, clip_ratio_high, clip_ratio_c):
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B,T], got shape {tuple(logprobs.shape)}")
    for name, t in (("old_logprobs", old_logprobs), ("mask", mask)):
        if t.shape != logprobs.shape:
            raise ValueError(f"{name} {tuple(t.shape)} must have the shape of logprobs {tuple(logprobs.shape)}")
    if advantages.shape == logprobs.shape[:1]:
        advantages = advantages.unsqueeze(-1).expand_as(logprobs)
    elif advantages.shape != logprobs.shape:
        raise ValueError(
            f"advantages must be [B,T] {tuple(logprobs.shape)} or [B] ({logprobs.shape[0]},), "
            f"got {tuple(advantages.shape)}"
        )
    if not 0.0 <= clip_ratio_low < 1.0:
        raise ValueError(f"clip_ratio_low must be in [0, 1) so that 1 - clip_ratio_low > 0, got {clip_ratio_low}")
    if not clip_ratio_high >= 0.0:
        raise ValueError(f"clip_ratio_high must be >= 0, got {clip_ratio_high}")
    if not clip_ratio_c > 1.0:
        raise ValueError(
            f"clip_ratio_c (dual-clip bound) must be > 1.0, got {clip_ratio_c}; the usual value is 3.0"
        )
    return advantages


@POLICY_LOSSES.register("vanilla")
def policy_loss_matrix(
    old_logprobs: torch.Tensor,
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_c: float = 3.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped loss [B,T] and metrics (module docstring). Gradients flow through ``logprobs``.

    old_logprobs [B,T]: logπ_old of the sampled tokens (no grad needed); logprobs [B,T]: logπ;
    advantages [B,T] or [B]; mask [B,T]: 1 = token counts in the metrics.
    """
    advantages = _check_inputs(
        old_logprobs, logprobs, advantages, mask, clip_ratio_low, clip_ratio_high, clip_ratio_c
    )
    advantages = advantages.detach()
    log_ratio = logprobs - old_logprobs.detach()  # δ [B,T]
    ratio = torch.exp(torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # ρ [B,T]
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    loss_clip = torch.maximum(loss1, loss2)  # Lc
    loss3 = -advantages * clip_ratio_c
    negative = advantages < 0
    loss = torch.where(negative, torch.minimum(loss3, loss_clip), loss_clip)
    with torch.no_grad():
        metrics = {
            "pg_clipfrac": masked_mean((loss2 > loss1).float(), mask),
            "pg_clipfrac_lower": masked_mean(((loss_clip > loss3) & negative).float(), mask),
            "ppo_kl": masked_mean(-log_ratio, mask),
        }
    return loss, metrics


def policy_loss(
    old_logprobs: torch.Tensor,
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_c: float = 3.0,
    loss_agg_mode: str = "token-mean",
    *,
    loss_scale_factor: float | None = None,
    global_num_tokens: float | None = None,
    global_num_seqs: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DAPO policy loss: ``policy_loss_matrix`` aggregated with ``aggregate_loss``.

    Returns (scalar loss with grad to ``logprobs``, {"pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"}
    as detached 0-d tensors). The keyword arguments are passed to ``aggregate_loss``.
    """
    loss_mat, metrics = policy_loss_matrix(
        old_logprobs, logprobs, advantages, mask, clip_ratio_low, clip_ratio_high, clip_ratio_c
    )
    loss = aggregate_loss(
        loss_mat,
        mask,
        loss_agg_mode,
        loss_scale_factor,
        global_num_tokens=global_num_tokens,
        global_num_seqs=global_num_seqs,
    )
    return loss, metrics
