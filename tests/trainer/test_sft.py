import pytest
import torch

from mtprl.config import ConfigError, load_config
from mtprl.model import from_pretrained
from mtprl.trainer.sft import run_sft


def _cfg(world, out, *extra):
    return load_config(None, [
        f"data.train_files={world.data.sft_train}", f"data.val_files={world.data.sft_val}",
        "data.max_prompt_length=64", "data.max_response_length=48", "data.train_batch_size=16",
        "actor_rollout_ref.actor.ppo_mini_batch_size=16",
        f"actor_rollout_ref.model.path={world.model}", "actor_rollout_ref.model.mtp.enable=True",
        "actor_rollout_ref.model.mtp.enable_train=True", "actor_rollout_ref.actor.optim.lr=3e-3",
        "actor_rollout_ref.actor.optim.weight_decay=0.0", "trainer.logger=[jsonl]", "trainer.test_freq=2",
        f"trainer.default_local_dir={out}", "sft.micro_batch_size_per_gpu=8", *extra,
    ])


def _losses(out):
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sft_learns_and_resume_is_exact(tiny_world, tmp_path):
    straight = tmp_path / "straight"
    final = run_sft(_cfg(tiny_world, straight, "trainer.total_training_steps=4"))
    rows = _losses(straight)
    assert rows[-1]["sft/lm_loss"] < rows[0]["sft/lm_loss"]
    assert "val/mtp/acc_1" in rows[1] and "mtp_losses/mtp_2_loss" in rows[0]
    # stop after 2 steps, then resume to 4: same weights as the uninterrupted run
    split = tmp_path / "split"
    run_sft(_cfg(tiny_world, split, "trainer.total_training_steps=2"))
    resumed = run_sft(_cfg(tiny_world, split, "trainer.total_training_steps=4"))
    a, b = from_pretrained(final).state_dict(), from_pretrained(resumed).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert [r["step"] for r in _losses(split)] == [1, 2, 3, 4]


def test_sft_freeze_trunk_trains_only_mtp(tiny_world, tmp_path):
    out = run_sft(_cfg(tiny_world, tmp_path / "run", "trainer.total_training_steps=2", "sft.freeze_trunk=True"))
    before, after = from_pretrained(tiny_world.model).state_dict(), from_pretrained(out).state_dict()
    for name in before:
        same = torch.equal(before[name], after[name])
        assert same != name.startswith("mtp_layers."), name  # trunk bit-identical, every MTP tensor moved
    assert (out / "tokenizer.json").is_file()  # the checkpoint carries its tokenizer


def test_sft_freeze_trunk_needs_mtp(tiny_world, tmp_path):
    cfg = _cfg(tiny_world, tmp_path, "sft.freeze_trunk=True", "actor_rollout_ref.model.mtp.enable_train=False")
    with pytest.raises(ConfigError, match="trains only the MTP layers"):
        run_sft(cfg)


def test_sft_command_line(tiny_world, tmp_path, capsys):
    from mtprl.cli import main

    rc = main(["sft", f"data.train_files={tiny_world.data.sft_train}", "data.train_batch_size=8",
               "actor_rollout_ref.actor.ppo_mini_batch_size=8", f"actor_rollout_ref.model.path={tiny_world.model}",
               "data.max_prompt_length=64", "data.max_response_length=48", "trainer.total_training_steps=1",
               "trainer.logger=[jsonl]", f"trainer.default_local_dir={tmp_path}"])
    assert rc == 0
    assert f"SFT checkpoint: {tmp_path / 'global_step_1' / 'actor'}" in capsys.readouterr().out


def test_sft_actor_lr_is_the_lr_the_step_used(tiny_world, tmp_path):
    out = tmp_path / "lr"
    run_sft(_cfg(tiny_world, out, "trainer.total_training_steps=2", "trainer.test_freq=-1",
                 "actor_rollout_ref.actor.optim.lr_warmup_steps=4"))
    assert [r["actor/lr"] for r in _losses(out)] == pytest.approx([0.0, 0.75e-3])  # warmup 0/4, 1/4 of 3e-3 (verl)


def test_sft_skipped_step_still_advances_the_lr_schedule(tiny_world, tmp_path, monkeypatch):
    # verl (SFT trainer and RL actor): a non-finite grad norm skips optimizer.step, lr_scheduler.step still runs
    import mtprl.trainer.sft as sft

    real, calls = sft.clip_and_check, []

    def second_step_non_finite(model, max_norm):
        calls.append(1)
        norm, finite = real(model, max_norm)
        return (float("inf"), False) if len(calls) == 2 else (norm, finite)

    monkeypatch.setattr(sft, "clip_and_check", second_step_non_finite)
    out = tmp_path / "skip"
    run_sft(_cfg(tiny_world, out, "trainer.total_training_steps=3", "trainer.test_freq=-1",
                 "actor_rollout_ref.actor.optim.lr_warmup_steps=4"))
    rows = _losses(out)
    assert [r["training/skipped_steps"] for r in rows] == [0.0, 1.0, 0.0]
    assert [r["actor/lr"] for r in rows] == pytest.approx([0.0, 0.75e-3, 1.5e-3])  # step 3 at warmup 2/4


def test_sft_rejects_a_truncation_mode_it_lacks_before_loading_anything(tiny_world, tmp_path, monkeypatch):
    import mtprl.trainer.sft as sft

    monkeypatch.setattr(sft, "load_policy", lambda *a, **kw: pytest.fail("the model was loaded first"))
    with pytest.raises(ConfigError, match=r"data.truncation='middle'.*left, right or error"):
        run_sft(_cfg(tiny_world, tmp_path, "data.truncation=middle"))


def test_sft_logs_its_run_and_config_to_mlflow(tiny_world, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    run_sft(_cfg(tiny_world, tmp_path / "run", "trainer.total_training_steps=1", "trainer.test_freq=-1",
                 "trainer.logger=[jsonl,mlflow]", "trainer.project_name=warmup", "trainer.experiment_name=mtp1"))
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("warmup").experiment_id])
    assert run.info.run_name == "mtp1" and run.data.params["sft/micro_batch_size_per_gpu"] == "8"
    loss = _losses(tmp_path / "run")[0]["sft/lm_loss"]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "sft/lm_loss")] == [
        (1, pytest.approx(loss, rel=1e-6))]


def test_sft_resumed_after_a_lost_checkpoint_logs_each_step_once(tiny_world, tmp_path):
    import shutil

    out = tmp_path / "lost"
    run_sft(_cfg(tiny_world, out, "trainer.total_training_steps=3", "trainer.save_freq=2"))
    shutil.rmtree(out / "global_step_3")  # as if killed after logging step 3, before its checkpoint
    run_sft(_cfg(tiny_world, out, "trainer.total_training_steps=3", "trainer.save_freq=2"))
    assert [r["step"] for r in _losses(out)] == [1, 2, 3]  # step 3 once (the earlier run's row dropped)


def _assert_same_gradient(cfg, examples, groups):
    """The gradient summed over the micro-batches `groups` equals one forward over all `examples`."""
    from mtprl.trainer.policy import load_policy
    from mtprl.trainer.sft import batch_mtp_counts, sft_loss

    model = load_policy(cfg.actor_rollout_ref.model, torch.device("cpu"))
    kwargs = dict(pad_id=0, num_targets=sum(sum(e.loss_mask[1:]) for e in examples), train_trunk=True, train_mtp=True,
                  cfg=cfg, mtp_counts=batch_mtp_counts(model, examples, cfg))  # as run_sft calls it
    grads = []
    for split in ([list(range(len(examples)))], groups):
        model.zero_grad()
        for g in split:
            sft_loss(model, [examples[i] for i in g], **kwargs)[0].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-7, msg=n)


def test_sft_micro_batches_by_length_keep_the_gradient(tiny_world, tmp_path):
    from mtprl.trainer.policy import load_policy_tokenizer
    from mtprl.trainer.sft import _examples, length_sorted_micro_batches

    cfg = _cfg(tiny_world, tmp_path)
    examples = _examples(cfg, load_policy_tokenizer(cfg.actor_rollout_ref.model), cfg.data.train_files)[:10]
    groups = length_sorted_micro_batches(examples, 4)
    assert sorted(i for g in groups for i in g) == list(range(10)) and [len(g) for g in groups] == [4, 4, 2]
    flat = [len(examples[i].input_ids) for g in groups for i in g]
    assert flat == sorted(flat)
    _assert_same_gradient(cfg, examples, groups)


def test_sft_micro_batches_by_tokens_keep_the_gradient(tiny_world, tmp_path):
    """sft.use_dynamic_bsz: micro-batches within max_token_len_per_gpu padded tokens (rows x longest), every
    example once, and the same gradient as one forward over the whole batch."""
    from mtprl.trainer.policy import load_policy_tokenizer
    from mtprl.trainer.sft import _examples, sft_micro_batches

    cfg = _cfg(tiny_world, tmp_path, "sft.use_dynamic_bsz=True", "sft.max_token_len_per_gpu=160")
    examples = _examples(cfg, load_policy_tokenizer(cfg.actor_rollout_ref.model), cfg.data.train_files)[:10]
    lengths = [len(e.input_ids) for e in examples]
    groups = sft_micro_batches(examples, cfg, 8)
    assert sorted(i for g in groups for i in g) == list(range(10))
    assert all(len(g) * max(lengths[i] for i in g) <= 160 for g in groups)
    assert len(groups) < 10 and max(len(g) for g in groups) > 1  # short examples share a forward
    _assert_same_gradient(cfg, examples, groups)


def test_sft_token_budget_below_the_longest_example_is_refused(tiny_world, tmp_path):
    with pytest.raises(ConfigError, match="sft.max_token_len_per_gpu=100 is below the longest SFT example"):
        _cfg(tiny_world, tmp_path, "sft.use_dynamic_bsz=True", "sft.max_token_len_per_gpu=100")
    with pytest.raises(ConfigError, match="sft.max_token_len_per_gpu"):
        _cfg(tiny_world, tmp_path, "sft.max_token_len_per_gpu=0")
