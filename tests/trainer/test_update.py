import copy
import math

import pytest
import torch

from mtprl.model import CausalLM, ModelConfig
from mtprl.trainer.update import compute_logprobs

from tests.trainer.updates import sgd_delta, train_batch, update_cfg


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_micro_batching_does_not_change_the_gradient(mode):
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.tiny(vocab_size=64))
    batch = train_batch()
    batch.old_logprobs = compute_logprobs(model, batch, update_cfg()) + 0.05 * batch.response_mask  # ratios != 1
    whole, m_whole, _ = sgd_delta(model, batch, update_cfg(f"actor_rollout_ref.actor.loss_agg_mode={mode}"))
    for extra in (["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"],
                  ["actor_rollout_ref.actor.use_dynamic_bsz=True", "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=20",
                   ]):
        split, m_split, _ = sgd_delta(model, batch, update_cfg(f"actor_rollout_ref.actor.loss_agg_mode={mode}", *extra))
        for k in whole:
            torch.testing.assert_close(split[k], whole[k], rtol=1e-4, atol=1e-7, msg=k)
        for k in ("actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "mtp_losses/mtp_1_loss"):
            assert m_split[k] == pytest.approx(m_whole[k], rel=1e-4, abs=1e-7), k


def test_mtp_loss_reaches_only_mtp_layers_with_detach_and_zero_advantage():
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.tiny(vocab_size=64))
    batch = train_batch()
    batch.advantages = torch.zeros_like(batch.advantages)  # the policy loss has zero gradient
    batch.old_logprobs = compute_logprobs(model, batch, update_cfg())
    delta, metrics, _ = sgd_delta(model, batch, update_cfg("actor_rollout_ref.model.mtp.detach_encoder=True",
                                                           "actor_rollout_ref.model.mtp.detach_lm_head=True"))
    for k, d in delta.items():
        assert bool(d.abs().sum() > 0) == k.startswith("mtp_layers."), k
    # zero advantages: pg_loss = -(1/N) sum_t 0 * r_t = 0; the MTP layers at their random initialisation (logits
    # ~0) score each depth's target at cross-entropy ln V = ln 64 = 4.159 (to 1%)
    assert metrics["actor/pg_loss"] == 0
    assert metrics["mtp_losses/mtp_1_loss"] == pytest.approx(math.log(64), rel=0.01)
    assert metrics["mtp_losses/mtp_2_loss"] == pytest.approx(math.log(64), rel=0.01)


def test_nonfinite_gradient_skips_the_step():
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.tiny(vocab_size=64))
    batch = train_batch()
    batch.old_logprobs = compute_logprobs(model, batch, update_cfg())
    batch.advantages = batch.advantages.clone()
    batch.advantages[0, batch.response_mask[0].bool()] = float("nan")
    delta, metrics, skipped = sgd_delta(model, batch, update_cfg())
    assert skipped == 1
    assert all(bool((d == 0).all()) for d in delta.values())  # nothing changed


def test_one_sgd_step_is_the_token_mean_policy_gradient():
    # Responses of 4, 1, 2 and 3 tokens with advantages +1, -1, +1, -1; the old log-probs are the model's own,
    # so every ratio r_t = 1 (inside [1 - 0.2, 1 + 0.28]: nothing clipped). Token-mean over the mini-batch's
    # N = 4 + 1 + 2 + 3 = 10 response tokens:
    #   pg_loss = -(1/N) sum_t A_t r_t = -(4*1 + 1*(-1) + 2*1 + 3*(-1)) / 10 = -2 / 10 = -0.2
    #   ppo_kl = mean_t (old_t - new_t) = 0,  pg_clipfrac = 0
    #   d pg_loss = -(1/N) sum_t A_t d r_t = -(1/N) sum_t A_t d log pi(y_t)      (d r = r d log pi, r = 1)
    # so one SGD step at lr 1 moves the parameters by  before - after = d pg_loss = -grad(J) / 10,  where
    # J = sum_t A_t log pi(y_t) is computed here from the full logits (model.head.logits_token_scores).
    # To first order the step raises J, the advantage-weighted log-likelihood, by |grad J|^2 / 10.
    from mtprl.model.head import logits_token_scores

    torch.manual_seed(0)
    model = CausalLM(ModelConfig.tiny(vocab_size=64))
    batch = train_batch(n=4, seed=3, lengths=[4, 1, 2, 3])
    batch.advantages = (torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None] * batch.response_mask).float()
    # one mini-batch of 2 prompts x n=2 = all 4 responses; no MTP loss, so the policy loss is the whole loss
    cfg = update_cfg("actor_rollout_ref.actor.ppo_mini_batch_size=2", "data.train_batch_size=2",
                     "actor_rollout_ref.model.mtp.enable_train=False")
    batch.old_logprobs = compute_logprobs(model, batch, cfg)
    delta, metrics, skipped = sgd_delta(model, batch, cfg)
    assert skipped == 0
    assert metrics["actor/pg_loss"] == pytest.approx(-0.2, abs=1e-6)
    assert metrics["actor/ppo_kl"] == pytest.approx(0.0, abs=1e-6) and metrics["actor/pg_clipfrac"] == 0.0

    params = dict(model.named_parameters())
    logits = model(batch.input_ids, attention_mask=batch.attention_mask, compute_mtp=False).logits
    logp, _ = logits_token_scores(logits, batch.input_ids)
    grads = torch.autograd.grad((batch.advantages * logp).sum(), list(params.values()), allow_unused=True)
    for (name, p), g in zip(params.items(), grads):
        expected = torch.zeros_like(p) if g is None else -g / 10  # the MTP layers: no loss reaches them
        torch.testing.assert_close(delta[name], expected, rtol=1e-4, atol=1e-7, msg=name)


def test_gradient_checkpointing_keeps_the_gradient():
    from mtprl.trainer.policy import apply_gradient_checkpointing

    torch.manual_seed(0)
    model = CausalLM(ModelConfig.tiny(vocab_size=64))
    batch = train_batch()
    batch.old_logprobs = compute_logprobs(model, batch, update_cfg()) + 0.05 * batch.response_mask
    plain, _, _ = sgd_delta(model, batch, update_cfg())
    ckpt_model = copy.deepcopy(model)
    apply_gradient_checkpointing(ckpt_model)
    ckpt, _, _ = sgd_delta(ckpt_model, batch, update_cfg())  # (updates a deep copy: must stay checkpointed)
    assert type(ckpt_model.layers[0]).__name__ == "CheckpointedDecoderBlock"
    assert set(ckpt_model.state_dict()) == set(model.state_dict())
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-4, atol=1e-6, msg=k)


def test_log_prob_micro_batch_settings_do_not_change_logprobs():
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.tiny(vocab_size=64))
    batch = train_batch()
    whole = compute_logprobs(model, batch, update_cfg())
    for extra in (["actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1"],
                  ["actor_rollout_ref.ref.log_prob_use_dynamic_bsz=True", "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=12"]):
        for role in ("rollout", "ref"):
            torch.testing.assert_close(compute_logprobs(model, batch, update_cfg(*extra), role=role), whole,
                                       rtol=1e-5, atol=1e-6)
