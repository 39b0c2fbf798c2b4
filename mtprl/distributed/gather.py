"""Host-side reductions of one RL step across data-parallel ranks: samples and metrics.

Each rank generates whole prompt groups on its own engine; the kept samples of every rank are then
gathered so that every rank holds the same global batch (rank-major order), which makes the GRPO
statistics, the loss normalisers and the metrics the ones a single process computes on that batch.
"""

from __future__ import annotations

from typing import Any

from mtprl.distributed.env import DistEnv


def gather_groups(env: DistEnv, samples: list[Any]) -> list[Any]:
    """Every rank's samples, rank 0's first; group ids renumbered to stay unique across ranks (each
    rank numbers its groups from its own counter)."""
    if not env.distributed:
        return samples
    out: list[Any] = []
    for rank, part in enumerate(env.all_gather_object(samples)):
        for s in part:
            s.group_id = s.group_id * env.world_size + rank
            out.append(s)
    return out


def reduce_metrics(env: DistEnv, metrics: dict[str, float], weight: float) -> dict[str, float]:
    """One metrics dict for the step from every rank's: ``timing_s/*`` and ``*/max`` take the maximum
    (a step lasts as long as its slowest rank), ``*/min`` the minimum, counts (``num_*``) and rates of
    the whole job (``tokens_per_s``) the sum, everything else the mean weighted by ``weight`` (e.g. the
    rank's number of generated samples or decode steps). Keys missing on a rank count as absent there."""
    if not env.distributed:
        return dict(metrics)
    rows = env.all_gather_object((weight, metrics))
    keys = sorted({k for _, m in rows for k in m})
    out: dict[str, float] = {}
    for k in keys:
        present = [(w, m[k]) for w, m in rows if k in m]
        leaf = k.rsplit("/", 1)[-1]
        if k.startswith("timing_s/") or leaf == "max" or leaf.startswith("max_"):
            out[k] = max(v for _, v in present)
        elif leaf == "min" or leaf.startswith("min_"):
            out[k] = min(v for _, v in present)
        elif leaf.startswith("num_") or leaf in ("tokens_per_s",) or leaf.endswith("_count"):
            out[k] = sum(v for _, v in present)
        else:
            total = sum(w for w, _ in present)
            out[k] = (sum(w * v for w, v in present) / total) if total > 0 else sum(v for _, v in present) / len(present)
    return out
