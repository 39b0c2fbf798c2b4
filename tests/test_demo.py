import json

import pytest
import torch

from mtprl.cli import main


@pytest.mark.slow
def test_quick_demo_runs_every_stage(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "rl" / "summary.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    sft_rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    # QUICK: 6 SFT steps validated every max(6 // 4, 1) = 1 step, checkpoint at the last; 2 RL steps after a
    # validation at step 0 (val_before_train); 2 trunk layers and 1 MTP layer
    assert [(r["step"], "val/sft/lm_loss" in r) for r in sft_rows] == [(k, True) for k in range(1, 7)]
    assert (tmp_path / "sft" / "global_step_6" / "actor" / "model.safetensors").is_file()
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert (summary["num_steps"], summary["num_trunk_layers"], summary["num_mtp_layers"]) == (2, 2, 1)
    val, train = rows[0], rows[1:]
    # validation: 16 prompts x val_kwargs.n = 2 samples; a step: train_batch_size 8 x rollout.n 4 = 32 responses,
    # whose tokens are 32 x their mean length; a response of L <= 32 tokens scores +-1 minus the overlong penalty
    # max(0, L - (32 - 8)) / 8 <= 1 (buffer len 8, factor 1), so every score lies in [-1 - 1, 1] = [-2, 1]
    assert val["val/rollout/num_sequences"] == 16 * 2
    for r in train:
        assert r["rollout/num_sequences"] == 8 * 4
        assert r["rollout/num_generated_tokens"] == pytest.approx(32 * r["response_length/mean"], rel=1e-9)
        assert -2.0 <= r["critic/score/min"] <= r["critic/score/mean"] <= r["critic/score/max"] <= 1.0
    # the summary is the logs' figures: validation accuracy (val_kwargs n = 2: mean@2) before and after, the steps'
    # rewards, their means and the per-depth acceptance of the preset's 3 draft steps
    key = "val-core/synthetic_arith/acc/mean@2"
    assert (summary["val_acc_before"], summary["val_acc_after"]) == (val[key], rows[2][key])
    assert (summary["reward_first"], summary["reward_last"]) == (train[0]["critic/score/mean"],
                                                                 train[1]["critic/score/mean"])
    accept = [r["rollout/spec_accept_length"] for r in train]
    assert summary["mean_accept_length"] == pytest.approx((accept[0] + accept[1]) / 2)
    assert summary["min_accept_length"] == min(accept)
    assert summary["response_length_mean"] == pytest.approx(sum(r["response_length/mean"] for r in train) / 2)
    assert summary["accept_rate_per_depth_mean"] == pytest.approx(
        {str(k): sum(r[f"rollout/spec_accept_rate_{k}"] for r in train) / 2 for k in (1, 2, 3)})
    # a decode step with 3 draft steps emits 1 to 3 + 1 = 4 tokens per row
    for name in ("accept_length_speculative_batch", "accept_length_speculative_b1"):
        assert 1.0 <= summary[name] <= 4.0, name
    for shape in ("batch", "b1"):
        for mode in ("plain", "speculative", "adaptive"):
            assert summary[f"rollout_tokens_per_s_{mode}_{shape}"] > 0
        assert summary[f"rollout_speedup_{shape}"] > 0 and summary[f"rollout_speedup_adaptive_{shape}"] > 0
    q = summary["response_length_quantiles"]  # of the plain RL-batch samples, at most max_response_length = 32
    assert 1 <= q["p10"] <= q["p50"] <= q["p90"] <= q["p99"] <= q["max"] <= 32
    # the one MTP layer trained at depth 1 and, recursive_steps = 3, reused at depths 2 and 3
    assert {k for k in rows[1] if k.startswith("mtp_losses/")} == {f"mtp_losses/mtp_{k}_loss" for k in (1, 2, 3)}
    for name in ("reward_and_val_acc", "accept_length", "draft_depth", "response_length", "time_per_phase"):
        assert (tmp_path / "rl" / "plots" / f"{name}.png").is_file()
    assert any((tmp_path / "rl" / "tensorboard").iterdir())
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
        device = torch.device("cpu")

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
