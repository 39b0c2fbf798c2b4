"""Failures and resume: SIGKILL at named points then resume, corrupt checkpoints, a full disk during a save,
metrics logs cut back on resume, and validation alone (``trainer.val_only``, ``mtprl eval``)."""

import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from mtprl.config import load_config
from mtprl.metrics import Tracker
from mtprl.metrics.report import read_metrics, summarize
from mtprl.model import from_pretrained
from mtprl.trainer.checkpoint import LATEST_FILE, CheckpointWarning, checkpoint_problem, load_checkpoint
from mtprl.trainer.loop import evaluate, train

# +1 for an even response length: rewards vary within groups even for a random policy
PARITY_REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": 1.0 if len(solution_str) % 2 == 0 else -1.0, "acc": len(solution_str) % 2 == 0}
'''
# compared between a resumed and an uninterrupted run (timings, throughput and wall clock differ)
COMPARED = ("critic/score/mean", "actor/pg_loss", "actor/grad_norm", "actor/entropy", "mtp_losses/mtp_1_loss",
            "response_length/mean", "critic/advantages/mean")


def _overrides(world, out, reward_file, *extra):
    return [
        f"data.train_files={world.data.train}", f"data.val_files={world.data.val}", "data.max_prompt_length=64",
        "data.max_response_length=8", "data.train_batch_size=2", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.rollout.n=4", f"actor_rollout_ref.model.path={world.model}",
        "actor_rollout_ref.model.mtp.enable=True", "actor_rollout_ref.model.mtp.enable_train=True",
        "actor_rollout_ref.model.mtp.enable_rollout=True", "actor_rollout_ref.model.mtp.speculative_num_steps=2",
        "actor_rollout_ref.model.mtp.speculative_eagle_topk=1", "actor_rollout_ref.model.mtp.speculative_num_draft_tokens=3",
        "actor_rollout_ref.actor.optim.lr=1e-3", "reward_model.num_workers=0", f"custom_reward_function.path={reward_file}",
        "trainer.logger=[jsonl]", f"trainer.default_local_dir={out}", "trainer.val_before_train=False",
        "trainer.test_freq=-1", "trainer.save_freq=1", "data.val_batch_size=16", *extra,
    ]


def _no_timing(metrics):
    return {k: v for k, v in metrics.items() if "elapsed" not in k and "per_s" not in k and "timing" not in k}


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _texts(out, tag):
    return [r["text"] for r in map(json.loads, (out / "generations.jsonl").read_text().splitlines()) if r["tag"] == tag]


def _assert_same_steps(rows, reference):
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    for row, ref in zip(rows, reference):
        for key in COMPARED:
            if key in ref:
                assert row[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (row["step"], key)


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "parity_reward.py"
    path.write_text(PARITY_REWARD)
    return path


def _cli(overrides, fault=None, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MTPRL_FAULT": fault or ""}
    return subprocess.run([sys.executable, "-m", "mtprl", "train", *overrides], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_killed_five_times_then_resumed_equals_an_uninterrupted_run(tiny_world, tmp_path, reward_file):
    # the same command, SIGKILLed at a different point each time (MTPRL_FAULT=<phase>:<step>, see
    # mtprl.trainer.faults), then run to the end; with the tiny_cpu preset's adaptive speculation (its state is in
    # the checkpoint) and its cold drafts
    steps = ["trainer.total_training_steps=4", "actor_rollout_ref.model.mtp.adaptive=True",
             "actor_rollout_ref.model.mtp.speculative_draft_temperature=0.4", "data.max_response_length=16"]
    reference = _cli(_overrides(tiny_world, tmp_path / "ref", reward_file, *steps))
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "killed"
    cmd = _overrides(tiny_world, out, reward_file, *steps)
    kills = [("gen:2", 1), ("save:2", 1), ("renamed:2", 1), ("log:3", 2), ("update:4", 3)]  # (fault, resumed from)
    for fault, _ in kills:
        proc = _cli(cmd, fault)
        assert proc.returncode == -signal.SIGKILL, (fault, proc.stderr[-2000:])
    last = _cli(cmd)
    assert last.returncode == 0, last.stderr[-2000:]

    # each run resumed from the newest complete checkpoint: the one renamed into place before the latest-step
    # file was written (renamed:2) included, the interrupted write (save:2) ignored
    resumed_from = [int(t.rsplit("step ", 1)[1].rstrip(")")) for t in _texts(out, "trainer/resume")]
    assert resumed_from == [1, 1, 2, 3, 3]
    rows = _rows(out)  # one row per step, killed steps included; the rows of steps 2, 3 logged from their checkpoints
    _assert_same_steps(rows, _rows(tmp_path / "ref"))
    assert [("timing_s/step" in r) for r in rows] == [True, False, False, True]
    summary = summarize(read_metrics(out / "metrics.jsonl"))  # what `report` / summary.json count
    assert summary["num_steps"] == 4 and summary["step_seconds_mean"] > 0
    assert (out / LATEST_FILE).read_text() == "4"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("global_step_")) == [
        f"global_step_{k}" for k in (1, 2, 3, 4)]  # no .tmp / .old leftovers
    model = from_pretrained(str(tiny_world.model))
    for k in (1, 2, 3, 4):
        assert checkpoint_problem(out / f"global_step_{k}") is None
        assert load_checkpoint(out / f"global_step_{k}", model).step == k


@pytest.mark.parametrize("damaged", ["actor/model.safetensors", "optimizer.pt"])
def test_a_truncated_latest_checkpoint_resumes_from_the_previous_one(tiny_world, tmp_path, reward_file, damaged):
    from mtprl.trainer.setup import setup

    out = tmp_path / "run"
    train(load_config(None, _overrides(tiny_world, out, reward_file, "trainer.total_training_steps=2")))
    reference = _rows(out)
    target = out / "global_step_2" / damaged
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    cfg = load_config(None, _overrides(tiny_world, out, reward_file, "trainer.total_training_steps=2"))
    with pytest.warns(CheckpointWarning, match=rf"global_step_2 is incomplete or corrupt \({damaged} has .*"
                                               r"resuming from \S*global_step_1 instead \(nothing was deleted\)"):
        run = setup(cfg)
    try:
        assert run.step == 1 and run.last_checkpoint.name == "global_step_1"
        assert target.is_file()  # left as it was
    finally:
        run.close()
    with pytest.warns(CheckpointWarning):
        train(cfg)  # step 2 again, as it was
    _assert_same_steps(_rows(out), reference)
    assert checkpoint_problem(out / "global_step_2") is None


def test_an_rl_run_refuses_to_resume_from_an_sft_checkpoint(tiny_world, tmp_path, reward_file):
    # mtprl sft's trainer state has no next_group_id / kl_coef: resuming RL from it is a clear error naming the
    # way to start from its weights, not a KeyError
    from mtprl.trainer.checkpoint import CheckpointError, TrainerState, save_checkpoint

    out = tmp_path / "run"
    sft_state = TrainerState(step=2, loader={}, rng={}, bad_steps=0, config={})
    save_checkpoint(out, 2, from_pretrained(str(tiny_world.model)), None, None, sft_state)
    with pytest.raises(CheckpointError, match=r"global_step_2 is not an RL checkpoint .* start an RL run from its "
                                              r"weights with actor_rollout_ref.model.path=\S*global_step_2/actor"):
        train(load_config(None, _overrides(tiny_world, out, reward_file, "trainer.total_training_steps=3")))


def test_a_full_disk_during_a_save_stops_with_the_last_intact_checkpoint(tiny_world, tmp_path, reward_file,
                                                                         monkeypatch):
    import mtprl.trainer.checkpoint as ckpt

    real_save = torch.save

    def disk_full_at_step_2(obj, path, *args, **kwargs):
        if "global_step_2" in str(path) and str(path).endswith("optimizer.pt"):
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    out = tmp_path / "run"
    cfg = load_config(None, _overrides(tiny_world, out, reward_file, "trainer.total_training_steps=3"))
    monkeypatch.setattr(ckpt.torch, "save", disk_full_at_step_2)
    with pytest.raises(OSError, match=r"writing checkpoint \S*global_step_2 failed \(No space left on device\); the "
                                      r"last intact checkpoint is \S*global_step_1") as failure:
        train(cfg)
    assert failure.value.errno == errno.ENOSPC
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert (out / LATEST_FILE).read_text() == "1"
    assert checkpoint_problem(out / "global_step_1") is None
    assert not (out / "global_step_2").exists() and not (out / "global_step_2.tmp").exists()
    train(cfg)  # the same command again, once there is space
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]
    assert _texts(out, "trainer/resume") == [f"resumed from {out / 'global_step_1'} (step 1)"]


def test_resume_cuts_the_logs_back_to_the_resumed_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with Tracker(["jsonl", "tensorboard"], tmp_path, rank=0) as tr:  # a run killed after step 4, saved at 2
        for step in (1, 2, 3, 4):
            tr.log({"critic/score/mean": float(step)}, step)
            tr.log_text("val/generations", f"text {step}", step)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "critic/sc')  # a row cut off by the kill
    with Tracker(["jsonl", "tensorboard"], tmp_path, rank=0, keep_through=2) as tr:
        assert tr.last_logged_step == 2
        for step in (3, 4):
            tr.log({"critic/score/mean": 10.0 * step}, step)
    assert [(r["step"], r["critic/score/mean"]) for r in _rows(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert [json.loads(line)["text"] for line in (tmp_path / "generations.jsonl").read_text().splitlines()] == [
        "text 1", "text 2"]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("critic/score/mean")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    with Tracker(["jsonl"], tmp_path, rank=0, keep_through=-1) as tr:  # a fresh start in the same folder
        assert tr.last_logged_step == -1
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def _perturbed_checkpoint(world, root, step):
    """A checkpoint at ``step`` whose weights differ from ``model.path``'s (as training would leave them)."""
    from mtprl.trainer.checkpoint import TrainerState, save_checkpoint

    model = from_pretrained(str(world.model))
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return save_checkpoint(root, step, model, None, None,
                           TrainerState(step=step, loader={}, rng={}, bad_steps=0, config={}))


def _eval_overrides(world, out, *extra):
    return [f"data.val_files={world.data.val}", f"actor_rollout_ref.model.path={world.model}",
            "data.max_response_length=8", "trainer.logger=[jsonl]", f"trainer.default_local_dir={out}",
            "data.train_batch_size=32", "trainer.log_val_generations=16", *extra]  # 32: more than the 16 val prompts


def test_val_only_validates_the_resumed_checkpoint_at_its_step(tiny_world, tmp_path):
    out = tmp_path / "run"
    ckpt = _perturbed_checkpoint(tiny_world, out, 7)
    metrics = train(load_config(None, _eval_overrides(tiny_world, out, "trainer.val_only=True")))
    rows = _rows(out)
    assert [r["step"] for r in rows] == [7]  # logged at the checkpoint's step, not 0
    # the same numbers as validating that checkpoint's weights directly, and not the base model's
    direct = evaluate(load_config(None, _eval_overrides(tiny_world, tmp_path / "direct",
                                                        f"actor_rollout_ref.model.path={ckpt / 'actor'}",
                                                        f"actor_rollout_ref.model.tokenizer_path={tiny_world.model}")))
    base = evaluate(load_config(None, _eval_overrides(tiny_world, tmp_path / "base")))
    assert _no_timing(metrics) == pytest.approx(_no_timing(direct))
    assert _texts(out, "val/generations") == _texts(tmp_path / "direct", "val/generations")
    assert _texts(out, "val/generations") != _texts(tmp_path / "base", "val/generations")
    assert _no_timing(metrics) != pytest.approx(_no_timing(base))
    # resume_mode=disable: model.path, at step 0
    again = train(load_config(None, _eval_overrides(tiny_world, out, "trainer.val_only=True",
                                                    "trainer.resume_mode=disable")))
    assert _no_timing(again) == pytest.approx(_no_timing(base)) and _rows(out)[-1]["step"] == 0


def test_evaluation_builds_no_train_loader_or_optimizer(tiny_world, tmp_path, monkeypatch, capsys):
    # the validation set (16 prompts) is smaller than a train batch (32): evaluation must not build the train
    # loader (drop_last would refuse it) nor an optimizer
    import mtprl.trainer.setup as setup_mod
    from mtprl.cli import main

    def not_for_evaluation(*args, **kwargs):
        raise AssertionError("evaluation built a training component")

    monkeypatch.setattr(setup_mod, "PromptLoader", not_for_evaluation)
    monkeypatch.setattr(setup_mod, "build_optimizer", not_for_evaluation)
    monkeypatch.setattr(setup_mod, "build_scheduler", not_for_evaluation)
    assert main(["eval", *_eval_overrides(tiny_world, tmp_path / "eval")]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["val-core/synthetic_arith/acc/mean@1"] <= 1.0
    metrics = train(load_config(None, _eval_overrides(tiny_world, tmp_path / "val_only", "trainer.val_only=True",
                                                      f"data.train_files={tiny_world.data.train}")))
    assert "val-core/synthetic_arith/acc/mean@1" in metrics
