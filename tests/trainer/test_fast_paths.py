"""The update's fast paths against their slow references (STYLE rule 7): on-policy reuse of the update's own
log-probs vs recomputing the old log-probs."""

import copy
from types import SimpleNamespace

import pytest
import torch

from mtprl.config import load_config
from mtprl.model import CausalLM, ModelConfig
from mtprl.trainer import loop
from mtprl.trainer.update import TrainBatch, actor_update, compute_logprobs, reuses_current_logprobs


def _batch(n=6, prompt=3, vocab=64, seed=0) -> TrainBatch:
    """n samples in groups of 2 sharing a prompt of ``prompt`` tokens; responses of 1..6 tokens, right-padded."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 7, (n,), generator=g)
    width = prompt + int(lengths.max())
    prompts = torch.randint(1, vocab, (n // 2, prompt), generator=g).repeat_interleave(2, 0)
    ids = torch.cat([prompts, torch.randint(1, vocab, (n, width - prompt), generator=g)], 1)
    attn = torch.zeros(n, width, dtype=torch.long)
    resp = torch.zeros(n, width, dtype=torch.long)
    for i, r in enumerate(lengths.tolist()):
        attn[i, : prompt + r] = 1
        resp[i, prompt: prompt + r] = 1
    scores = torch.randn(n, generator=g)
    return TrainBatch(ids * attn, attn, resp, torch.arange(n) // 2, scores, torch.zeros(n, width),
                      advantages=(scores[:, None] * resp).float())


def _cfg(*extra):
    return load_config(None, ["actor_rollout_ref.rollout.n=2", "data.train_batch_size=3",
                              "actor_rollout_ref.actor.ppo_mini_batch_size=3", "actor_rollout_ref.model.mtp.enable=True",
                              "actor_rollout_ref.model.mtp.enable_train=True", "actor_rollout_ref.actor.optim.clip_grad=1e9",
                              "data.max_prompt_length=4", "data.max_response_length=6", *extra])


def _update(model, batch, cfg):
    """(parameter change after one SGD(lr=1) update = minus the gradient, metrics)."""
    model = copy.deepcopy(model)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    metrics, _ = actor_update(model, torch.optim.SGD(model.parameters(), lr=1.0), batch, cfg,
                              torch.Generator().manual_seed(0))
    return {k: before[k] - v.detach() for k, v in model.named_parameters()}, metrics


@pytest.mark.parametrize("extra", [[], ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"],
                                   ["actor_rollout_ref.actor.entropy_coeff=0.01"]])
def test_on_policy_reuse_equals_recompute_bit_for_bit(extra):
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.tiny(vocab_size=64))
    cfg = _cfg(*extra)
    batch = _batch()
    assert reuses_current_logprobs(cfg, len(batch))
    recomputed = copy.copy(batch)
    recomputed.old_logprobs = compute_logprobs(model, batch, cfg)  # the same micro-batches as the update's
    reused = copy.copy(batch)  # old_logprobs None: the update's own, detached
    d_ref, m_ref = _update(model, recomputed, cfg)
    d_new, m_new = _update(model, reused, cfg)
    for k in d_ref:
        assert torch.equal(d_new[k], d_ref[k]), k
    assert m_new == m_ref
    assert m_new["actor/ppo_kl"] == 0.0 and m_new["actor/pg_clipfrac"] == 0.0  # ratio exactly 1


def test_on_policy_only_with_one_epoch_one_mini_batch_and_nothing_reading_old_logprobs_first():
    assert reuses_current_logprobs(_cfg(), 6)
    assert not reuses_current_logprobs(_cfg(), 7)  # two mini-batches: the second starts from an updated policy
    assert not reuses_current_logprobs(_cfg("actor_rollout_ref.actor.ppo_epochs=2"), 6)
    assert not reuses_current_logprobs(_cfg("actor_rollout_ref.actor.use_rollout_log_probs=True"), 6)
    assert not reuses_current_logprobs(_cfg("algorithm.use_kl_in_reward=True"), 6)  # KL in the reward reads them


def test_loop_skips_the_old_log_prob_forward_on_policy(monkeypatch):
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.tiny(vocab_size=64))
    calls = []
    monkeypatch.setattr(loop, "compute_logprobs", lambda *a, **k: calls.append(1) or compute_logprobs(*a, **k))
    for cfg, forwards in ((_cfg(), 0), (_cfg("actor_rollout_ref.actor.ppo_mini_batch_size=1"), 1)):
        run = SimpleNamespace(cfg=cfg, model=model, dist=None, ref_model=None)
        batch, metrics = _batch(), {}
        calls.clear()
        loop.add_logprobs(run, batch, metrics)
        assert len(calls) == forwards and (batch.old_logprobs is None) == (forwards == 0)
        assert "timing_s/old_log_prob" in metrics
