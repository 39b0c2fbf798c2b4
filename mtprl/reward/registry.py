"""Reward managers, chosen by name (``reward_model.reward_manager``): ``naive`` and ``dapo``.

A manager grades a batch of decoded responses and returns one reward per sample (the trainer puts
it on the last response token) plus per-sample extra fields and batch metrics. As verl's
``NaiveRewardManager`` / ``DAPORewardManager``:

  * the scorer is the custom function if one is configured, else chosen by ``data_source``
    (``mtprl.reward.scorers``); a dict result gives ``score`` and its other keys become extra fields
    (``acc``, ``pred``);
  * ``dapo`` adds the overlong shaping of ``overlong.py`` to the score when
    ``overlong_buffer_cfg.enable``, and with ``overlong_buffer_cfg.log`` records per sample
    ``overlong_reward`` and ``overlong`` (penalty < 0).

Where we differ: scoring runs through ``ScoringPool`` (worker processes with per-sample deadlines);
a sample whose scorer raised, returned something that is not a finite score, or timed out gets
``failure_score`` and is counted in ``reward/num_failed`` / ``reward/num_timeout``. Default
``failure_score = -1.0``: the lowest score the built-in scorer gives, so a response can never gain
by making the scorer fail or hang (with 0.0, a response that hangs math-verify would beat a wrong
answer's -1). ``acc`` is always present: the dict's ``acc`` if given, else the float score, and
False for a failed sample. Unknown data sources fail before any scoring, with the known names.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from mtprl.reward.custom import load_custom_reward_fn
from mtprl.reward.overlong import overlong_penalty
from mtprl.reward.pool import ScoreFnSpec, ScoreOutcome, ScoreRequest, ScoringPool
from mtprl.reward.scorers import scorer_for

__all__ = [
    "DAPORewardManager",
    "NaiveRewardManager",
    "OverlongBufferConfig",
    "REWARD_MANAGERS",
    "RewardInput",
    "RewardManager",
    "RewardOutput",
    "build_reward_manager",
    "get_reward_manager_cls",
]

DEFAULT_FAILURE_SCORE = -1.0


@dataclass(frozen=True)
class RewardInput:
    """One sample to grade.

    response: the decoded response text (EOS text stripped); ground_truth: the row's
    ``reward_model.ground_truth``; data_source: selects the scorer; response_length: number of
    response tokens |y| (used by the overlong shaping); extra_info: the row's ``extra_info``.
    """

    response: str
    ground_truth: Any
    data_source: str
    response_length: int = 0
    extra_info: dict | None = None


@dataclass
class RewardOutput:
    """Rewards of a batch of N samples.

    scores: [N] final reward per sample (overlong shaping included); put it on the last token.
    raw_scores: [N] the scorer's own score, before the overlong shaping (``failure_score`` for a failed
    sample): verl's ``reward_extra_info["score"]``, which dynamic sampling on ``score`` reads.
    extra: per-sample fields, each a list of N: ``acc``, the scorer's other keys (``pred``),
    ``reward_status`` ("ok" | "error" | "timeout"), ``reward_error`` (text, "" if ok), and with
    overlong logging ``overlong_reward`` / ``overlong``.
    metrics: ``reward/num_failed``, ``reward/num_timeout``, ``reward/num_pool_restarts`` and, with
    overlong logging, ``reward/overlong_reward/mean``, ``reward/overlong/mean``.
    """

    scores: list[float]
    extra: dict[str, list[Any]]
    metrics: dict[str, float]
    raw_scores: list[float]


@dataclass(frozen=True)
class OverlongBufferConfig:
    """``reward_kwargs.overlong_buffer_cfg``: enable, len (B tokens), penalty_factor (α), log."""

    enable: bool = False
    len: int = 0
    penalty_factor: float = 1.0
    log: bool = False


def _score_of(outcome: ScoreOutcome) -> tuple[float | None, dict[str, Any], str]:
    """(score or None, extra fields, error text) of one raw scorer result."""
    result = outcome.result
    if isinstance(result, dict):
        if "score" not in result:
            return None, {}, f"the reward function returned a dict without 'score' (keys: {sorted(result)})"
        score, extra = result["score"], {k: v for k, v in result.items() if k != "score"}
    else:
        score, extra = result, {}
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        return None, {}, f"the reward function returned score={score!r}; expected a finite number"
    return float(score), extra, ""


@dataclass
class RewardManager:
    """Shared machinery of the managers (module docstring).

    custom_reward_path / custom_reward_name: ``custom_reward_function.{path,name}``; reward_fn_kwargs:
    extra keyword arguments for every call; use_math_verify: the built-in scorer's math-verify
    fallback; num_workers / timeout_s / start_method: see ``ScoringPool``; failure_score: the score of
    a failed or timed-out sample.
    """

    custom_reward_path: str | None = None
    custom_reward_name: str = "compute_score"
    reward_fn_kwargs: dict[str, Any] = field(default_factory=dict)
    use_math_verify: bool = False
    num_workers: int = 0
    timeout_s: float | None = 10.0
    failure_score: float = DEFAULT_FAILURE_SCORE
    start_method: str | None = None
    _pool: ScoringPool | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not math.isfinite(self.failure_score):
            raise ValueError(f"failure_score must be a finite number, got {self.failure_score}")
        if self.custom_reward_path is not None:
            if self.use_math_verify:
                raise ValueError(
                    "use_math_verify applies to the built-in math scorer; a custom reward function "
                    f"({self.custom_reward_path}) must call math-verify itself"
                )
            # Load once here so that a missing file or function fails at start-up.
            load_custom_reward_fn(self.custom_reward_path, self.custom_reward_name, **self.reward_fn_kwargs)
        spec = ScoreFnSpec(
            custom_path=None if self.custom_reward_path is None else str(self.custom_reward_path),
            custom_name=self.custom_reward_name,
            use_math_verify=self.use_math_verify,
            kwargs=tuple(sorted(self.reward_fn_kwargs.items())),
        )
        self._pool = ScoringPool(spec, self.num_workers, self.timeout_s, self.start_method)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_inputs(self, inputs: Sequence[RewardInput]) -> None:
        for i, x in enumerate(inputs):
            if not isinstance(x.response, str):
                raise ValueError(f"sample {i}: response must be the decoded string, got {type(x.response).__name__}")
            if self.custom_reward_path is None:
                scorer_for(x.data_source)  # unknown data source -> ValueError naming the known ones

    def _score(self, inputs: Sequence[RewardInput]) -> RewardOutput:
        self._check_inputs(inputs)
        requests = [ScoreRequest(x.data_source, x.response, x.ground_truth, x.extra_info) for x in inputs]
        restarts_before = self._pool.num_restarts
        outcomes = self._pool.score(requests)
        scores: list[float] = []
        per_sample: list[dict[str, Any]] = []
        status, errors = [], []
        for outcome in outcomes:
            score, extra, error = (None, {}, outcome.error) if outcome.status != "ok" else _score_of(outcome)
            failed = score is None
            scores.append(self.failure_score if failed else score)
            acc = False if failed else extra.get("acc", score)
            per_sample.append({**extra, "acc": acc})
            status.append(outcome.status if outcome.status != "ok" or not failed else "error")
            errors.append(error)
        keys = sorted({k for d in per_sample for k in d})
        extra_fields = {k: [d.get(k) for d in per_sample] for k in keys}
        extra_fields["reward_status"] = status
        extra_fields["reward_error"] = errors
        metrics = {
            "reward/num_failed": float(sum(s == "error" for s in status)),
            "reward/num_timeout": float(sum(s == "timeout" for s in status)),
            "reward/num_pool_restarts": float(self._pool.num_restarts - restarts_before),
        }
        return RewardOutput(scores, extra_fields, metrics, raw_scores=list(scores))

    def __call__(self, inputs: Sequence[RewardInput]) -> RewardOutput:
        return self._score(inputs)


@dataclass
class NaiveRewardManager(RewardManager):
    """Score = the scorer's score (verl ``naive``)."""


@dataclass
class DAPORewardManager(RewardManager):
    """Score plus the DAPO overlong shaping (verl ``dapo``).

    max_resp_len: L_max in tokens (``reward_kwargs.max_resp_len``); overlong_buffer_cfg: see
    ``OverlongBufferConfig`` (a dict with the same keys is accepted).
    """

    max_resp_len: int | None = None
    overlong_buffer_cfg: OverlongBufferConfig | dict = field(default_factory=OverlongBufferConfig)

    def __post_init__(self) -> None:
        if isinstance(self.overlong_buffer_cfg, dict):
            self.overlong_buffer_cfg = OverlongBufferConfig(**self.overlong_buffer_cfg)
        cfg = self.overlong_buffer_cfg
        if cfg.enable:
            if self.max_resp_len is None:
                raise ValueError(
                    "overlong_buffer_cfg.enable=True needs reward_kwargs.max_resp_len (the maximum response length)"
                )
            overlong_penalty(0, self.max_resp_len, cfg.len, cfg.penalty_factor)  # validates the settings
        super().__post_init__()

    def __call__(self, inputs: Sequence[RewardInput]) -> RewardOutput:
        cfg = self.overlong_buffer_cfg
        if cfg.enable:
            for i, x in enumerate(inputs):
                if not isinstance(x.response_length, int) or x.response_length < 0:
                    raise ValueError(
                        f"sample {i}: response_length must be the number of response tokens (int >= 0) for the "
                        f"overlong penalty, got {x.response_length!r}"
                    )
        out = self._score(inputs)
        if not cfg.enable:
            return out
        penalties = [overlong_penalty(x.response_length, self.max_resp_len, cfg.len, cfg.penalty_factor) for x in inputs]
        out.scores = [s + p for s, p in zip(out.scores, penalties)]
        if cfg.log:
            out.extra["overlong_reward"] = penalties
            out.extra["overlong"] = [p < 0 for p in penalties]
            n = max(len(penalties), 1)
            out.metrics["reward/overlong_reward/mean"] = sum(penalties) / n
            out.metrics["reward/overlong/mean"] = sum(p < 0 for p in penalties) / n
        return out


REWARD_MANAGERS: dict[str, type[RewardManager]] = {"naive": NaiveRewardManager, "dapo": DAPORewardManager}


def get_reward_manager_cls(name: str) -> type[RewardManager]:
    """The manager class registered as ``name``; unknown names raise ValueError with the closest one."""
    if name not in REWARD_MANAGERS:
        close = difflib.get_close_matches(str(name), list(REWARD_MANAGERS), n=1, cutoff=0.0)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown reward manager {name!r}{hint} Valid names: {', '.join(sorted(REWARD_MANAGERS))} "
            "(reward_model.reward_manager)"
        )
    return REWARD_MANAGERS[name]


def build_reward_manager(name: str, **kwargs: Any) -> RewardManager:
    """Construct the manager ``name`` with ``kwargs``; ``naive`` rejects the DAPO-only keyword arguments."""
    cls = get_reward_manager_cls(name)
    if cls is NaiveRewardManager:
        cfg = kwargs.get("overlong_buffer_cfg")
        enabled = cfg.get("enable", False) if isinstance(cfg, dict) else getattr(cfg, "enable", False)
        if enabled:
            raise ValueError("overlong_buffer_cfg.enable=True needs reward_model.reward_manager=dapo, not naive")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("overlong_buffer_cfg", "max_resp_len")}
    return cls(**kwargs)
