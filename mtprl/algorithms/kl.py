"""Per-token KL estimators between the policy and the reference model, KL loss and KL-in-reward.

Reference: J. Schulman, "Approximating KL divergence" (2020, http://joschu.net/blog/kl-approx.html);
KL-in-reward as in InstructGPT (Ouyang et al. 2022, arXiv:2203.02155, eq. 2); the adaptive
coefficient of Ziegler et al. 2019 (arXiv:1909.08593, §2.2). With δ = logπ - logπ_ref per token:

    k1  ("kl", "k1")          δ
    abs ("abs")               |δ|
    k2  ("mse", "k2")         ½ δ²
    k3  ("low_var_kl", "k3")  clamp(e^κ - κ - 1, -10, 10),   κ = clamp(-δ, -20, 20)

Same values as verl ``kl_penalty`` (SPEC §4). Where we differ: an unknown kind is a ValueError naming
the closest kind (verl raises NotImplementedError), and the adaptive controller is a pure function
of (coefficient, observed KL) instead of an object mutated in place.
"""

from __future__ import annotations

import torch

from mtprl.algorithms.aggregate import aggregate_loss
from mtprl.algorithms.registry import Registry

__all__ = ["KL_PENALTIES", "adaptive_kl_coef", "apply_kl_in_reward", "kl_loss", "kl_penalty"]

# Each entry: (logprobs [B,T], ref_logprobs [B,T]) -> per-token estimate [B,T].
KL_PENALTIES: Registry = Registry("KL penalty kind")


@KL_PENALTIES.register("k1", "kl")
def _k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs - ref_logprobs


@KL_PENALTIES.register("abs")
def _abs(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return (logprobs - ref_logprobs).abs()


@KL_PENALTIES.register("k2", "mse")
def _k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logprobs - ref_logprobs).square()


@KL_PENALTIES.register("k3", "low_var_kl")
def _k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    kappa = torch.clamp(ref_logprobs - logprobs, min=-20.0, max=20.0)  # κ = clamp(-δ, -20, 20)
    return torch.clamp(torch.exp(kappa) - kappa - 1.0, min=-10.0, max=10.0)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL estimate [B,T] of kind ``kind`` (k1/kl, abs, k2/mse, k3/low_var_kl)."""
    fn = KL_PENALTIES.get(kind)
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} must match"
        )
    return fn(logprobs, ref_logprobs)


def kl_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "low_var_kl",
    loss_agg_mode: str = "token-mean",
    **agg_kwargs,
) -> torch.Tensor:
    """KL loss term (``actor.use_kl_loss``): ``aggregate_loss(kl_penalty(...), mask, mode)``.

    The trainer adds ``kl_loss_coef`` times this to the policy loss. ``agg_kwargs`` go to
    ``aggregate_loss`` (global normalisers, loss_scale_factor).
    """
    return aggregate_loss(kl_penalty(logprobs, ref_logprobs.detach(), kind), mask, loss_agg_mode, **agg_kwargs)


def apply_kl_in_reward(
    token_level_scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    kl_coef: float,
    kind: str = "kl",
) -> tuple[torch.Tensor, dict[str, float]]:
    """KL-in-reward (``algorithm.use_kl_in_reward``): r_t = score_t - β · KL_t · M_t.

    token_level_scores [B,T]: outcome score on the last token; logprobs [B,T]: the rollout policy's
    (old) logprobs; ref_logprobs [B,T]; response_mask [B,T]. Returns (token rewards [B,T], metrics):
    ``actor/reward_kl_penalty`` is the batch mean of the per-sequence masked-mean KL (as verl),
    ``actor/reward_kl_penalty_coeff`` is β.
    """
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if token_level_scores.shape != response_mask.shape:
        raise ValueError(
            f"token_level_scores {tuple(token_level_scores.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must both be [B,T]"
        )
    with torch.no_grad():
        mask_f = response_mask.to(torch.promote_types(token_level_scores.dtype, torch.float32))
        kld = kl_penalty(logprobs, ref_logprobs, kind)
        kld = torch.where(mask_f != 0, kld * mask_f, torch.zeros_like(mask_f))  # [B,T]
        rewards = token_level_scores - kl_coef * kld
        seq_len = mask_f.sum(dim=-1)
        seq_kl = kld.sum(dim=-1) / seq_len.clamp(min=1.0)  # [B]; 0 for empty responses
        nonempty = seq_len > 0
        mean_kl = seq_kl[nonempty].mean().item() if nonempty.any() else 0.0
    return rewards, {"actor/reward_kl_penalty": mean_kl, "actor/reward_kl_penalty_coeff": float(kl_coef)}


def adaptive_kl_coef(
    kl_coef: float, current_kl: float, target_kl: float, horizon: float, n_steps: int
) -> float:
    """Next β of the adaptive controller: β · (1 + clip(KL/target - 1, -0.2, 0.2) · n_steps / horizon)."""
    if target_kl <= 0 or horizon <= 0:
        raise ValueError(f"target_kl and horizon must be > 0, got target_kl={target_kl}, horizon={horizon}")
    error = min(max(current_kl / target_kl - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)
