"""mtp.recursive_steps in the trainers: the recursive depths' loss in the RL update (micro-batch invariant, detach
rules) and in SFT; the config check."""

import json
import math

import pytest
import torch

from mtprl.config import ConfigError, load_config
from mtprl.model import CausalLM, ModelConfig
from mtprl.trainer.update import TrainBatch, compute_logprobs

from tests.trainer.updates import sgd_delta, train_batch, update_cfg


def _batch() -> TrainBatch:
    """prompt >= K: every response token is a target at every depth <= K, so each depth counts as many positions
    as the micro-batch has response tokens (what the update's per-micro-batch share assumes)."""
    return train_batch(prompt=4, min_len=2, max_len=8)


def _cfg(*extra):
    return update_cfg("actor_rollout_ref.model.mtp.recursive_steps=3", "data.max_prompt_length=5",
                      "data.max_response_length=8", *extra)


def _model():
    torch.manual_seed(0)
    return CausalLM(ModelConfig.tiny(vocab_size=64, num_mtp_layers=1))


def test_rl_update_trains_the_recursive_depths_and_micro_batches_agree():
    model, batch = _model(), _batch()
    batch.old_logprobs = compute_logprobs(model, batch, _cfg()) + 0.05 * batch.response_mask
    whole, m_whole, _ = sgd_delta(model, batch, _cfg())
    # old = new + 0.05 on every response token: ppo_kl = mean(old - new) = 0.05, and every ratio e^-0.05 = 0.951 is
    # inside [1 - 0.2, 1 + 0.28] (nothing clipped). The model is at its random initialisation, whose logits are ~0:
    # every depth's cross-entropy is ln V = ln 64 = 4.159 (to 1%) - depth 1 the MTP layer, 2 and 3 it reused
    assert m_whole["actor/ppo_kl"] == pytest.approx(0.05, abs=1e-5) and m_whole["actor/pg_clipfrac"] == 0.0
    depth_losses = {k: v for k, v in m_whole.items() if k.startswith("mtp_losses/")}
    assert depth_losses == pytest.approx({f"mtp_losses/mtp_{k}_loss": math.log(64) for k in (1, 2, 3)}, rel=0.01)
    _, m_off, _ = sgd_delta(model, batch, _cfg("actor_rollout_ref.model.mtp.recursive_steps=0"))
    assert "mtp_losses/mtp_2_loss" not in m_off
    assert m_off["mtp_losses/mtp_1_loss"] == pytest.approx(m_whole["mtp_losses/mtp_1_loss"], rel=1e-6)
    split, m_split, _ = sgd_delta(model, batch, _cfg("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"))
    for k in whole:  # trim_padding per micro-batch changes the widths; the recursive depths must not care
        torch.testing.assert_close(split[k], whole[k], rtol=1e-4, atol=1e-7, msg=k)
    assert m_split["mtp_losses/mtp_3_loss"] == pytest.approx(m_whole["mtp_losses/mtp_3_loss"], rel=1e-4)


def test_rl_update_recursive_depths_keep_off_the_trunk_with_detach():
    model, batch = _model(), _batch()
    batch.advantages = torch.zeros_like(batch.advantages)  # the policy loss has zero gradient
    batch.old_logprobs = compute_logprobs(model, batch, _cfg())
    delta, _, _ = sgd_delta(model, batch, _cfg("actor_rollout_ref.model.mtp.detach_encoder=True",
                                               "actor_rollout_ref.model.mtp.detach_lm_head=True"))
    for k, d in delta.items():
        assert bool(d.abs().sum() > 0) == k.startswith("mtp_layers."), k


def test_sft_trains_the_recursive_depths(tiny_world, tmp_path):
    from mtprl.trainer.sft import run_sft

    cfg = load_config(None, [
        f"data.train_files={tiny_world.data.sft_train}", f"data.val_files={tiny_world.data.sft_val}",
        "data.max_prompt_length=64", "data.max_response_length=48", "data.train_batch_size=8",
        f"actor_rollout_ref.model.path={tiny_world.model}", "actor_rollout_ref.model.mtp.enable=True",
        "actor_rollout_ref.model.mtp.enable_train=True", "actor_rollout_ref.model.mtp.recursive_steps=4",
        "trainer.logger=[jsonl]", "trainer.test_freq=2", "trainer.total_training_steps=2",
        f"trainer.default_local_dir={tmp_path}"])
    run_sft(cfg)  # the tiny world's policy has 2 MTP layers: depths 3 and 4 are recursive
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # the randomly initialised policy predicts near-uniformly at every depth, and 2 steps at the default lr 1e-6
    # leave it so: the depth-4 cross-entropy is ln V = ln 320 = 5.768 (to 1%) in step 1 and in the validation
    # after step 2 (test_freq=2)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["mtp_losses/mtp_4_loss"] == pytest.approx(math.log(320), rel=0.01)
    assert rows[1]["val/mtp_losses/mtp_4_loss"] == pytest.approx(math.log(320), rel=0.01)


def test_negative_recursive_steps_is_a_config_error():
    with pytest.raises(ConfigError, match="recursive_steps=-1"):
        load_config(None, ["actor_rollout_ref.model.mtp.recursive_steps=-1"])
