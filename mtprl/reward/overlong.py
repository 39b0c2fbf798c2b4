"""DAPO soft overlong punishment.

Paper: DAPO (Yu et al. 2025, arXiv:2503.14476, §3.4, eq. 13). With L_max = ``max_resp_len``,
B = ``buffer_len`` (L_cache in the paper) and α = ``penalty_factor``:

    r = min(-(|y| - (L_max - B)) / B · α, 0)

0 up to L_max - B tokens, then a linear ramp reaching -α at |y| = L_max. The reward manager adds r to
the score (on the last token). Same formula as verl's ``DAPORewardManager``. Where we differ: the
paper's piecewise form stops at -1 beyond L_max; like verl we keep the linear formula (responses are
capped at L_max, so the two agree), and bad settings are ValueErrors.
"""

from __future__ import annotations

__all__ = ["overlong_penalty"]


def overlong_penalty(response_length: int, max_resp_len: int, buffer_len: int, penalty_factor: float) -> float:
    """The overlong shaping term (<= 0) for a response of ``response_length`` tokens."""
    if buffer_len <= 0:
        raise ValueError(f"overlong buffer_len must be > 0, got {buffer_len}")
    if buffer_len > max_resp_len:
        raise ValueError(
            f"overlong buffer_len={buffer_len} must be <= max_resp_len={max_resp_len}: the penalty ramps over "
            "the last buffer_len tokens before max_resp_len"
        )
    if response_length < 0:
        raise ValueError(f"response_length must be >= 0, got {response_length}")
    if penalty_factor < 0:
        raise ValueError(f"penalty_factor must be >= 0, got {penalty_factor}")
    exceed = response_length - (max_resp_len - buffer_len)
    return min(-exceed / buffer_len * penalty_factor, 0.0)
