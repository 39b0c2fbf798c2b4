"""A seeded, resumable batch sampler over an in-memory data set.

The order of epoch e is a pure function of (seed, e): a permutation drawn from
`numpy.random.default_rng([seed, e])`. So the loader's whole state is two integers,
`epoch` and `cursor` (batches of that epoch already handed out), and a run resumed from
`state_dict()` gets exactly the batches an uninterrupted run would have got.

drop_last=True (the default for training, as in verl's train dataloader): each epoch yields
`len(items) // batch_size` full batches; the items that fall in the last partial batch are
skipped for that epoch (a different shuffle next epoch gives them their turn).
drop_last=False: the last batch of an epoch may be smaller.

The state advances as each batch is handed out; after the last batch of an epoch it rolls to
(epoch + 1, cursor 0), so a checkpoint taken between two batches always resumes on the next one.
"""

from __future__ import annotations

from typing import Any, Generic, Iterator, Sequence, TypeVar

import numpy as np

T = TypeVar("T")


class PromptLoader(Generic[T]):
    """Yields lists of `batch_size` items; iterate once per epoch (`for batch in loader`).

    items: the data set (a list or anything indexable with len), e.g. PromptDataset.prompts.
    batch_size: items per batch (verl's `data.train_batch_size`, counted in prompts).
    seed: shuffle seed; ignored when shuffle is False (epochs then run in file order).
    drop_last: see the module docstring.
    """

    def __init__(
        self, items: Sequence[T], *, batch_size: int, seed: int, shuffle: bool = True, drop_last: bool = True
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if len(items) == 0:
            raise ValueError("the data set is empty: nothing to batch")
        if drop_last and len(items) < batch_size:
            raise ValueError(
                f"batch_size={batch_size} is larger than the data set ({len(items)} items) with "
                "drop_last=True, so no batch can be made; lower data.train_batch_size or add data"
            )
        self.items = items
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.cursor = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.items)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """[N] the item order of `epoch` (a permutation when shuffling, else 0..N-1)."""
        n = len(self.items)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def __iter__(self) -> Iterator[list[T]]:
        """The remaining batches of the current epoch; the state advances before each yield."""
        epoch = self.epoch
        order = self.epoch_order(epoch)
        while self.epoch == epoch:
            start = self.cursor * self.batch_size
            batch = [self.items[int(i)] for i in order[start:start + self.batch_size]]
            self.cursor += 1
            if self.cursor >= len(self):
                self.epoch, self.cursor = epoch + 1, 0
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Plain ints and bools (JSON-safe): where we are plus what must match on resume."""
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_items": len(self.items),
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`; refuses a state made with another seed, size or batch size."""
        for key in ("seed", "batch_size", "num_items", "shuffle", "drop_last"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise ValueError(
                    f"cannot resume the data loader: saved {key}={state.get(key)!r} but this run has "
                    f"{key}={mine!r}; the batch order would differ. Use the same data and settings."
                )
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor < len(self):
            raise ValueError(f"bad loader state: epoch={epoch}, cursor={cursor} ({len(self)} batches/epoch)")
        self.epoch, self.cursor = epoch, cursor
