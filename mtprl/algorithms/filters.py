"""Dynamic sampling (DAPO ``algorithm.filter_groups``): drop groups whose responses all scored alike.

Paper: DAPO (Yu et al. 2025, arXiv:2503.14476, §3.2, eq. 11): the constraint
0 < |{o_i : is_equivalent(a, o_i)}| < G, i.e. keep a prompt only if its G responses are neither all
right nor all wrong. As in verl's ``RayDAPOTrainer``: a group is kept when the *population* std
(``np.std``, ddof=0) of its metric (acc, score, seq_reward, ...) is > 0 or when it holds a single
sample (``std > 0 or len == 1``: with ``rollout.n=1`` every group is a singleton, and dropping them
would never fill a batch), and generation batches are accumulated until ``target_num_groups``
(= ``data.train_batch_size``) groups are kept or ``max_num_gen_batches`` batches were generated
(0 = unlimited), past which it is an error. ``keep_singletons=False`` drops singletons too (std 0).

Where we differ from verl:
  * the kept batch is cut to exactly ``target_num_groups`` whole groups (verl cuts to
    ``train_batch_size * n`` trajectories, which splits a group when group sizes differ);
  * the same group id in two generation batches counts as two groups (ids are per batch); give each
    prompt of each batch a fresh id (verl uses a uuid) so the advantage step does not merge them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generic, Hashable, Sequence, TypeVar

import numpy as np
import torch

__all__ = ["DynamicSamplingAccumulator", "FilterResult", "filter_groups_by_std"]

T = TypeVar("T")


@dataclass(frozen=True)
class FilterResult:
    """Which samples of one generation batch survive the group filter.

    kept_group_ids: ids of the kept groups, in order of first appearance.
    kept_indices: sample indices [n_kept] (into the batch) of the kept groups, in batch order.
    num_groups: number of groups in the batch.
    """

    kept_group_ids: list[Hashable]
    kept_indices: list[int]
    num_groups: int

    @property
    def num_kept_groups(self) -> int:
        return len(self.kept_group_ids)


def _to_list(values) -> list:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().tolist()
    if isinstance(values, np.ndarray):
        return values.tolist()
    return list(values)


def filter_groups_by_std(
    metric_values: Sequence[float] | torch.Tensor | np.ndarray,
    group_ids: Sequence[Hashable] | torch.Tensor | np.ndarray,
    keep_singletons: bool = True,
) -> FilterResult:
    """Keep the groups whose metric has population std > 0, and (verl's rule) groups of one sample
    unless ``keep_singletons=False`` (module docstring).

    metric_values [N]: one number (or bool) per sample; group_ids [N]: same id = same prompt.
    """
    values = _to_list(metric_values)
    ids = _to_list(group_ids)
    if len(values) != len(ids):
        raise ValueError(f"got {len(values)} metric values for {len(ids)} group ids; pass one per sample")
    members: dict[Hashable, list[int]] = {}
    try:
        for i, gid in enumerate(ids):
            members.setdefault(gid, []).append(i)
    except TypeError as e:
        raise ValueError(f"group ids must be hashable (str, int, ...): {e}") from None
    kept_ids: list[Hashable] = []
    for gid, idx in members.items():
        vals = np.asarray([values[i] for i in idx], dtype=np.float64)
        if not np.isfinite(vals).all():
            raise ValueError(f"metric values of group {gid!r} contain NaN or inf: {vals.tolist()}")
        if np.std(vals) > 0 or (keep_singletons and len(idx) == 1):
            kept_ids.append(gid)
    kept_set = set(kept_ids)
    kept_indices = [i for i, gid in enumerate(ids) if gid in kept_set]
    return FilterResult(kept_group_ids=kept_ids, kept_indices=kept_indices, num_groups=len(members))


@dataclass
class DynamicSamplingAccumulator(Generic[T]):
    """Collects the kept groups of successive generation batches until enough are kept.

    Use::

        acc = DynamicSamplingAccumulator(target_num_groups=train_batch_size, max_num_gen_batches=10)
        while not acc.done:
            batch = generate_and_score()                   # list of samples
            acc.add(batch, [s.acc for s in batch], [s.uid for s in batch])
        samples = acc.samples()                            # exactly target_num_groups whole groups

    ``add`` raises ValueError when ``max_num_gen_batches`` batches have been generated (> 0) and
    still fewer than ``target_num_groups`` groups are kept.
    """

    target_num_groups: int
    max_num_gen_batches: int = 0
    keep_singletons: bool = True  # verl: a group of one sample is kept
    # data parallelism: local kept-group count -> the count over all ranks (an all-reduce, called once per
    # add on every rank); ``done`` then means enough groups are kept globally and samples() returns every
    # local kept group (the caller gathers them and keeps the first target_num_groups)
    count_kept: Callable[[int], int] | None = None
    num_gen_batches: int = field(default=0, init=False)  # generation batches added so far
    num_groups_seen: int = field(default=0, init=False)  # groups in those batches, kept or not
    _groups: list[list[T]] = field(default_factory=list, init=False, repr=False)  # kept, in arrival order
    _global_kept: int = field(default=0, init=False, repr=False)  # with count_kept: the all-rank count

    def __post_init__(self) -> None:
        if self.target_num_groups <= 0:
            raise ValueError(f"target_num_groups must be > 0, got {self.target_num_groups}")
        if self.max_num_gen_batches < 0:
            raise ValueError(
                f"max_num_gen_batches must be >= 0 (0 = unlimited), got {self.max_num_gen_batches}"
            )

    @property
    def num_kept_groups(self) -> int:
        return len(self._groups)

    @property
    def done(self) -> bool:
        kept = self.num_kept_groups if self.count_kept is None else self._global_kept
        return kept >= self.target_num_groups

    def add(
        self,
        samples: Sequence[T],
        metric_values: Sequence[float] | torch.Tensor | np.ndarray,
        group_ids: Sequence[Hashable] | torch.Tensor | np.ndarray,
    ) -> FilterResult:
        """Filter one generation batch (``samples`` [N] with their metric and group id) and keep the rest."""
        if self.done:
            raise ValueError(
                f"already have {self.num_kept_groups} >= target_num_groups={self.target_num_groups} groups; "
                "call samples() instead of generating more"
            )
        if len(samples) != len(_to_list(group_ids)):
            raise ValueError(f"got {len(samples)} samples for {len(_to_list(group_ids))} group ids")
        result = filter_groups_by_std(metric_values, group_ids, self.keep_singletons)
        self.num_gen_batches += 1
        self.num_groups_seen += result.num_groups
        ids = _to_list(group_ids)
        by_group: dict[Hashable, list[T]] = {gid: [] for gid in result.kept_group_ids}
        for i in result.kept_indices:
            by_group[ids[i]].append(samples[i])
        self._groups.extend(by_group[gid] for gid in result.kept_group_ids)
        if self.count_kept is not None:
            self._global_kept = self.count_kept(self.num_kept_groups)
        limit = self.max_num_gen_batches
        if not self.done and limit > 0 and self.num_gen_batches >= limit:
            kept = self.num_kept_groups if self.count_kept is None else self._global_kept
            raise ValueError(
                f"dynamic sampling kept only {kept} of the {self.target_num_groups} groups "
                f"needed after {self.num_gen_batches} generation batches (max_num_gen_batches={limit}): "
                f"{self.num_groups_seen - self.num_kept_groups} of {self.num_groups_seen} groups had the same "
                "metric for every response. The data may be too hard or too easy for the model; raise "
                "algorithm.filter_groups.max_num_gen_batches (0 = no limit), raise rollout.n, or use "
                "easier / harder prompts."
            )
        return result

    def samples(self) -> list[T]:
        """The samples of the first ``target_num_groups`` kept groups, group by group."""
        if not self.done:
            raise ValueError(
                f"only {self.num_kept_groups} of {self.target_num_groups} groups kept so far; keep calling add()"
            )
        groups = self._groups if self.count_kept is not None else self._groups[: self.target_num_groups]
        return [s for group in groups for s in group]

    def metrics(self) -> dict[str, float]:
        """``train/num_gen_batches`` (verl's name) and the fraction of seen groups that were kept."""
        seen = max(self.num_groups_seen, 1)
        return {
            "train/num_gen_batches": float(self.num_gen_batches),
            "train/kept_group_frac": self.num_kept_groups / seen,
        }
