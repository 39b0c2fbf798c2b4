"""Clipped policy loss (clip-higher + dual clip) against hand-computed numbers (SPEC §4)."""

import math

import pytest
import torch

from mtprl.algorithms import get_policy_loss, policy_loss, policy_loss_matrix

LOW, HIGH, C = 0.2, 0.28, 3.0


def six_tokens():
    """Six tokens in a [2,3] batch; old logprobs 0 so δ = logprobs.

    tok  A     ρ     L1=-Aρ   L2=-A·clip(ρ,0.8,1.28)  Lc=max   final            L2>L1  lower
    0    1     1     -1       -1                      -1       -1               no     no
    1    1     1.5   -1.5     -1.28                   -1.28    -1.28            yes    no
    2   -1     0.5    0.5      0.8                     0.8     min(3,0.8)=0.8   yes    no
    3   -1     4      4        1.28                    4       min(3,4)=3       no     yes
    4    2     0.5   -1       -1.6                    -1       -1               no     no
    5   -0.5   1.1    0.55     0.55                    0.55    min(1.5,.55)=.55 no     no
    """
    ratios = torch.tensor([[1.0, 1.5, 0.5], [4.0, 0.5, 1.1]])
    logprobs = ratios.log().requires_grad_(True)
    old = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, 1.0, -1.0], [-1.0, 2.0, -0.5]])
    return old, logprobs, adv


def test_loss_matrix_hand_computed():
    old, logprobs, adv = six_tokens()
    loss, _ = policy_loss_matrix(old, logprobs, adv, torch.ones(2, 3), LOW, HIGH, C)
    torch.testing.assert_close(loss, torch.tensor([[-1.0, -1.28, 0.8], [3.0, -1.0, 0.55]]))


def test_token_mean_loss_metrics_and_grad():
    old, logprobs, adv = six_tokens()
    loss, m = policy_loss(old, logprobs, adv, torch.ones(2, 3), LOW, HIGH, C, "token-mean")
    # (-1 - 1.28 + 0.8 + 3 - 1 + 0.55) / 6 = 1.07 / 6 = 0.1783333
    assert loss.item() == pytest.approx(0.1783333, abs=1e-6)
    assert m["pg_clipfrac"].item() == pytest.approx(2 / 6)  # tokens 1, 2
    assert m["pg_clipfrac_lower"].item() == pytest.approx(1 / 6)  # token 3
    # ppo_kl = mean(old - logp) = -ln(1·1.5·0.5·4·0.5·1.1)/6 = -ln(1.65)/6 = -0.0834625
    assert m["ppo_kl"].item() == pytest.approx(-0.0834625, abs=1e-6)
    assert all(not v.requires_grad for v in m.values())
    loss.backward()
    # dL/dδ = -Aρ where Lc = L1 and not dual-clipped, else 0; /6 for the token mean:
    # tok0 -1·1 = -1, tok1 clipped 0, tok2 clipped 0, tok3 dual-clipped 0, tok4 -2·0.5 = -1, tok5 0.5·1.1 = 0.55
    expected = torch.tensor([[-1.0, 0.0, 0.0], [0.0, -1.0, 0.55]]) / 6
    torch.testing.assert_close(logprobs.grad, expected)


def test_mask_with_holes():
    old, logprobs, adv = six_tokens()
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]])
    loss, m = policy_loss(old, logprobs, adv, mask, LOW, HIGH, C)
    # tokens 0, 2, 3, 4: (-1 + 0.8 + 3 - 1) / 4 = 0.45
    assert loss.item() == pytest.approx(0.45, abs=1e-6)
    assert m["pg_clipfrac"].item() == pytest.approx(0.25)  # token 2
    assert m["pg_clipfrac_lower"].item() == pytest.approx(0.25)  # token 3
    # ppo_kl = -(ln 1 + ln 0.5 + ln 4 + ln 0.5)/4 = -ln(1)/4 = 0
    assert m["ppo_kl"].item() == pytest.approx(0.0, abs=1e-6)


def test_seq_mean_token_sum_norm_mode():
    old, logprobs, adv = six_tokens()
    loss, _ = policy_loss(old, logprobs, adv, torch.ones(2, 3), LOW, HIGH, C, "seq-mean-token-sum-norm")
    # row sums: -1 - 1.28 + 0.8 = -1.48 and 3 - 1 + 0.55 = 2.55; mean 0.535; / T=3 -> 0.1783333
    assert loss.item() == pytest.approx(0.1783333, abs=1e-6)
    loss, _ = policy_loss(old, logprobs, adv, torch.ones(2, 3), LOW, HIGH, C, "seq-mean-token-sum")
    assert loss.item() == pytest.approx(0.535, abs=1e-6)


def test_extreme_ratios_are_clamped():
    # δ = +50 -> ρ = e^20 = 4.8516520e8;  δ = -50 -> ρ = e^-20 = 2.0611536e-9
    # A = 1,  δ = 50:  L1 = -4.85e8, L2 = -1.28 -> Lc = -1.28
    # A = -1, δ = 50:  L1 = 4.85e8,  L2 = 1.28  -> Lc = 4.85e8 -> dual clip min(3, Lc) = 3
    # A = 1,  δ = -50: L1 = -2.06e-9, L2 = -0.8 -> Lc = -2.06e-9
    # A = -1, δ = -50: L1 = 2.06e-9,  L2 = 0.8  -> Lc = 0.8 -> min(3, 0.8) = 0.8
    logprobs = torch.tensor([[50.0, 50.0, -50.0, -50.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss_mat, m = policy_loss_matrix(torch.zeros(1, 4), logprobs, adv, torch.ones(1, 4), LOW, HIGH, C)
    torch.testing.assert_close(loss_mat, torch.tensor([[-1.28, 3.0, -2.0611536e-9, 0.8]]))
    assert torch.isfinite(loss_mat).all()
    # ppo_kl uses the unclamped δ (SPEC §4): mean(-50, -50, 50, 50) = 0
    assert m["ppo_kl"].item() == pytest.approx(0.0)
    loss_mat.sum().backward()
    # token 2 sits on the clamp (δ = -50 < -20): clamp blocks the gradient; the others are clipped
    torch.testing.assert_close(logprobs.grad, torch.zeros(1, 4))
    # the unclamped ppo_kl of one token: δ = 30 -> ppo_kl = -30
    _, m = policy_loss_matrix(torch.zeros(1, 1), torch.tensor([[30.0]]), torch.ones(1, 1), torch.ones(1, 1), LOW, HIGH)
    assert m["ppo_kl"].item() == pytest.approx(-30.0)


def test_dual_clip_only_for_negative_advantages():
    # A = +1, ρ = 5: Lc = max(-5, -1.28) = -1.28, no dual clip even though -A·c = -3 < Lc
    # A = -2, ρ = 2: L1 = 4, L2 = 2.56 -> Lc = 4; -A·c = 6 > 4 -> stays 4, not counted as lower clip
    logprobs = torch.tensor([[math.log(5.0), math.log(2.0)]])
    loss_mat, m = policy_loss_matrix(
        torch.zeros(1, 2), logprobs, torch.tensor([[1.0, -2.0]]), torch.ones(1, 2), LOW, HIGH, C
    )
    torch.testing.assert_close(loss_mat, torch.tensor([[-1.28, 4.0]]))
    assert m["pg_clipfrac_lower"].item() == 0.0
    assert m["pg_clipfrac"].item() == pytest.approx(0.5)


def test_sequence_advantages_broadcast():
    old, logprobs, _ = six_tokens()
    adv_seq = torch.tensor([1.0, -1.0])
    a, _ = policy_loss(old, logprobs, adv_seq, torch.ones(2, 3), LOW, HIGH, C)
    b, _ = policy_loss(old, logprobs, adv_seq[:, None].expand(2, 3), torch.ones(2, 3), LOW, HIGH, C)
    torch.testing.assert_close(a, b)


def test_empty_response_gives_zero_loss_and_metrics():
    old, logprobs, adv = six_tokens()
    loss, m = policy_loss(old, logprobs, adv, torch.zeros(2, 3), LOW, HIGH, C)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert all(v.item() == 0.0 for v in m.values())
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.zeros(2, 3))


def test_masked_nan_does_not_leak():
    old = torch.tensor([[0.0, float("nan")]])
    logprobs = torch.tensor([[0.0, float("-inf")]], requires_grad=True)
    loss, m = policy_loss(old, logprobs, torch.ones(1, 2), torch.tensor([[1, 0]]), LOW, HIGH, C)
    assert loss.item() == pytest.approx(-1.0)
    assert all(torch.isfinite(v) for v in m.values())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(clip_ratio_c=1.0), "clip_ratio_c"),
        (dict(clip_ratio_c=0.5), "clip_ratio_c"),
        (dict(clip_ratio_low=1.0), "clip_ratio_low"),
        (dict(clip_ratio_high=-0.1), "clip_ratio_high"),
        (dict(loss_agg_mode="token_mean"), "did you mean 'token-mean'"),
    ],
)
def test_bad_settings(kwargs, match):
    old, logprobs, adv = six_tokens()
    args = dict(clip_ratio_low=LOW, clip_ratio_high=HIGH)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        policy_loss(old, logprobs, adv, torch.ones(2, 3), **args)


def test_shape_errors_and_registry():
    old, logprobs, adv = six_tokens()
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(old, logprobs, adv[:, :2], torch.ones(2, 3), LOW, HIGH)
    with pytest.raises(ValueError, match="mask"):
        policy_loss(old, logprobs, adv, torch.ones(2, 2), LOW, HIGH)
    assert get_policy_loss("vanilla") is policy_loss_matrix
    with pytest.raises(ValueError, match="did you mean 'vanilla'"):
        get_policy_loss("vanila")
