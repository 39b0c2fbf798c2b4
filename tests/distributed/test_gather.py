"""Metric reduction rules and sample gathering, on a fake two-rank environment (no process group)."""

from dataclasses import dataclass

import pytest

from mtprl.distributed.balance import partition_by_tokens
from mtprl.distributed.env import DistEnv
from mtprl.distributed.gather import gather_groups, reduce_metrics


class FakeEnv(DistEnv):
    """Rank 0 of 2 whose peer's objects are given: all_gather_object returns [ours, theirs]."""

    def __init__(self, theirs):
        object.__setattr__(self, "rank", 0)
        object.__setattr__(self, "world_size", 2)
        object.__setattr__(self, "_theirs", theirs)

    def all_gather_object(self, obj):
        return [obj, self._theirs]


def test_reduce_metrics_rules():
    ours = {"timing_s/gen": 2.0, "response_length/max": 10.0, "response_length/min": 3.0,
            "rollout/num_generated_tokens": 100.0, "rollout/tokens_per_s": 50.0, "rollout/spec_accept_length": 3.0}
    theirs = (3.0, {"timing_s/gen": 5.0, "response_length/max": 7.0, "response_length/min": 1.0,
                    "rollout/num_generated_tokens": 300.0, "rollout/tokens_per_s": 60.0,
                    "rollout/spec_accept_length": 2.0, "only/theirs": 4.0})
    out = reduce_metrics(FakeEnv(theirs), ours, weight=1.0)
    assert out["timing_s/gen"] == 5.0
    assert out["response_length/max"] == 10.0 and out["response_length/min"] == 1.0
    assert out["rollout/num_generated_tokens"] == 400.0 and out["rollout/tokens_per_s"] == 110.0
    assert out["rollout/spec_accept_length"] == pytest.approx((1 * 3.0 + 3 * 2.0) / 4)  # weighted by 1 and 3
    assert out["only/theirs"] == 4.0


def test_single_process_is_identity():
    m = {"a": 1.0}
    assert reduce_metrics(DistEnv(), m, 1.0) == m


@dataclass
class S:
    group_id: int


def test_gather_groups_keeps_group_ids_unique():
    ours, theirs = [S(0), S(0), S(1)], [S(0), S(1), S(1)]
    out = gather_groups(FakeEnv(theirs), ours)
    assert [s.group_id for s in out] == [0, 0, 2, 1, 3, 3]


def test_partition_by_tokens_balances_and_keeps_order():
    parts = partition_by_tokens([9, 1, 1, 8, 2, 7], 2)
    assert sorted(sum(parts, [])) == list(range(6))
    loads = [sum([9, 1, 1, 8, 2, 7][i] for i in p) for p in parts]
    # longest first to the lighter part: 9->0, 8->1, 7->1 (8 < 9), 2->0, 1->0, 1->0
    assert parts == [[0, 1, 2, 4], [3, 5]] and loads == [13, 15]
    assert all(p == sorted(p) for p in parts)
    assert partition_by_tokens([5], 3) == [[0], [], []]
