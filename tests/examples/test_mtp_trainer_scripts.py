"""The example scripts' command lines resolve to valid configs (MTPRL_CMD="config show")."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "examples" / "mtp_trainer"


def _show(script: str, env: dict, *extra: str) -> dict:
    env = {**os.environ, **env, "MTPRL_CMD": "config show", "PY": sys.executable, "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(SCRIPTS / script), *extra], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_seed_7b_recipe_resolves(tmp_path):
    cfg = _show("run_dapo_mimo_7b_with_mtp.sh",
                {"MODEL_PATH": "/models/MiMo-7B-RL", "TRAIN_FILE": "/data/dapo.parquet", "TEST_FILE": "/data/aime.parquet",
                 "CKPTS_DIR": str(tmp_path)},
                "trainer.device=cpu")  # no CUDA here; the script asks for it
    mtp = cfg["actor_rollout_ref"]["model"]["mtp"]
    assert mtp["enable_train"] and mtp["enable_rollout"] and mtp["speculative_num_steps"] == 2
    assert cfg["actor_rollout_ref"]["rollout"]["name"] == "vllm" and mtp["speculative_eagle_topk"] == 1  # a chain
    assert cfg["data"]["max_response_length"] == 8192 and cfg["actor_rollout_ref"]["rollout"]["n"] == 16
    assert cfg["reward_model"]["reward_kwargs"]["overlong_buffer_cfg"]["len"] == 4096
    assert (cfg["trainer"]["nnodes"], cfg["trainer"]["n_gpus_per_node"]) == (16, 8)  # the seed's layout
    assert cfg["ray_kwargs"]["ray_init"]["address"] == "auto"
    assert cfg["actor_rollout_ref"]["actor"]["fsdp_config"]["param_offload"] is True  # the seed's offload=True


def test_tiny_cpu_script_resolves(tmp_path):
    cfg = _show("run_tiny_cpu.sh", {"WORK": str(tmp_path)})
    assert cfg["algorithm"]["filter_groups"]["enable"] is True
    assert cfg["actor_rollout_ref"]["model"]["path"] == f"{tmp_path}/policy"


def test_seed_7b_recipe_with_the_native_engine_resolves(tmp_path):
    cfg = _show("run_dapo_mimo_7b_with_mtp.sh",
                {"MODEL_PATH": "/models/MiMo-7B-RL", "TRAIN_FILE": "/data/dapo.parquet", "TEST_FILE": "/data/aime.parquet",
                 "CKPTS_DIR": str(tmp_path), "ROLLOUT": "native"}, "trainer.device=cpu")
    mtp = cfg["actor_rollout_ref"]["model"]["mtp"]
    assert cfg["actor_rollout_ref"]["rollout"]["name"] == "native" and mtp["speculative_eagle_topk"] == 2
