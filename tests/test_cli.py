import subprocess
import sys

import pytest
import yaml

from mtprl.cli import COMMANDS, main


def test_config_show_prints_the_resolved_config(capsys):
    assert main(["config", "show", "actor_rollout_ref.model.mtp.enable=True", "data.train_batch_size=16"]) == 0
    tree = yaml.safe_load(capsys.readouterr().out)
    assert tree["actor_rollout_ref"]["model"]["mtp"]["enable"] is True
    assert tree["data"]["train_batch_size"] == 16
    assert tree["data"]["gen_batch_size"] == 16  # resolved, not null


def test_config_show_with_preset(capsys):
    assert main(["config", "show", "--config-name", "tiny_cpu"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["experiment_name"] == "tiny_cpu"


def test_mistyped_key_is_a_one_line_error(capsys):
    assert main(["config", "show", "trainer.total_epoch=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "config error: unknown config key 'trainer.total_epoch' (command line); did you mean 'trainer.total_epochs'?"
    ]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert ("--model" in out and "--speculative-num-steps" in out) if command == "generate" else "key=value" in out


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "mtprl", "config", "show", "data.seed=7"],
                         capture_output=True, text=True, check=True).stdout
    assert yaml.safe_load(out)["data"]["seed"] == 7
