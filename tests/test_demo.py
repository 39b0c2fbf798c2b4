import json

import pytest

from mtprl.cli import main


@pytest.mark.slow
def test_quick_demo_runs_every_stage(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "rl" / "summary.json").read_text())
    for key in ("val_acc_before", "val_acc_after", "min_accept_length", "wall_seconds",
                "rollout_tokens_per_s_plain_batch", "rollout_tokens_per_s_speculative_batch",
                "rollout_tokens_per_s_plain_b1", "rollout_speedup_b1", "rollout_tokens_per_s_adaptive_batch",
                "rollout_speedup_adaptive_b1"):
        assert summary[key] is not None, key
    assert summary["num_steps"] == 2
    for name in ("reward_and_val_acc", "accept_length", "time_per_phase"):
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
    from mtprl.trainer.checkpoint import save_checkpoint

    class Stub:
        def save_pretrained(self, path):
            import pathlib

            pathlib.Path(path).mkdir(parents=True)

    def fake_train(cfg, console=None):
        save_checkpoint(cfg.trainer.default_local_dir, 3, Stub(), None, None, {})

    seen = {}
    monkeypatch.setattr(demo, "write_synthetic_math", lambda out, **kw: SimpleNamespace(
        train="t.parquet", val="v.parquet", sft_train="st.parquet", sft_val="sv.parquet"))
    monkeypatch.setattr(demo, "build_math_tokenizer", lambda out, **kw: out)
    monkeypatch.setattr(demo, "load_tokenizer", lambda path: [0] * 300)
    monkeypatch.setattr(demo, "init_policy_checkpoint", lambda out, *a, **kw: out)
    monkeypatch.setattr(sft, "run_sft", lambda cfg, console=None: tmp_path / "sft" / "actor")
    monkeypatch.setattr(loop, "train", fake_train)
    monkeypatch.setattr(demo, "measure_rollout_speed",
                        lambda cfg, console: seen.setdefault("path", cfg.actor_rollout_ref.model.path) and {})
    monkeypatch.setattr(demo, "write_report", lambda *a, **kw: {})
    demo.run_demo(tmp_path, quick=True, overrides=["trainer.total_training_steps=null", "trainer.logger=[jsonl]"])
    assert seen["path"] == str(tmp_path / "rl" / "global_step_3" / "actor")
