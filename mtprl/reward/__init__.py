"""mtprl.reward: rule-based rewards (SPEC §2.6). Torch-free, so worker processes start fast.

math_dapo.py  the DAPO math scorer (``compute_score``) with an optional math-verify fallback
overlong.py   DAPO overlong shaping (``overlong_penalty``)
scorers.py    data_source -> scorer (``default_compute_score``)
custom.py     loading a user's reward function from a file (``load_custom_reward_fn``)
pool.py       scoring in worker processes with per-sample deadlines (``ScoringPool``)
registry.py   reward managers ``naive`` / ``dapo`` (``build_reward_manager``)
build.py      the run's reward manager from the config (``build_reward``; not imported here)
"""

from mtprl.reward import math_dapo
from mtprl.reward.custom import load_custom_reward_fn
from mtprl.reward.overlong import overlong_penalty
from mtprl.reward.pool import ScoreFnSpec, ScoreOutcome, ScoreRequest, ScoringPool
from mtprl.reward.registry import (
    REWARD_MANAGERS,
    DAPORewardManager,
    NaiveRewardManager,
    OverlongBufferConfig,
    RewardInput,
    RewardManager,
    RewardOutput,
    build_reward_manager,
    get_reward_manager_cls,
)
from mtprl.reward.scorers import KNOWN_DATA_SOURCES, default_compute_score, scorer_for

__all__ = [
    "DAPORewardManager",
    "KNOWN_DATA_SOURCES",
    "NaiveRewardManager",
    "OverlongBufferConfig",
    "REWARD_MANAGERS",
    "RewardInput",
    "RewardManager",
    "RewardOutput",
    "ScoreFnSpec",
    "ScoreOutcome",
    "ScoreRequest",
    "ScoringPool",
    "build_reward_manager",
    "default_compute_score",
    "get_reward_manager_cls",
    "load_custom_reward_fn",
    "math_dapo",
    "overlong_penalty",
    "scorer_for",
]
