"""KL estimators (SPEC §4), KL loss, KL-in-reward and the adaptive coefficient, by hand."""

import math

import pytest
import torch

from mtprl.algorithms import KL_PENALTIES, adaptive_kl_coef, apply_kl_in_reward, kl_loss, kl_penalty

# δ = logp - ref = [0.5, -1.0, 0.0]
LOGP = torch.tensor([[-1.0, -2.0, -0.5]])
REF = torch.tensor([[-1.5, -1.0, -0.5]])


@pytest.mark.parametrize(
    "kinds, expected",
    [
        (("kl", "k1"), [0.5, -1.0, 0.0]),  # δ
        (("abs",), [0.5, 1.0, 0.0]),  # |δ|
        (("mse", "k2"), [0.125, 0.5, 0.0]),  # ½δ²
        # κ = -δ = [-0.5, 1, 0]: e^-0.5 + 0.5 - 1 = 0.1065307, e^1 - 1 - 1 = 0.7182818, 0
        (("low_var_kl", "k3"), [0.1065307, 0.7182818, 0.0]),
    ],
)
def test_kl_kinds_hand_computed(kinds, expected):
    for kind in kinds:
        torch.testing.assert_close(kl_penalty(LOGP, REF, kind), torch.tensor([expected]), atol=1e-6, rtol=0)


def test_k3_clamps():
    # δ = -30: κ = clamp(30) = 20, e^20 - 21 = 4.85e8 -> clamp 10
    # δ = +30: κ = clamp(-30) = -20, e^-20 + 20 - 1 = 19.0000000 -> clamp 10
    # δ = -3:  κ = 3, e^3 - 4 = 16.0855369 -> clamp 10
    # δ = +5:  κ = -5, e^-5 + 5 - 1 = 4.0067379 (inside the clamp)
    delta = torch.tensor([[-30.0, 30.0, -3.0, 5.0]])
    out = kl_penalty(delta, torch.zeros_like(delta), "k3")
    torch.testing.assert_close(out, torch.tensor([[10.0, 10.0, 10.0, 4.0067379]]), atol=1e-6, rtol=0)
    assert torch.isfinite(kl_penalty(torch.tensor([[-1e4]]), torch.zeros(1, 1), "k3")).all()


def test_k3_gradient_is_finite_and_zero_on_the_clamp():
    logp = torch.tensor([[0.2, -40.0]], requires_grad=True)
    kl_penalty(logp, torch.zeros(1, 2), "low_var_kl").sum().backward()
    # d/dlogp (e^κ - κ - 1) with κ = -logp: -(e^κ - 1) = -(e^-0.2 - 1) = 0.1812692; clamped token: 0
    torch.testing.assert_close(logp.grad, torch.tensor([[0.1812692, 0.0]]), atol=1e-6, rtol=0)


def test_unknown_kind_names_closest():
    with pytest.raises(ValueError, match="did you mean 'low_var_kl'"):
        kl_penalty(LOGP, REF, "low_var")
    with pytest.raises(ValueError, match="must match"):
        kl_penalty(LOGP, REF[:, :2], "k1")
    assert {"kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3"} == set(KL_PENALTIES.names())


def test_kl_loss_aggregates_under_mask():
    # k2 per token [0.125, 0.5, 0]; mask [1, 1, 0] -> token-mean (0.125 + 0.5)/2 = 0.3125
    logp = LOGP.clone().requires_grad_(True)
    out = kl_loss(logp, REF, torch.tensor([[1, 1, 0]]), kind="k2")
    assert out.item() == pytest.approx(0.3125)
    out.backward()
    # d(½δ²)/dlogp = δ / 2 tokens: [0.25, -0.5, 0]
    torch.testing.assert_close(logp.grad, torch.tensor([[0.25, -0.5, 0.0]]))


def test_apply_kl_in_reward_hand_computed():
    scores = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    ref = torch.zeros(2, 3)
    logp = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.9]])  # δ; the 9.9 is padding
    rewards, m = apply_kl_in_reward(scores, logp, ref, mask, kl_coef=0.5, kind="kl")
    # r = s - 0.5·δ·M: row 0 [-0.05, -0.1, 1 - 0.15], row 1 [-0.2, 2 - 0.25, 0]
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.1, 0.85], [-0.2, 1.75, 0.0]]))
    # per-sequence masked mean KL: 0.2 and 0.45 -> batch mean 0.325
    assert m["actor/reward_kl_penalty"] == pytest.approx(0.325)
    assert m["actor/reward_kl_penalty_coeff"] == 0.5
    with pytest.raises(ValueError, match="kl_coef"):
        apply_kl_in_reward(scores, logp, ref, mask, kl_coef=-1.0)


def test_adaptive_kl_coef():
    # KL 0.3 vs target 0.1: error clip(2, -0.2, 0.2) = 0.2; 0.1 · (1 + 0.2·10/100) = 0.102
    assert adaptive_kl_coef(0.1, 0.3, 0.1, horizon=100, n_steps=10) == pytest.approx(0.102)
    # KL 0.09 vs 0.1: error -0.1; 0.1 · (1 - 0.1·10/100) = 0.099
    assert adaptive_kl_coef(0.1, 0.09, 0.1, horizon=100, n_steps=10) == pytest.approx(0.099)
    with pytest.raises(ValueError, match="horizon"):
        adaptive_kl_coef(0.1, 0.3, 0.1, horizon=0, n_steps=1)


def test_k1_k3_are_unbiased_kl_estimates():
    # E_{x~π}[k1] = E[k3] = KL(π || ref) for samples from π (Schulman 2020)
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    true_kl = float((p * (p / q).log()).sum())  # 0.2749...
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, logq = p.log()[x][None], q.log()[x][None]
    assert kl_penalty(logp, logq, "k1").mean().item() == pytest.approx(true_kl, abs=5e-3)
    assert kl_penalty(logp, logq, "k3").mean().item() == pytest.approx(true_kl, abs=5e-3)
    assert math.isfinite(true_kl)
