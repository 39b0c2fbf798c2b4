"""PromptLoader: seeded epochs, drop_last, and exact resumption from state_dict()."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mtprl.data.loader import PromptLoader


def take(loader: PromptLoader, n: int) -> list[list]:
    """The next n batches, crossing epoch boundaries as a training loop does."""
    out: list[list] = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


def test_drop_last_epochs_are_disjoint_permutations():
    items = list(range(10))
    loader = PromptLoader(items, batch_size=3, seed=7)
    assert len(loader) == 3
    epoch0 = list(loader)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["cursor"] == 0
    epoch1 = list(loader)
    for epoch in (epoch0, epoch1):
        flat = [x for b in epoch for x in b]
        assert [len(b) for b in epoch] == [3, 3, 3]
        assert len(set(flat)) == 9 and set(flat) <= set(items)
    assert epoch0 != epoch1
    # the order is the documented permutation of (seed, epoch)
    perm = np.random.default_rng([7, 0]).permutation(10)
    assert epoch0[0] == [items[i] for i in perm[:3]]


def test_same_seed_same_batches_other_seed_other_batches():
    a = take(PromptLoader(list(range(20)), batch_size=4, seed=1), 7)
    b = take(PromptLoader(list(range(20)), batch_size=4, seed=1), 7)
    c = take(PromptLoader(list(range(20)), batch_size=4, seed=2), 7)
    assert a == b and a != c


def test_keep_last_and_no_shuffle():
    loader = PromptLoader(list("abcdefg"), batch_size=3, seed=0, shuffle=False, drop_last=False)
    assert len(loader) == 3
    assert list(loader) == [["a", "b", "c"], ["d", "e", "f"], ["g"]]
    assert list(loader) == [["a", "b", "c"], ["d", "e", "f"], ["g"]]
    shuffled = PromptLoader(list("abcdefg"), batch_size=3, seed=0, drop_last=False)
    for _ in range(3):
        epoch = list(shuffled)
        assert [len(b) for b in epoch] == [3, 3, 1]
        assert sorted(x for b in epoch for x in b) == list("abcdefg")


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("stop_at", [0, 1, 2, 3, 4, 7, 10])
def test_resume_gives_the_uninterrupted_batches(drop_last, stop_at):
    items = [f"p{i}" for i in range(11)]
    total = 13  # several epochs of 3 (drop_last) or 4 batches
    reference = take(PromptLoader(items, batch_size=3, seed=5, drop_last=drop_last), total)

    first = PromptLoader(items, batch_size=3, seed=5, drop_last=drop_last)
    before = take(first, stop_at) if stop_at else []
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = PromptLoader(items, batch_size=3, seed=5, drop_last=drop_last)
    resumed.load_state_dict(state)
    assert before + take(resumed, total - stop_at) == reference


def test_state_after_a_partial_epoch():
    loader = PromptLoader(list(range(12)), batch_size=4, seed=3)
    take(loader, 2)
    assert loader.state_dict() == {
        "epoch": 0, "cursor": 2, "seed": 3, "batch_size": 4, "num_items": 12, "shuffle": True, "drop_last": True,
    }
    take(loader, 1)
    assert (loader.epoch, loader.cursor) == (1, 0)


def test_load_state_dict_refuses_a_different_run():
    state = PromptLoader(list(range(12)), batch_size=4, seed=3).state_dict()
    with pytest.raises(ValueError, match="saved seed=3 but this run has seed=4"):
        PromptLoader(list(range(12)), batch_size=4, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="num_items"):
        PromptLoader(list(range(13)), batch_size=4, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="bad loader state"):
        PromptLoader(list(range(12)), batch_size=4, seed=3).load_state_dict({**state, "cursor": 3})


def test_bad_arguments():
    with pytest.raises(ValueError, match="larger than the data set"):
        PromptLoader([1, 2], batch_size=3, seed=0)
    with pytest.raises(ValueError, match="empty"):
        PromptLoader([], batch_size=1, seed=0)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        PromptLoader([1], batch_size=0, seed=0)
    assert list(PromptLoader([1, 2], batch_size=3, seed=0, drop_last=False)) in ([[1, 2]], [[2, 1]])
