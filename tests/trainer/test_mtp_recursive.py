"""mtp.recursive_steps in the trainers: the recursive depths' loss in the RL update (micro-batch invariant, detach
rules) and in SFT; the config check."""

import copy
import json

import pytest
import torch

from mtprl.config import ConfigError, load_config
from mtprl.model import CausalLM, ModelConfig
from mtprl.trainer.update import TrainBatch, actor_update, compute_logprobs


def _batch(n=6, prompt=4, vocab=64, seed=0) -> TrainBatch:
    """prompt >= K: every response token is a target at every depth <= K, so each depth counts as many positions
    as the micro-batch has response tokens (what the update's per-micro-batch share assumes)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (n,), generator=g)  # response lengths 2..8
    width = prompt + int(lengths.max())
    ids = torch.randint(1, vocab, (n, width), generator=g)
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
                              "actor_rollout_ref.model.mtp.recursive_steps=3", "data.max_prompt_length=5",
                              "data.max_response_length=8", *extra])


def _delta(model, batch, cfg):
    model = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.named_parameters()}
    metrics, _ = actor_update(model, torch.optim.SGD(model.parameters(), lr=1.0), batch, cfg, torch.Generator().manual_seed(0))
    return {k: before[k] - v.detach() for k, v in model.named_parameters()}, metrics


def _model():
    torch.manual_seed(0)
    return CausalLM(ModelConfig.tiny(vocab_size=64, num_mtp_layers=1))


def test_rl_update_trains_the_recursive_depths_and_micro_batches_agree():
    model, batch = _model(), _batch()
    batch.old_logprobs = compute_logprobs(model, batch, _cfg()) + 0.05 * batch.response_mask
    whole, m_whole = _delta(model, batch, _cfg())
    assert {"mtp_losses/mtp_2_loss", "mtp_losses/mtp_3_loss", "mtp/acc_3"} <= set(m_whole)
    _, m_off = _delta(model, batch, _cfg("actor_rollout_ref.model.mtp.recursive_steps=0"))
    assert "mtp_losses/mtp_2_loss" not in m_off
    assert m_off["mtp_losses/mtp_1_loss"] == pytest.approx(m_whole["mtp_losses/mtp_1_loss"], rel=1e-6)
    split, m_split = _delta(model, batch, _cfg("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"))
    for k in whole:  # trim_padding per micro-batch changes the widths; the recursive depths must not care
        torch.testing.assert_close(split[k], whole[k], rtol=1e-4, atol=1e-7, msg=k)
    assert m_split["mtp_losses/mtp_3_loss"] == pytest.approx(m_whole["mtp_losses/mtp_3_loss"], rel=1e-4)


def test_rl_update_recursive_depths_keep_off_the_trunk_with_detach():
    model, batch = _model(), _batch()
    batch.advantages = torch.zeros_like(batch.advantages)  # the policy loss has zero gradient
    batch.old_logprobs = compute_logprobs(model, batch, _cfg())
    delta, _ = _delta(model, batch, _cfg("actor_rollout_ref.model.mtp.detach_encoder=True",
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
    assert rows[0]["mtp_losses/mtp_4_loss"] > 0 and "val/mtp/acc_4" in rows[1]


def test_negative_recursive_steps_is_a_config_error():
    with pytest.raises(ConfigError, match="recursive_steps=-1"):
        load_config(None, ["actor_rollout_ref.model.mtp.recursive_steps=-1"])
