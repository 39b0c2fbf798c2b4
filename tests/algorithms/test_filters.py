"""Dynamic sampling: group filter (population std > 0) and the generation-batch accumulator."""

import numpy as np
import pytest
import torch

from mtprl.algorithms import DynamicSamplingAccumulator, filter_groups_by_std


def test_filter_hand_picked_groups():
    # a: [1, 1, 1] all right -> std 0, drop;   b: [0, 1, 0] -> std 0.471 > 0, keep
    # c: [0] a group of one -> kept (verl);    d: [0.5, 0.5] -> drop;   e: [True, False] -> keep
    ids = ["a", "b", "a", "b", "c", "a", "b", "d", "d", "e", "e"]
    acc = [1, 0, 1, 1, 0, 1, 0, 0.5, 0.5, True, False]
    r = filter_groups_by_std(acc, ids)
    assert r.kept_group_ids == ["b", "c", "e"]
    assert r.kept_indices == [1, 3, 4, 6, 9, 10]
    assert r.num_groups == 5 and r.num_kept_groups == 3


def test_filter_keeps_singletons_by_default_as_verl():
    # verl: kept = [uid for uid, std in ... if std > 0 or len(vals[uid]) == 1]
    r = filter_groups_by_std([1.0, 0.0, 1.0, 1.0], [0, 1, 2, 2])
    assert r.kept_group_ids == [0, 1]
    r = filter_groups_by_std([1.0, 0.0, 1.0, 1.0], [0, 1, 2, 2], keep_singletons=False)
    assert r.kept_group_ids == []


def test_accumulator_with_one_sample_per_group_fills_in_one_batch():
    # GRPO with rollout.n=1: every group is a singleton; dropping them would never fill a batch
    acc = DynamicSamplingAccumulator(target_num_groups=3, max_num_gen_batches=1)
    acc.add(*_batch("b1", [[1], [0], [1]]))
    assert acc.done and acc.num_gen_batches == 1
    assert acc.samples() == [("b1", 0, 0), ("b1", 1, 0), ("b1", 2, 0)]


def test_filter_uses_population_std_and_accepts_tensors():
    # any spread at all keeps the group; np.std([1, 1, 1+1e-9]) > 0
    r = filter_groups_by_std(np.array([1.0, 1.0, 1.0 + 1e-9]), torch.tensor([4, 4, 4]))
    assert r.kept_group_ids == [4]
    with pytest.raises(ValueError, match="one per sample"):
        filter_groups_by_std([1.0, 0.0], [0])
    with pytest.raises(ValueError, match="NaN"):
        filter_groups_by_std([1.0, float("nan")], [0, 0])


def _batch(tag, accs_per_group):
    """Samples (tag, group, i), their acc, and group ids for a list of per-group acc lists."""
    samples, accs, ids = [], [], []
    for g, group in enumerate(accs_per_group):
        for i, a in enumerate(group):
            samples.append((tag, g, i))
            accs.append(a)
            ids.append(f"{tag}-{g}")
    return samples, accs, ids


def test_accumulator_collects_until_target_and_cuts_whole_groups():
    acc = DynamicSamplingAccumulator(target_num_groups=3, max_num_gen_batches=5)
    r = acc.add(*_batch("b1", [[1, 0], [1, 1], [0, 1]]))  # keeps groups 0 and 2
    assert r.num_kept_groups == 2 and not acc.done
    acc.add(*_batch("b2", [[0, 0], [1, 0, 1], [0, 1]]))  # keeps 2 more -> 4 >= 3
    assert acc.done and acc.num_gen_batches == 2 and acc.num_kept_groups == 4
    assert acc.samples() == [
        ("b1", 0, 0), ("b1", 0, 1), ("b1", 2, 0), ("b1", 2, 1), ("b2", 1, 0), ("b2", 1, 1), ("b2", 1, 2),
    ]
    m = acc.metrics()
    assert m["train/num_gen_batches"] == 2.0
    assert m["train/kept_group_frac"] == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="samples"):
        acc.add(*_batch("b3", [[1, 0]]))


def test_accumulator_limit_raises_clear_error():
    acc = DynamicSamplingAccumulator(target_num_groups=2, max_num_gen_batches=2)
    acc.add(*_batch("b1", [[1, 1], [0, 1]]))  # 1 kept, 1 batch < 2 -> fine
    with pytest.raises(ValueError, match="max_num_gen_batches=2") as e:
        acc.add(*_batch("b2", [[0, 0], [1, 1]]))
    assert "1 of the 2 groups" in str(e.value) and "0 = no limit" in str(e.value)
    assert acc.num_gen_batches == 2


def test_accumulator_unlimited_and_bad_settings():
    acc = DynamicSamplingAccumulator(target_num_groups=1, max_num_gen_batches=0)
    for k in range(6):
        acc.add(*_batch(f"b{k}", [[1, 1]]))
    assert not acc.done and acc.num_gen_batches == 6
    with pytest.raises(ValueError, match="keep calling add"):
        acc.samples()
    acc.add(*_batch("last", [[1, 0]]))
    assert acc.done and acc.samples() == [("last", 0, 0), ("last", 0, 1)]
    with pytest.raises(ValueError, match="target_num_groups"):
        DynamicSamplingAccumulator(target_num_groups=0)
    with pytest.raises(ValueError, match="max_num_gen_batches"):
        DynamicSamplingAccumulator(target_num_groups=1, max_num_gen_batches=-1)
