"""Entropy from logits, entropy bonus, token logprobs."""

import math

import pytest
import torch

from mtprl.algorithms import entropy_bonus, entropy_from_logits, logprobs_from_logits


def test_entropy_hand_computed():
    logits = torch.tensor(
        [
            [[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e9, -1e9]],
            [[1000.0, 0.0, 0.0, 0.0], [0.0, 0.0, float("-inf"), float("-inf")]],
        ]
    )
    # uniform over 4: ln 4 = 1.3862944
    # p = [0.25, 0.75]: -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.3465736 + 0.2157616 = 0.5623352
    # one logit 1000 above the rest: 0 (no overflow); two -inf logits: ln 2 = 0.6931472
    expected = torch.tensor([[1.3862944, 0.5623352], [0.0, 0.6931472]])
    torch.testing.assert_close(entropy_from_logits(logits), expected, atol=1e-6, rtol=0)


def test_entropy_matches_reference_and_chunks():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 17, generator=g, dtype=torch.float64) * 3
    p = logits.softmax(-1)
    ref = -(p * p.log()).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits), ref)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=4), ref)
    with pytest.raises(ValueError, match="chunk_size"):
        entropy_from_logits(logits, chunk_size=0)


def test_entropy_gradient_finite_with_masked_vocab():
    logits = torch.tensor([[[0.5, -0.5, float("-inf")]]], requires_grad=True)
    entropy_from_logits(logits).sum().backward()
    assert torch.isfinite(logits.grad).all()
    # dH/dz_i = -p_i (z_i - Σ p z) for finite z: p = softmax(0.5, -0.5) = [0.7310586, 0.2689414],
    # Σ p z = 0.2310586 -> grads -0.7310586·0.2689414 = -0.1966119 and -0.2689414·-0.7310586 = +0.1966119
    torch.testing.assert_close(logits.grad, torch.tensor([[[-0.1966119, 0.1966119, 0.0]]]), atol=1e-6, rtol=0)


def test_bf16_logits_give_float32_entropy():
    out = entropy_from_logits(torch.zeros(1, 2, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full((1, 2), math.log(8.0)))


def test_logprobs_from_logits():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 11, generator=g)
    ids = torch.randint(0, 11, (2, 4), generator=g)
    ref = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(logprobs_from_logits(logits, ids), ref)
    with pytest.raises(ValueError, match="token_ids"):
        logprobs_from_logits(logits, ids[:, :3])


def test_entropy_bonus():
    entropy = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    mask = torch.tensor([[1, 0], [1, 1]])
    term, value = entropy_bonus(entropy, mask, entropy_coeff=0.01)
    # token-mean (1 + 3 + 4)/3 = 2.6666667; term = -0.01 · 2.6666667 = -0.0266667
    assert value.item() == pytest.approx(8 / 3)
    assert term.item() == pytest.approx(-0.08 / 3)
    assert not value.requires_grad
    term.backward()
    torch.testing.assert_close(entropy.grad, torch.tensor([[-0.01 / 3, 0.0], [-0.01 / 3, -0.01 / 3]]))
