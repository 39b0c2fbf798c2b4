import json

import pytest

from mtprl.cli import main


@pytest.mark.slow
def test_quick_demo_runs_every_stage(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "rl" / "summary.json").read_text())
    for key in ("val_acc_before", "val_acc_after", "min_accept_length", "wall_seconds",
                "rollout_tokens_per_s_plain_batch", "rollout_tokens_per_s_speculative_batch",
                "rollout_tokens_per_s_plain_b1", "rollout_speedup_b1"):
        assert summary[key] is not None, key
    assert summary["num_steps"] == 2
    for name in ("reward_and_val_acc", "accept_length", "time_per_phase"):
        assert (tmp_path / "rl" / "plots" / f"{name}.png").is_file()
    assert any((tmp_path / "rl" / "tensorboard").iterdir())
    assert (tmp_path / "sft" / "global_step_6" / "actor" / "model.safetensors").is_file()
    assert "report:" in capsys.readouterr().out
