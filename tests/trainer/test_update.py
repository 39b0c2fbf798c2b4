import copy

import pytest
import torch

from mtprl.config import load_config
from mtprl.model import CausalLM, ModelConfig
from mtprl.trainer.update import TrainBatch, actor_update, compute_logprobs


def _batch(n=6, prompt=3, vocab=64, seed=0) -> TrainBatch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 7, (n,), generator=g)  # response lengths 1..6
    width = prompt + int(lengths.max())
    ids = torch.randint(1, vocab, (n, width), generator=g)
    attn = torch.zeros(n, width, dtype=torch.long)
    resp = torch.zeros(n, width, dtype=torch.long)
    for i, r in enumerate(lengths.tolist()):
        attn[i, : prompt + r] = 1
        resp[i, prompt: prompt + r] = 1
    ids = ids * attn
    scores = torch.randn(n, generator=g)
    return TrainBatch(ids, attn, resp, torch.arange(n) // 2, scores, torch.zeros(n, width),
                      advantages=(scores[:, None] * resp).float())


def _cfg(*extra):
    return load_config(None, ["actor_rollout_ref.rollout.n=2", "data.train_batch_size=3",
                              "actor_rollout_ref.actor.ppo_mini_batch_size=3", "actor_rollout_ref.model.mtp.enable=True",
                              "actor_rollout_ref.model.mtp.enable_train=True", "actor_rollout_ref.actor.optim.clip_grad=1e9",
                              "data.max_prompt_length=4", "data.max_response_length=6",
                              *extra])


def _grads_after_update(model, batch, cfg):
    model = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    metrics, skipped = actor_update(model, opt, batch, cfg, torch.Generator().manual_seed(0))
    return {k: before[k] - v.detach() for k, v in model.named_parameters()}, metrics, skipped


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_micro_batching_does_not_change_the_gradient(mode):
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.tiny(vocab_size=64))
    batch = _batch()
    batch.old_logprobs = compute_logprobs(model, batch, _cfg()) + 0.05 * batch.response_mask  # ratios != 1
    whole, m_whole, _ = _grads_after_update(model, batch, _cfg(f"actor_rollout_ref.actor.loss_agg_mode={mode}"))
    for extra in (["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"],
                  ["actor_rollout_ref.actor.use_dynamic_bsz=True", "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=20",
                   ]):
        split, m_split, _ = _grads_after_update(model, batch, _cfg(f"actor_rollout_ref.actor.loss_agg_mode={mode}", *extra))
        for k in whole:
            torch.testing.assert_close(split[k], whole[k], rtol=1e-4, atol=1e-7, msg=k)
        for k in ("actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "mtp_losses/mtp_1_loss"):
            assert m_split[k] == pytest.approx(m_whole[k], rel=1e-4, abs=1e-7), k


def test_mtp_loss_reaches_only_mtp_layers_with_detach_and_zero_advantage():
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.tiny(vocab_size=64))
    batch = _batch()
    batch.advantages = torch.zeros_like(batch.advantages)  # the policy loss has zero gradient
    batch.old_logprobs = compute_logprobs(model, batch, _cfg())
    delta, metrics, _ = _grads_after_update(model, batch, _cfg("actor_rollout_ref.model.mtp.detach_encoder=True",
                                                               "actor_rollout_ref.model.mtp.detach_lm_head=True"))
    for k, d in delta.items():
        assert bool(d.abs().sum() > 0) == k.startswith("mtp_layers."), k
    assert metrics["mtp/acc_1"] >= 0 and metrics["actor/pg_loss"] == 0


def test_nonfinite_gradient_skips_the_step():
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.tiny(vocab_size=64))
    batch = _batch()
    batch.old_logprobs = compute_logprobs(model, batch, _cfg())
    batch.advantages = batch.advantages.clone()
    batch.advantages[0, batch.response_mask[0].bool()] = float("nan")
    delta, metrics, skipped = _grads_after_update(model, batch, _cfg())
    assert skipped == 1
    assert all(bool((d == 0).all()) for d in delta.values())  # nothing changed


def test_update_raises_logprobs_of_positive_advantage_samples():
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.tiny(vocab_size=64))
    batch = _batch(n=4, seed=3)
    batch.advantages = (torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None] * batch.response_mask).float()
    cfg = _cfg("actor_rollout_ref.actor.ppo_mini_batch_size=2", "data.train_batch_size=2")
    batch.old_logprobs = compute_logprobs(model, batch, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    actor_update(model, opt, batch, cfg, torch.Generator().manual_seed(0))
    new = compute_logprobs(model, batch, cfg)
    seq_change = ((new - batch.old_logprobs) * batch.response_mask).sum(-1)
    assert (seq_change[[0, 2]] > 0).all() and (seq_change[[1, 3]] < 0).all(), seq_change


def test_gradient_checkpointing_keeps_the_gradient():
    from mtprl.trainer.policy import apply_gradient_checkpointing

    torch.manual_seed(0)
    model = CausalLM(ModelConfig.tiny(vocab_size=64))
    batch = _batch()
    batch.old_logprobs = compute_logprobs(model, batch, _cfg()) + 0.05 * batch.response_mask
    plain, _, _ = _grads_after_update(model, batch, _cfg())
    ckpt_model = copy.deepcopy(model)
    apply_gradient_checkpointing(ckpt_model)
    ckpt, _, _ = _grads_after_update(ckpt_model, batch, _cfg())  # (updates a deep copy: must stay checkpointed)
    assert type(ckpt_model.layers[0]).__name__ == "CheckpointedDecoderBlock"
    assert set(ckpt_model.state_dict()) == set(model.state_dict())
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-4, atol=1e-6, msg=k)


def test_log_prob_micro_batch_settings_do_not_change_logprobs():
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.tiny(vocab_size=64))
    batch = _batch()
    whole = compute_logprobs(model, batch, _cfg())
    for extra in (["actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1"],
                  ["actor_rollout_ref.ref.log_prob_use_dynamic_bsz=True", "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=12"]):
        for role in ("rollout", "ref"):
            torch.testing.assert_close(compute_logprobs(model, batch, _cfg(*extra), role=role), whole, rtol=1e-5, atol=1e-6)
