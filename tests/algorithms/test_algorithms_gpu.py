"""The same algorithm functions on CUDA (fp32 and bf16) agree with the CPU fp32 results."""

import pytest
import torch

from mtprl.algorithms import (
    aggregate_loss,
    compute_grpo_advantages,
    compute_reinforce_plus_plus_advantages,
    entropy_from_logits,
    get_adv_estimator,
    kl_penalty,
    policy_loss,
    scores_to_token_rewards,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def batch(seed=0, B=6, T=9, V=33):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    logp = old + torch.randn(B, T, generator=g) * 0.3
    adv = torch.randn(B, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[2] = 0
    logits = torch.randn(B, T, V, generator=g) * 2
    return old, logp, adv, mask, logits


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_cuda_matches_cpu(dtype, tol, mode):
    old, logp, adv, mask, _ = batch()
    ref_loss, ref_m = policy_loss(old, logp, adv, mask, 0.2, 0.28, 3.0, mode)
    dev = [t.cuda().to(dtype) if t.is_floating_point() else t.cuda() for t in (old, logp, adv)]
    logp_d = dev[1].clone().requires_grad_(True)
    loss, m = policy_loss(dev[0], logp_d, dev[2], mask.cuda(), 0.2, 0.28, 3.0, mode)
    loss.backward()
    assert loss.device.type == "cuda" and torch.isfinite(logp_d.grad).all()
    assert loss.float().cpu().item() == pytest.approx(ref_loss.item(), abs=tol, rel=tol)
    for k in ref_m:
        assert m[k].float().cpu().item() == pytest.approx(ref_m[k].item(), abs=tol * 5)


def test_aggregate_kl_entropy_advantages_on_cuda():
    old, logp, adv, mask, logits = batch(1)
    for mode in MODES:
        a = aggregate_loss(logp, mask, mode)
        b = aggregate_loss(logp.cuda(), mask.cuda(), mode)
        assert b.cpu().item() == pytest.approx(a.item(), abs=1e-5)
    for kind in ("k1", "abs", "k2", "k3"):
        torch.testing.assert_close(kl_penalty(logp.cuda(), old.cuda(), kind).cpu(), kl_penalty(logp, old, kind))
    torch.testing.assert_close(entropy_from_logits(logits.cuda()).cpu(), entropy_from_logits(logits), atol=1e-5, rtol=1e-5)
    ent_bf16 = entropy_from_logits(logits.cuda().bfloat16())
    assert ent_bf16.dtype == torch.float32
    scores = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, -1.0])
    ids = [0, 0, 0, 1, 1, 1]
    g_cpu = compute_grpo_advantages(scores, ids)
    g_cuda = compute_grpo_advantages(scores.cuda(), ids)
    assert g_cuda.device.type == "cuda"
    torch.testing.assert_close(g_cuda.cpu(), g_cpu)
    rewards = scores_to_token_rewards(scores.cuda(), mask.cuda())
    assert rewards.device.type == "cuda"
    for name in ("grpo", "rloo", "reinforce_plus_plus"):
        adv_d, _ = get_adv_estimator(name)(rewards, mask.cuda(), ids)
        adv_c, _ = get_adv_estimator(name)(rewards.cpu(), mask, ids)
        torch.testing.assert_close(adv_d.cpu(), adv_c)
    r_d, _ = compute_reinforce_plus_plus_advantages(rewards, mask.cuda(), gamma=0.9)
    assert r_d.device.type == "cuda"
