import json
import os
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
    own_flags = {"generate": ("--model", "--speculative-num-steps"), "check-rollout": ("--model", "--backend")}
    assert all(flag in out for flag in own_flags.get(command, ("key=value",))), out


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "mtprl", "config", "show", "data.seed=7"],
                         capture_output=True, text=True, check=True).stdout
    assert yaml.safe_load(out)["data"]["seed"] == 7


# ----- only our messages: no transformers notices, a plain "no such directory" -------------------------------
TRANSFORMERS_NOISE = ("You are using a model of type", "rope_scaling", "FutureWarning", "Repo id", "[transformers]")


@pytest.fixture(scope="module")
def mimo_dir(tmp_path_factory):
    """A tiny MiMo checkpoint (model_type "mimo", unknown to transformers) with our tokenizer files."""
    import torch

    from mtprl.data.tokenizer import build_math_tokenizer
    from mtprl.model import CausalLM, ModelConfig

    path = tmp_path_factory.mktemp("mimo")
    build_math_tokenizer(path, vocab_size=300, num_problems=50)
    torch.manual_seed(0)
    CausalLM(ModelConfig.tiny(vocab_size=304, num_mtp_layers=1)).save_pretrained(str(path))
    return path


def test_policy_tokenizer_of_a_mimo_checkpoint_loads_without_transformers_notices(mimo_dir, capfd):
    import warnings

    from mtprl.config.schema import ModelConfig
    from mtprl.trainer.policy import load_policy_tokenizer

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = load_policy_tokenizer(ModelConfig(path=str(mimo_dir)))
    assert tok.eos_token == "<|im_end|>" and len(tok) == 300
    assert [str(w.message) for w in caught] == []
    out, err = capfd.readouterr()
    assert not any(noise in out + err for noise in TRANSFORMERS_NOISE), out + err


def test_generate_cli_prints_only_our_output(mimo_dir):
    proc = subprocess.run([sys.executable, "-m", "mtprl", "generate", "--model", str(mimo_dir), "--prompt", "1+1=",
                           "--max-new-tokens", "2", "--temperature", "0"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert not any(noise in proc.stdout + proc.stderr for noise in TRANSFORMERS_NOISE), proc.stderr
    assert json.loads(proc.stdout.splitlines()[0])["prompt_index"] == 0
    assert list(json.loads(proc.stderr)) and proc.stderr.startswith("{")  # the metrics line, nothing else


def test_missing_model_directory_says_so(tmp_path, mimo_dir, capsys):
    from mtprl.config import ConfigError
    from mtprl.config.schema import ModelConfig
    from mtprl.trainer.policy import load_policy

    missing = str(tmp_path / "nonexistent")
    assert main(["train", f"actor_rollout_ref.model.path={missing}"]) == 2
    err = capsys.readouterr().err
    assert f"actor_rollout_ref.model.path={missing!r}: no such directory" in err, err
    assert "Repo id" not in err and len(err.strip().splitlines()) == 1
    assert main(["eval", f"actor_rollout_ref.model.path={mimo_dir}",
                 f"actor_rollout_ref.model.tokenizer_path={missing}"]) == 2
    assert f"actor_rollout_ref.model.tokenizer_path={missing!r}: no such directory" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"actor_rollout_ref\.model\.path=.*: no such directory"):
        load_policy(ModelConfig(path=missing), device=None)
    assert main(["generate", "--model", missing, "--prompt", "x"]) == 1
    assert f"--model={missing!r}: no such directory" in capsys.readouterr().err
