import json

import pytest

from mtprl.cli import main


@pytest.mark.slow
def test_quick_demo_runs_every_stage(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "rl" / "summary.json").read_text())
    for key in ("val_acc_before", "val_acc_after", "val_acc_greedy_before", "val_acc_greedy_after",
                "min_accept_length", "mean_accept_length", "mean_draft_depth", "response_length_mean", "wall_seconds",
                "rollout_tokens_per_s_plain_batch", "rollout_tokens_per_s_speculative_batch",
                "rollout_tokens_per_s_plain_b1", "rollout_speedup_b1", "rollout_tokens_per_s_adaptive_batch",
                "rollout_speedup_adaptive_batch", "rollout_speedup_adaptive_b1", "response_length_quantiles"):
        assert summary[key] is not None, key
    assert summary["num_steps"] == 2 and summary["num_mtp_layers"] == 1
    rows = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert "val-core/synthetic_arith/acc/mean@2" in rows[0]  # the preset's sampled validation (n=2 in --quick)
    assert "mtp_losses/mtp_3_loss" in rows[1]  # the one MTP layer trained at its recursive depths 2 and 3
    for name in ("reward_and_val_acc", "accept_length", "draft_depth", "response_length", "time_per_phase"):
        assert (tmp_path / "rl" / "plots" / f"{name}.png").is_file()
    assert any((tmp_path / "rl" / "tensorboard").iterdir())
    assert (tmp_path / "sft" / "global_step_6" / "actor" / "model.safetensors").is_file()
    assert "report:" in capsys.readouterr().out


def test_demo_measures_the_checkpoint_rl_actually_wrote(tmp_path, monkeypatch):
    # with trainer.total_training_steps=null the run length comes from the epochs (or dynamic sampling ends it
    # early): the speed stage must load the last checkpoint written, not global_step_<total_training_steps>
    from types import SimpleNamespace

    import mtprl.demo as demo
    import mtprl.trainer.loop as loop
    import mtprl.trainer.sft as sft
    from mtprl.trainer.checkpoint import TrainerState, save_checkpoint

    class Stub:
        def save_pretrained(self, path):
            import pathlib

            pathlib.Path(path).mkdir(parents=True)

    def fake_train(cfg, console=None):
        save_checkpoint(cfg.trainer.default_local_dir, 3, Stub(), None, None,
                        TrainerState(step=3, loader={}, rng={}, bad_steps=0, config={}))

    seen = {}
    monkeypatch.setattr(demo, "write_synthetic_math", lambda out, **kw: SimpleNamespace(
        train="t.parquet", val="v.parquet", sft_train="st.parquet", sft_val="sv.parquet"))
    monkeypatch.setattr(demo, "build_math_tokenizer", lambda out, **kw: out)
    monkeypatch.setattr(demo, "load_tokenizer", lambda path: [0] * 300)
    monkeypatch.setattr(demo, "init_policy_checkpoint", lambda out, *a, **kw: out)
    monkeypatch.setattr(sft, "run_sft", lambda cfg, console=None: tmp_path / "sft" / "actor")
    monkeypatch.setattr(loop, "train", fake_train)
    monkeypatch.setattr(demo, "measure_rollout_speed",
                        lambda cfg, console: (seen.setdefault("path", cfg.actor_rollout_ref.model.path) and {}, []))
    monkeypatch.setattr(demo, "write_report", lambda *a, **kw: {})
    demo.run_demo(tmp_path, quick=True, overrides=["trainer.total_training_steps=null", "trainer.logger=[jsonl]"])
    assert seen["path"] == str(tmp_path / "rl" / "global_step_3" / "actor")


def test_seed_gains_by_hand(tmp_path):
    from mtprl.demo import seed_gains

    key = "val-core/synthetic_arith/acc/mean@4"
    for name, before, after in (("rl", 0.25, 0.50), ("rl_seed2", 0.25, 0.35), ("rl_seed3", 0.30, 0.45)):
        (tmp_path / name).mkdir()
        rows = [{"step": 0, key: before}, {"step": 5, key: 0.9, "critic/score/mean": 0.0, "response_length/mean": 9},
                {"step": 10, key: after}]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = seed_gains(tmp_path, ["rl", "rl_seed2", "rl_seed3"])
    assert [round(r["gain"], 6) for r in out["seed_runs"]] == [0.25, 0.10, 0.15]
    assert abs(out["seed_gain_mean"] - 0.5 / 3) < 1e-9
    mean = 0.5 / 3  # sample standard deviation
    assert abs(out["seed_gain_std"] - (((0.25 - mean) ** 2 + (0.10 - mean) ** 2 + (0.15 - mean) ** 2) / 2) ** 0.5) < 1e-9
    (tmp_path / "rl_seed3" / "metrics.jsonl").write_text(json.dumps({"step": 3, key: 0.1}))
    with pytest.raises(ValueError, match="no validation before and after"):
        seed_gains(tmp_path, ["rl", "rl_seed3"])


def test_speed_stage_measures_fixed_depth_next_to_adaptive(monkeypatch):
    # the preset's RL setting is adaptive; the speed stage's "speculative" figure must still be the fixed depth
    from types import SimpleNamespace

    import mtprl.demo as demo
    import mtprl.rollout.build as build
    import mtprl.trainer.policy as policy
    from mtprl.config import load_config

    seen = []

    class Engine:
        def generate_with_metrics(self, prompts, params, speculative=None, generator=None):
            seen.append(None if speculative is None else (speculative.num_steps, speculative.adaptive))
            metrics = SimpleNamespace(num_generated_tokens=10 * len(prompts), elapsed_s=0.01, mean_accept_length=2.0,
                                      num_row_steps=5)
            return SimpleNamespace(metrics=metrics, completions=[SimpleNamespace(token_ids=[1, 2])] * len(prompts))

    import mtprl.data as data

    monkeypatch.setattr(policy, "load_policy_tokenizer", lambda cfg: SimpleNamespace(eos_token_id=0))
    monkeypatch.setattr(policy, "load_policy", lambda cfg, device: None)
    monkeypatch.setattr(data, "build_prompt_dataset", lambda *a, **kw: SimpleNamespace(
        prompts=[SimpleNamespace(prompt_ids=[1, 2, 3])] * 16))
    monkeypatch.setattr(build, "build_engine", lambda cfg, model: Engine())
    import mtprl.trainer.samples as samples

    from mtprl.rollout import SamplingParams

    monkeypatch.setattr(samples, "sampling_params", lambda cfg, tok: SamplingParams(n=8))
    cfg = load_config("tiny_cpu", [])
    assert cfg.actor_rollout_ref.model.mtp.adaptive
    out, _ = demo.measure_rollout_speed(cfg, demo.Console(quiet=True))
    assert set(seen) == {None, (3, False), (3, True)}
    assert out["accept_length_speculative_b1"] == 2.0 and out["rollout_speedup_b1"] == 1.0
