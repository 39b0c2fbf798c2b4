"""Splitting a global batch over data-parallel ranks by token count.

Every rank holds the whole (small, host-side) global batch after the rollout gather, so each rank
can compute every rank's share deterministically; no collective is needed to agree on the split.
"""

from __future__ import annotations


def partition_by_tokens(lengths: list[int], num_parts: int) -> list[list[int]]:
    """Indices of ``lengths`` split into ``num_parts`` lists with near-equal token sums.

    Greedy longest-first: each row, longest first (ties: lower index), goes to the part with the
    fewest tokens so far (ties: the part with fewer rows, then the lower part index). Within a part
    the indices are sorted, so a part keeps the batch's order. A part may be empty when there are
    fewer rows than parts.
    """
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    parts: list[list[int]] = [[] for _ in range(num_parts)]
    loads = [0] * num_parts
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = min(range(num_parts), key=lambda k: (loads[k], len(parts[k]), k))
        parts[k].append(i)
        loads[k] += lengths[i]
    return [sorted(p) for p in parts]
