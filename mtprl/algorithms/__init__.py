"""mtprl.algorithms: pure tensor functions of DAPO / GRPO behind name registries (SPEC §2.5, §3, §4).

advantages.py   GRPO, RLOO, REINFORCE++ advantages; ``ADV_ESTIMATORS`` / ``get_adv_estimator``
policy_loss.py  clipped policy loss with clip-higher and dual-clip; ``POLICY_LOSSES``
aggregate.py    loss aggregation modes (token-mean, seq-mean-*) with global normalisers
kl.py           k1 / abs / k2 / k3 KL estimators, KL loss, KL-in-reward, adaptive KL coefficient
entropy.py      entropy from logits, entropy bonus, token logprobs
filters.py      dynamic sampling (``algorithm.filter_groups``)
"""

from mtprl.algorithms.advantages import (
    ADV_ESTIMATORS,
    AdvantageEstimatorFn,
    broadcast_to_tokens,
    compute_grpo_advantages,
    compute_reinforce_plus_plus_advantages,
    compute_rloo_advantages,
    get_adv_estimator,
    group_index,
    scores_to_token_rewards,
)
from mtprl.algorithms.aggregate import LOSS_AGG_MODES, aggregate_loss, count_normalisers
from mtprl.algorithms.entropy import entropy_bonus, entropy_from_logits, logprobs_from_logits
from mtprl.algorithms.filters import DynamicSamplingAccumulator, FilterResult, filter_groups_by_std
from mtprl.algorithms.kl import KL_PENALTIES, adaptive_kl_coef, apply_kl_in_reward, kl_loss, kl_penalty
from mtprl.algorithms.policy_loss import (
    POLICY_LOSSES,
    get_policy_loss,
    masked_mean,
    policy_loss,
    policy_loss_matrix,
)
from mtprl.algorithms.registry import Registry, unknown_name_message

__all__ = [
    "ADV_ESTIMATORS",
    "AdvantageEstimatorFn",
    "DynamicSamplingAccumulator",
    "FilterResult",
    "KL_PENALTIES",
    "LOSS_AGG_MODES",
    "POLICY_LOSSES",
    "Registry",
    "adaptive_kl_coef",
    "aggregate_loss",
    "apply_kl_in_reward",
    "broadcast_to_tokens",
    "compute_grpo_advantages",
    "compute_reinforce_plus_plus_advantages",
    "compute_rloo_advantages",
    "count_normalisers",
    "entropy_bonus",
    "entropy_from_logits",
    "filter_groups_by_std",
    "get_adv_estimator",
    "get_policy_loss",
    "group_index",
    "kl_loss",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_mean",
    "policy_loss",
    "policy_loss_matrix",
    "scores_to_token_rewards",
    "unknown_name_message",
]
