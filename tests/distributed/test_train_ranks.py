"""The DAPO + MTP loop on 2 gloo ranks: engines hold the trainer's weights after every step (MTP layers
included), checkpoints reshard 2 -> 1 and 1 -> 2 ranks, torchrun runs it, Ray runs it, and a killed
rank ends a Ray run with one clear error, after which the same command resumes."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtprl.trainer.checkpoint import find_latest_checkpoint

HERE = Path(__file__).parent
WORKER = HERE / "loop_worker.py"


def overrides(world, out, *extra):
    return [
        f"data.train_files={world.data.train}", f"data.val_files={world.data.val}", "data.max_prompt_length=64",
        "data.max_response_length=12", "data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.rollout.n=4", f"actor_rollout_ref.model.path={world.model}",
        "actor_rollout_ref.model.mtp.enable=True", "actor_rollout_ref.model.mtp.enable_train=True",
        "actor_rollout_ref.model.mtp.enable_rollout=True", "actor_rollout_ref.model.mtp.speculative_num_steps=2",
        "actor_rollout_ref.actor.optim.lr=1e-2", "reward_model.reward_manager=dapo", "reward_model.num_workers=0",
        "actor_rollout_ref.actor.use_dynamic_bsz=True", "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=200",
        "trainer.logger=[jsonl]", f"trainer.default_local_dir={out}", "trainer.save_freq=1", "trainer.test_freq=-1",
        "trainer.val_before_train=False", "trainer.collective_timeout_s=60", "data.val_batch_size=8",
        "trainer.device=cpu", *extra,
    ]


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def results(path, world):
    return [json.loads(Path(f"{path}.{r}").read_text()) for r in range(world)]


# A reward that varies within groups even for a random policy: +1 for an even response length.
PARITY_REWARD = """
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": 1.0 if len(solution_str) % 2 == 0 else -1.0, "acc": len(solution_str) % 2 == 0}
"""


@pytest.mark.slow
def test_engines_hold_the_trainers_weights_after_every_step(tiny_world, tmp_path, launch_ranks):
    out = tmp_path / "run"
    reward = tmp_path / "parity.py"
    reward.write_text(PARITY_REWARD)
    launch_ranks(WORKER, 2, "sync", str(tmp_path / "sync"),
                 *overrides(tiny_world, out, "trainer.n_gpus_per_node=2", "trainer.total_training_steps=2",
                            "actor_rollout_ref.rollout.free_cache_engine=True", f"custom_reward_function.path={reward}",
                            "algorithm.filter_groups.enable=True", "data.gen_batch_size=2",
                            "algorithm.filter_groups.max_num_gen_batches=20",
                            "actor_rollout_ref.actor.use_kl_loss=True",  # the reference policy is sharded too
                            "actor_rollout_ref.model.mtp.recursive_steps=3"))  # the MTP layer reused inside its FSDP unit
    for res in results(tmp_path / "sync", 2):
        assert len(res["diffs"]) == 2
        for total, mtp in res["diffs"]:
            assert total == 0.0 and mtp == 0.0  # bit-identical, MTP layers included
        assert res["mtp_moved"] > 1e-4  # the MTP layers trained, so a sync that skipped them would fail above
        assert all(s is not None and s > 0 for s in res["sync_s"])
        # dynamic sampling counted kept groups over both ranks: each step trained exactly train_batch_size groups
        assert res["num_groups"] == [4, 4]


@pytest.mark.slow
def test_checkpoints_reshard_two_ranks_to_one_and_one_to_two(tiny_world, tmp_path, launch_ranks):
    for first, second in ((2, 1), (1, 2)):
        out = tmp_path / f"{first}to{second}"
        launch_ranks("-m mtprl", first, "train", *overrides(tiny_world, out, f"trainer.n_gpus_per_node={first}",
                                                            "trainer.total_training_steps=2"))
        assert (out / "global_step_2" / "dcp").is_dir() == (first == 2)
        launch_ranks(WORKER, second, "resume", str(tmp_path / f"r{first}{second}"),
                     *overrides(tiny_world, out, f"trainer.n_gpus_per_node={second}", "trainer.total_training_steps=3"))
        for res in results(tmp_path / f"r{first}{second}", second):
            assert res["step"] == 2 and res["resume_diff"] == 0.0
        launch_ranks("-m mtprl", second, "train", *overrides(tiny_world, out, f"trainer.n_gpus_per_node={second}",
                                                             "trainer.total_training_steps=3"))
        steps = [r["step"] for r in rows(out)]
        assert steps == [1, 2, 3], steps  # one row per step, the resumed run logged step 3 once
        assert find_latest_checkpoint(out).name == "global_step_3"


@pytest.mark.slow
def test_torchrun_two_ranks_one_step(tiny_world, tmp_path, free_tcp_port):
    out = tmp_path / "torchrun"
    # with the Prometheus endpoint on: only rank 0 serves it (both ranks binding the port would fail)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           "-m", "mtprl", "train", *overrides(tiny_world, out, "trainer.n_gpus_per_node=2",
                                              "trainer.total_training_steps=1",
                                              "actor_rollout_ref.rollout.prometheus.enable=True",
                                              f"actor_rollout_ref.rollout.prometheus.port={free_tcp_port}")]
    res = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (row,) = rows(out)
    assert row["step"] == 1 and row["timing_s/update_weights"] > 0


def ray_env():
    env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def ray_train(tiny_world, out, *extra, flags=(), timeout=240):
    cmd = [sys.executable, "-m", "mtprl", "train", *flags, *overrides(tiny_world, out, "trainer.n_gpus_per_node=2",
                                                                       "ray_kwargs.ray_init.num_cpus=2", *extra)]
    return subprocess.run(cmd, env=ray_env(), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_ray_two_workers_two_steps_then_a_killed_rank_and_resume(tiny_world, tmp_path):
    import math

    out = tmp_path / "ray"
    res = ray_train(tiny_world, out, "trainer.total_training_steps=2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = rows(out)
    assert [r["step"] for r in got] == [1, 2]  # logged once per step (rank 0 only)
    assert all(math.isfinite(v) for r in got for v in r.values() if isinstance(v, float))
    assert all(r["timing_s/update_weights"] > 0 for r in got)
    # rank 1 is SIGKILLed in the update of step 3: one error naming the rank and the last checkpoint, in time
    t0 = time.monotonic()
    runtime_env = tmp_path / "runtime_env.yaml"  # the seed's file format; its env_vars reach every worker
    runtime_env.write_text('env_vars:\n  MTPRL_FAULT: "update:3@1"\n')
    killed = ray_train(tiny_world, out, "trainer.total_training_steps=4", flags=("--runtime-env", str(runtime_env)),
                       timeout=120)
    assert killed.returncode != 0 and time.monotonic() - t0 < 60
    assert "rank 1 died" in killed.stderr and "global_step_2" in killed.stderr, killed.stderr[-3000:]
    resumed = ray_train(tiny_world, out, "trainer.total_training_steps=4")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_joins_a_cluster_started_with_ray_start(tiny_world, tmp_path, free_tcp_port):
    """The multi-node path on one machine: `ray start --head`, then `mtprl train ray_kwargs.ray_init.address=auto`
    (on a real cluster the other nodes run `ray start --address=<head>:<port>`)."""
    ray = str(Path(sys.executable).parent / "ray")
    env = ray_env()
    port = str(free_tcp_port)
    start = subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                            "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        out = tmp_path / "cluster"
        cmd = [sys.executable, "-m", "mtprl", "train", *overrides(tiny_world, out, "trainer.n_gpus_per_node=2",
                                                                   "ray_kwargs.ray_init.address=auto",
                                                                   "trainer.total_training_steps=1")]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert [r["step"] for r in rows(out)] == [1]
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_sft_refuses_several_ranks(tiny_world, tmp_path):
    from mtprl.config import ConfigError, load_config
    from mtprl.trainer.sft import run_sft

    cfg = load_config(None, [f"data.train_files={tiny_world.data.sft_train}", f"actor_rollout_ref.model.path={tiny_world.model}",
                             "trainer.n_gpus_per_node=2", f"trainer.default_local_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="mtprl sft runs on one process"):
        run_sft(cfg)
