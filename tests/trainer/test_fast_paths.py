"""The update's fast paths against their slow references (STYLE rule 7): on-policy reuse of the update's own
log-probs vs recomputing the old log-probs; shared-prompt unique tokens (use_prefix_grouper) vs the per-row
forward; one log_softmax for log-probs and entropy vs the two reference functions."""

import copy
from types import SimpleNamespace

import pytest
import torch

from mtprl.model import CausalLM, ModelConfig
from mtprl.model.head import logits_token_scores
from mtprl.trainer import loop
from mtprl.trainer.batching import shared_prompt_tokens, token_entropy, token_logprobs
from mtprl.trainer.update import TrainBatch, compute_logprobs, reuses_current_logprobs

from tests.trainer.updates import sgd_delta, train_batch, update_cfg


def _batch(n=6, prompt=3, seed=0) -> TrainBatch:
    """n samples in groups of 2 sharing a prompt of ``prompt`` tokens; responses of 1..6 tokens, right-padded."""
    return train_batch(n, prompt, seed=seed, shared_prompts=True)


def _cfg(*extra):
    return update_cfg("actor_rollout_ref.actor.use_prefix_grouper=False", *extra)


@pytest.mark.parametrize("extra", [[], ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"],
                                   ["actor_rollout_ref.actor.entropy_coeff=0.01"],
                                   ["actor_rollout_ref.actor.use_prefix_grouper=True"]])
def test_on_policy_reuse_equals_recompute_bit_for_bit(extra):
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.tiny(vocab_size=64))
    cfg = _cfg(*extra)
    batch = _batch()
    assert reuses_current_logprobs(cfg, len(batch))
    recomputed = copy.copy(batch)
    recomputed.old_logprobs = compute_logprobs(model, batch, cfg)  # the same micro-batches as the update's
    reused = copy.copy(batch)  # old_logprobs None: the update's own, detached
    d_ref, m_ref, _ = sgd_delta(model, recomputed, cfg)
    d_new, m_new, _ = sgd_delta(model, reused, cfg)
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
        run = SimpleNamespace(cfg=cfg, model=model, dist=None, ref_model=None, device=torch.device("cpu"))
        batch, metrics = _batch(), {}
        calls.clear()
        loop.add_logprobs(run, batch, metrics)
        assert len(calls) == forwards and (batch.old_logprobs is None) == (forwards == 0)
        assert "timing_s/old_log_prob" in metrics


def test_shared_prompt_tokens_count_each_prompt_once_and_no_padding():
    batch = _batch(n=6, prompt=3)
    rows = shared_prompt_tokens(batch.input_ids, batch.attention_mask, batch.response_mask, batch.group_ids)
    lengths = batch.attention_mask.sum(-1)
    assert len(rows.unique_index) == int(batch.response_mask.sum()) + 3 * 3  # 3 groups x 3 prompt tokens
    flat = batch.input_ids.reshape(-1)
    real = batch.attention_mask.bool()
    assert torch.equal(flat[rows.unique_index][rows.expand_index][real], batch.input_ids[real])
    assert int(lengths.sum()) > len(rows.unique_index)
    different = batch.input_ids.clone()
    different[1, 0] += 1  # row 1's prompt no longer its group's: it keeps its own tokens
    own = shared_prompt_tokens(different, batch.attention_mask, batch.response_mask, batch.group_ids)
    assert len(own.unique_index) == len(rows.unique_index) + 3
    left = batch.attention_mask.flip(-1)
    assert shared_prompt_tokens(batch.input_ids, left, batch.response_mask, batch.group_ids) is None


@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True, "model_type": "qwen3", "attention_bias": False},
                                       {"num_key_value_heads": 4}])
def test_unique_token_forward_equals_the_row_forward(overrides):
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.tiny(vocab_size=64, **overrides))
    batch = _batch(n=8, prompt=5, seed=1)
    rows = shared_prompt_tokens(batch.input_ids, batch.attention_mask, batch.response_mask, batch.group_ids)
    real = batch.attention_mask.bool()

    def run(unique):
        model.zero_grad()
        out = model(batch.input_ids, attention_mask=batch.attention_mask, unique_tokens=unique)
        loss = (token_logprobs(out.logits, batch.input_ids) * batch.response_mask).sum()
        loss = loss + sum((m.float().log_softmax(-1).amax(-1) * batch.attention_mask).sum() for m in out.mtp_logits)
        loss.backward()
        return out, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    ref, g_ref = run(None)
    new, g_new = run(rows)
    torch.testing.assert_close(new.logits[real], ref.logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new.hidden_states[real], ref.hidden_states[real], rtol=1e-5, atol=1e-5)
    for a, b in zip(new.mtp_logits, ref.mtp_logits):
        torch.testing.assert_close(a[real], b[real], rtol=1e-5, atol=1e-5)
    assert g_new.keys() == g_ref.keys()
    for k in g_ref:
        torch.testing.assert_close(g_new[k], g_ref[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("extra", [[], ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3"],
                                   ["actor_rollout_ref.model.mtp.enable_train=False"]])
def test_prefix_grouper_update_equals_the_row_update(extra):
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.tiny(vocab_size=64))
    batch = _batch(n=6, prompt=4, seed=2)
    batch.old_logprobs = compute_logprobs(model, batch, _cfg()) + 0.05 * batch.response_mask  # ratios != 1
    on = _cfg("actor_rollout_ref.actor.use_prefix_grouper=True", *extra)
    torch.testing.assert_close(compute_logprobs(model, batch, on), compute_logprobs(model, batch, _cfg()),
                               rtol=1e-5, atol=1e-6)
    d_ref, m_ref, _ = sgd_delta(model, batch, _cfg(*extra))
    d_new, m_new, _ = sgd_delta(model, batch, on)
    for k in d_ref:
        torch.testing.assert_close(d_new[k], d_ref[k], rtol=1e-4, atol=1e-6, msg=k)
    for k in m_ref:
        assert m_new[k] == pytest.approx(m_ref[k], rel=1e-4, abs=1e-6), k


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_one_log_softmax_equals_the_reference_functions(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=g, requires_grad=True)
    ids = torch.randint(50, (3, 7), generator=g)
    ref_logp, ref_ent = token_logprobs(logits, ids, temperature), token_entropy(logits, temperature)
    for mode in ("none", "detached", "grad"):
        logp, ent = logits_token_scores(logits, ids, temperature, entropy=mode)
        assert torch.equal(logp, ref_logp)
        assert (ent is None) == (mode == "none")
        if ent is not None:
            torch.testing.assert_close(ent, ref_ent, rtol=1e-6, atol=1e-6)
            assert ent.requires_grad == (mode == "grad")
    (g_ref,) = torch.autograd.grad((ref_logp + 0.3 * ref_ent).sum(), logits)
    logp, ent = logits_token_scores(logits, ids, temperature, entropy="grad")
    (g_new,) = torch.autograd.grad((logp + 0.3 * ent).sum(), logits)
    torch.testing.assert_close(g_new, g_ref, rtol=1e-5, atol=1e-6)
