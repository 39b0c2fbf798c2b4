"""Loss aggregation modes (SPEC §4) by hand, edge cases, and micro-batch / data-parallel splitting."""

import pytest
import torch

from mtprl.algorithms import LOSS_AGG_MODES, aggregate_loss, count_normalisers

MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
# row 0: tokens 1, 2; row 1 has a hole: tokens 4, 6; row 2 is an empty response
MASK = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 0, 0]])


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", 3.25),  # (1 + 2 + 4 + 6) / 4 = 13/4
        ("seq-mean-token-sum", 6.5),  # row sums 3, 10; the empty row is left out -> 13/2
        ("seq-mean-token-mean", 3.25),  # row means 1.5, 5 -> 6.5/2
        ("seq-mean-token-sum-norm", 13 / 6),  # (3 + 10)/2 / T=3 = 2.1666667
    ],
)
def test_modes_hand_computed(mode, expected):
    assert aggregate_loss(LOSS, MASK, mode).item() == pytest.approx(expected)


def test_modes_differ_on_unequal_lengths():
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])  # lengths 1 and 3
    # token-mean (1 + 4 + 5 + 6)/4 = 4; seq-sum (1 + 15)/2 = 8; seq-mean (1 + 5)/2 = 3; sum-norm 8/3
    got = [aggregate_loss(LOSS[:2], mask, m).item() for m in MODES]
    assert got == pytest.approx([4.0, 8.0, 3.0, 8 / 3])
    # a fixed loss_scale_factor replaces the mask width: 8 / 4 = 2
    assert aggregate_loss(LOSS[:2], mask, "seq-mean-token-sum-norm", loss_scale_factor=4).item() == pytest.approx(2.0)


@pytest.mark.parametrize("mode", MODES)
def test_all_zero_mask_gives_zero_with_grad(mode):
    loss = LOSS.clone().requires_grad_(True)
    out = aggregate_loss(loss, torch.zeros(3, 3), mode)
    assert out.item() == 0.0
    assert out.requires_grad
    out.backward()
    torch.testing.assert_close(loss.grad, torch.zeros(3, 3))


@pytest.mark.parametrize("mode", MODES)
def test_masked_nan_and_inf_ignored(mode):
    loss = LOSS.clone()
    loss[0, 2] = float("nan")
    loss[2, 0] = float("inf")
    assert aggregate_loss(loss, MASK, mode).item() == pytest.approx(aggregate_loss(LOSS, MASK, mode).item())


def test_gradients_token_mean_vs_seq_mean():
    loss = LOSS.clone().requires_grad_(True)
    aggregate_loss(loss, MASK, "seq-mean-token-mean").backward()
    # each non-empty row weighs 1/2, split over its tokens: row 0 -> 1/4 each, row 1 -> 1/4 each
    torch.testing.assert_close(loss.grad, torch.tensor([[0.25, 0.25, 0], [0.25, 0, 0.25], [0, 0, 0]]))
    loss.grad = None
    mask = torch.tensor([[1, 0, 0], [1, 1, 1], [0, 0, 0]])
    aggregate_loss(loss, mask, "seq-mean-token-mean").backward()
    # row 0 one token -> 1/2; row 1 three tokens -> 1/6 each
    torch.testing.assert_close(loss.grad, torch.tensor([[0.5, 0, 0], [1 / 6, 1 / 6, 1 / 6], [0, 0, 0]]))


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_with_global_normalisers_sum_to_full_batch(mode):
    g = torch.Generator().manual_seed(0)
    loss = torch.randn(8, 5, generator=g, dtype=torch.float64)
    mask = (torch.rand(8, 5, generator=g) > 0.4).long()
    mask[3] = 0  # an empty response
    mask[5, :] = torch.tensor([1, 0, 0, 1, 0])  # a hole
    full = aggregate_loss(loss, mask, mode)
    num_tokens, num_seqs = count_normalisers(mask)
    assert (num_tokens, num_seqs) == (int(mask.sum()), 7)
    # three micro-batches ("ranks"), each normalised by the global counts, summed
    total = sum(
        aggregate_loss(loss[s], mask[s], mode, global_num_tokens=num_tokens, global_num_seqs=num_seqs)
        for s in (slice(0, 3), slice(3, 6), slice(6, 8))
    )
    torch.testing.assert_close(total, full)
    # the global counts are sums of the micro-batch counts (what an all-reduce gives)
    parts = [count_normalisers(mask[s]) for s in (slice(0, 3), slice(3, 6), slice(6, 8))]
    assert (sum(p[0] for p in parts), sum(p[1] for p in parts)) == (num_tokens, num_seqs)


def test_global_normalisers_on_an_empty_micro_batch():
    # a rank whose micro-batch is all padding contributes 0, never NaN
    out = aggregate_loss(LOSS, torch.zeros(3, 3), "seq-mean-token-mean", global_num_tokens=10, global_num_seqs=4)
    assert out.item() == 0.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="did you mean 'seq-mean-token-mean'"):
        aggregate_loss(LOSS, MASK, "seq-mean-token-means")
    with pytest.raises(ValueError, match="loss_scale_factor"):
        aggregate_loss(LOSS, MASK, "token-mean", loss_scale_factor=4)
    with pytest.raises(ValueError, match="loss_scale_factor"):
        aggregate_loss(LOSS, MASK, "seq-mean-token-sum-norm", loss_scale_factor=0)
    with pytest.raises(ValueError, match="same"):
        aggregate_loss(LOSS, MASK[:2], "token-mean")
    with pytest.raises(ValueError, match="global_num_tokens"):
        aggregate_loss(LOSS, MASK, "token-mean", global_num_tokens=-1)
    assert set(MODES) == set(LOSS_AGG_MODES.names())

