"""Advantage estimators for outcome-reward RL: GRPO, RLOO, REINFORCE++.

GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, §4.1.2; used by DAPO arXiv:2503.14476 eq. 1):
    for the G responses of one prompt,  A_i = (s_i - mean(s)) / (std(s) + ε)
    std is the unbiased (Bessel, n-1) std as in verl's ``torch.std``; a group of one sample gets
    mean 0 and std 1 (verl's convention, SPEC §4); with ``norm_by_std=False`` A_i = s_i - mean(s)
    (Dr. GRPO, arXiv:2503.20783).
RLOO (Ahmadian et al. 2024, arXiv:2402.14740, eq. 6):
    A_i = s_i - 1/(n-1) Σ_{j≠i} s_j  = n/(n-1) · (s_i - mean(s)).
    Deviation: a group of one gets A = 0 (no baseline, no signal); verl leaves A = s_i there.
REINFORCE++ (Hu 2025, arXiv:2501.03262, §3): token-level discounted returns of the token rewards
    (score on the last token, minus β·KL per token when KL is in the reward, see ``kl.py``),
        G_t = r_t + γ G_{t+1}, the running return reset at every position whose mask is 0
        (verl's "reset after EOS"; a hole in the mask therefore also cuts the return),
    then whitened over every valid token of the batch: A = (G - mean) / sqrt(var_unbiased + 1e-8),
    as verl ``compute_reinforce_plus_plus_outcome_advantage`` / ``masked_whiten`` do.
    Deviation: with fewer than 2 valid tokens the variance is undefined; we return zeros where verl
    raises or divides by zero.

All outcome estimators read one score per sequence. ``scores_to_token_rewards`` places a score on
the last valid token; a response with no valid token keeps its score in column 0 (mask 0 there, so no
loss flows) so group statistics still see it.

Registry: every estimator in ``ADV_ESTIMATORS`` has the signature of ``AdvantageEstimatorFn``:
token-level rewards [B,T], response mask [B,T], group ids, and keyword hyper-parameters; it returns
(advantages [B,T], returns [B,T]), zero outside the mask.
"""

from __future__ import annotations

import math
from typing import Hashable, Protocol, Sequence

import torch

from mtprl.algorithms.registry import Registry

__all__ = [
    "ADV_ESTIMATORS",
    "AdvantageEstimatorFn",
    "broadcast_to_tokens",
    "compute_grpo_advantages",
    "compute_reinforce_plus_plus_advantages",
    "compute_rloo_advantages",
    "get_adv_estimator",
    "group_index",
    "scores_to_token_rewards",
]

GroupIds = torch.Tensor | Sequence[Hashable]


class AdvantageEstimatorFn(Protocol):
    def __call__(
        self,
        token_level_rewards: torch.Tensor,  # [B,T] score on the last token (minus KL if in reward)
        response_mask: torch.Tensor,  # [B,T] 1 = generated token that is trained on
        group_ids: GroupIds,  # [B] same id = same prompt
        *,
        epsilon: float = 1e-6,
        norm_by_std: bool = True,
        gamma: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


ADV_ESTIMATORS: Registry[AdvantageEstimatorFn] = Registry("advantage estimator")


def get_adv_estimator(name: str) -> AdvantageEstimatorFn:
    """The estimator registered as ``name`` (``grpo``, ``rloo``, ``reinforce_plus_plus``, ...)."""
    return ADV_ESTIMATORS.get(name)


# ---------------------------------------------------------------------------------------- helpers


def group_index(group_ids: GroupIds, n: int) -> tuple[torch.Tensor, int]:
    """Map ``group_ids`` (LongTensor [N] or N hashables) to dense indices [N] in 0..G-1 and G.

    Groups are numbered in order of first appearance.
    """
    if isinstance(group_ids, torch.Tensor):
        if group_ids.dim() != 1:
            raise ValueError(f"group_ids must be 1-D [N], got shape {tuple(group_ids.shape)}")
        keys = group_ids.tolist()
    else:
        keys = list(group_ids)
    if len(keys) != n:
        raise ValueError(f"got {len(keys)} group ids for {n} scores; pass one group id per sample")
    dense: dict[Hashable, int] = {}
    try:
        index = [dense.setdefault(k, len(dense)) for k in keys]
    except TypeError as e:
        raise ValueError(f"group ids must be hashable (str, int, ...): {e}") from None
    return torch.tensor(index, dtype=torch.long), len(dense)


def _check_scores(scores: torch.Tensor) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        scores = torch.as_tensor(scores)
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [N], got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores.to(torch.float64)).all():
        raise ValueError("scores contain NaN or inf; check the reward function's output")
    return scores


def _group_stats(scores64: torch.Tensor, index: torch.Tensor, num_groups: int):
    """Per-group count, mean, unbiased variance of float64 scores [N] -> three tensors [G]."""
    counts = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, index, torch.ones_like(scores64))
    sums = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, index, scores64)
    means = sums / counts
    sq = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, index, (scores64 - means[index]) ** 2)
    var = torch.where(counts > 1, sq / (counts - 1).clamp(min=1), torch.zeros_like(sq))
    return counts, means, var


def _out_dtype(scores: torch.Tensor) -> torch.dtype:
    return scores.dtype if scores.is_floating_point() else torch.float32


# ------------------------------------------------------------------------------ sequence level


def compute_grpo_advantages(
    scores: torch.Tensor,
    group_ids: GroupIds,
    epsilon: float = 1e-6,
    norm_by_std: bool = True,
) -> torch.Tensor:
    """GRPO advantages [N] from scores [N] grouped by ``group_ids`` (see module docstring)."""
    scores = _check_scores(scores)
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    index, num_groups = group_index(group_ids, scores.shape[0])
    if scores.shape[0] == 0:
        return scores.to(_out_dtype(scores))
    s = scores.detach().cpu().to(torch.float64)
    counts, means, var = _group_stats(s, index, num_groups)
    single = counts == 1
    means = torch.where(single, torch.zeros_like(means), means)  # group of one: mean 0, std 1
    std = torch.where(single, torch.ones_like(var), var.sqrt())
    adv = s - means[index]
    if norm_by_std:
        adv = adv / (std[index] + epsilon)
    return adv.to(device=scores.device, dtype=_out_dtype(scores))


def compute_rloo_advantages(scores: torch.Tensor, group_ids: GroupIds) -> torch.Tensor:
    """RLOO advantages [N]: s_i minus the mean of the other samples of its group; 0 for a group of one."""
    scores = _check_scores(scores)
    index, num_groups = group_index(group_ids, scores.shape[0])
    if scores.shape[0] == 0:
        return scores.to(_out_dtype(scores))
    s = scores.detach().cpu().to(torch.float64)
    counts, means, _ = _group_stats(s, index, num_groups)
    n = counts[index]
    # mean of the others = (n·mean - s_i) / (n-1)  =>  A_i = n/(n-1) (s_i - mean)
    adv = torch.where(n > 1, n / (n - 1).clamp(min=1) * (s - means[index]), torch.zeros_like(s))
    return adv.to(device=scores.device, dtype=_out_dtype(scores))


def broadcast_to_tokens(seq_values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Sequence values [B] -> token values [B,T]: the value on every token where the mask is 1, else 0."""
    if response_mask.dim() != 2 or seq_values.shape != response_mask.shape[:1]:
        raise ValueError(
            f"need seq_values [B] and response_mask [B,T]; got {tuple(seq_values.shape)} and "
            f"{tuple(response_mask.shape)}"
        )
    out_dtype = seq_values.dtype if seq_values.is_floating_point() else torch.float32
    return seq_values.to(out_dtype).unsqueeze(-1) * response_mask.to(out_dtype)


def scores_to_token_rewards(scores: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Outcome scores [B] -> token rewards [B,T] with the score on the last token whose mask is 1.

    A row whose mask is all zero keeps its score in column 0 (see module docstring).
    """
    if response_mask.dim() != 2 or scores.shape != response_mask.shape[:1]:
        raise ValueError(
            f"need scores [B] and response_mask [B,T]; got {tuple(scores.shape)} and {tuple(response_mask.shape)}"
        )
    B, T = response_mask.shape
    if T == 0:
        raise ValueError("response_mask has zero width; there is no token to put a reward on")
    positions = torch.arange(T, device=response_mask.device).expand(B, T)
    last = torch.where(response_mask != 0, positions, torch.zeros_like(positions)).amax(dim=-1)  # [B]
    out_dtype = scores.dtype if scores.is_floating_point() else torch.float32
    rewards = torch.zeros(B, T, dtype=out_dtype, device=scores.device)
    rewards[torch.arange(B, device=scores.device), last.to(scores.device)] = scores.to(out_dtype)
    return rewards


# --------------------------------------------------------------------------------- token level


def compute_reinforce_plus_plus_advantages(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: (advantages [B,T], returns [B,T]) from token rewards [B,T] (see module docstring)."""
    _check_token_inputs(token_level_rewards, response_mask)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    with torch.no_grad():
        rewards = token_level_rewards.to(torch.float64)
        mask = response_mask.to(torch.float64)
        returns = torch.zeros_like(rewards)
        running = torch.zeros_like(rewards[:, 0]) if rewards.shape[1] else None
        for t in reversed(range(rewards.shape[1])):
            running = rewards[:, t] + gamma * running
            returns[:, t] = running
            running = running * mask[:, t]  # a masked position does not carry into earlier tokens
        n = mask.sum()
        if n < 2:
            advantages = torch.zeros_like(returns)
        else:
            mean = (returns * mask).sum() / n
            var = (((returns - mean) ** 2) * mask).sum() / n * (n / (n - 1))
            advantages = (returns - mean) * torch.rsqrt(var + 1e-8) * mask
    dtype = token_level_rewards.dtype if token_level_rewards.is_floating_point() else torch.float32
    return advantages.to(dtype), returns.to(dtype)


def _check_token_inputs(token_level_rewards: torch.Tensor, response_mask: torch.Tensor) -> None:
    if token_level_rewards.dim() != 2 or token_level_rewards.shape != response_mask.shape:
        raise ValueError(
            f"token_level_rewards and response_mask must both be [B,T]; got {tuple(token_level_rewards.shape)} "
            f"and {tuple(response_mask.shape)}"
        )


# ------------------------------------------------------------------------------- the registry


@ADV_ESTIMATORS.register("grpo")
def grpo_estimator(token_level_rewards, response_mask, group_ids, *, epsilon=1e-6, norm_by_std=True, gamma=1.0):
    """GRPO over the summed token rewards; returns = advantages (as verl)."""
    _check_token_inputs(token_level_rewards, response_mask)
    scores = token_level_rewards.detach().sum(dim=-1)  # [B]
    adv = broadcast_to_tokens(compute_grpo_advantages(scores, group_ids, epsilon, norm_by_std), response_mask)
    return adv, adv


@ADV_ESTIMATORS.register("rloo")
def rloo_estimator(token_level_rewards, response_mask, group_ids, *, epsilon=1e-6, norm_by_std=True, gamma=1.0):
    """RLOO over the summed token rewards; returns = advantages (as verl)."""
    _check_token_inputs(token_level_rewards, response_mask)
    scores = token_level_rewards.detach().sum(dim=-1)  # [B]
    adv = broadcast_to_tokens(compute_rloo_advantages(scores, group_ids), response_mask)
    return adv, adv


@ADV_ESTIMATORS.register("reinforce_plus_plus")
def reinforce_plus_plus_estimator(
    token_level_rewards, response_mask, group_ids, *, epsilon=1e-6, norm_by_std=True, gamma=1.0
):
    """REINFORCE++ (no group baseline: ``group_ids`` unused, whitening is over the batch)."""
    del group_ids, epsilon, norm_by_std
    if not math.isfinite(gamma):
        raise ValueError(f"gamma must be finite, got {gamma}")
    return compute_reinforce_plus_plus_advantages(token_level_rewards, response_mask, gamma)
