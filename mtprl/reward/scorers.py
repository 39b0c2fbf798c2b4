"""Which rule-based scorer grades a sample, chosen by its ``data_source`` (verl ``default_compute_score``).

Every scorer, built-in or custom, is called with the keyword arguments verl uses:
``fn(data_source=..., solution_str=..., ground_truth=..., extra_info=...)`` and returns a float score
or a dict with at least ``"score"``.

Known data sources (all graded by ``math_dapo.compute_score``):
    exact: math_dapo, math, aime, synthetic_arith (mtprl.data.synthetic)
    prefix: "math_dapo" (math_dapo_*), "aime" (aime_2024, aime25, ...)
Anything else is a ValueError listing these, unless a custom reward function is configured.
Where we differ from verl: verl grades MATH-lighteval sources with a \\boxed{} scorer and many other
sources (gsm8k, code, ...) with their own scorers; we ship the DAPO math scorer only and say so.
"""

from __future__ import annotations

from typing import Any, Callable

from mtprl.reward import math_dapo

__all__ = ["KNOWN_DATA_SOURCES", "KNOWN_DATA_SOURCE_PREFIXES", "default_compute_score", "scorer_for"]

KNOWN_DATA_SOURCES = ("aime", "math", "math_dapo", "synthetic_arith")
KNOWN_DATA_SOURCE_PREFIXES = ("aime", "math_dapo")


def scorer_for(data_source: str) -> Callable[..., dict[str, Any]]:
    """The built-in scorer for ``data_source``; an unknown source is a ValueError listing the known ones."""
    if isinstance(data_source, str) and (
        data_source in KNOWN_DATA_SOURCES or data_source.startswith(KNOWN_DATA_SOURCE_PREFIXES)
    ):
        return math_dapo.compute_score
    raise ValueError(
        f"no built-in reward function for data_source={data_source!r}. Known data sources: "
        f"{', '.join(KNOWN_DATA_SOURCES)} and names starting with {', '.join(KNOWN_DATA_SOURCE_PREFIXES)} "
        "(all graded by the DAPO math scorer). Rename the data_source column, or set "
        "custom_reward_function.path / custom_reward_function.name to your own function."
    )


def default_compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict | None = None,
    *,
    use_math_verify: bool = False,
) -> dict[str, Any]:
    """Grade one response with the scorer of its data source: {"score", "acc", "pred"}."""
    del extra_info  # the math scorer does not read it
    scorer = scorer_for(data_source)
    return scorer(solution_str, ground_truth, use_math_verify=use_math_verify)
