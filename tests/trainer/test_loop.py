"""End to end: DAPO steps with MTP on a tiny random policy (speculative rollout, MTP loss, checkpoints, resume)."""

import json

import pytest
import torch

from mtprl.config import ConfigError, load_config
from mtprl.model import from_pretrained
from mtprl.trainer.loop import train

# A reward that varies within groups even for a random policy: +1 for an even response length.
PARITY_REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": 1.0 if len(solution_str) % 2 == 0 else -1.0, "acc": len(solution_str) % 2 == 0}
'''


def _cfg(world, out, *extra, reward_file=None):
    base = [
        f"data.train_files={world.data.train}", f"data.val_files={world.data.val}", "data.max_prompt_length=64",
        "data.max_response_length=12", "data.train_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.rollout.n=4", f"actor_rollout_ref.model.path={world.model}",
        "actor_rollout_ref.model.mtp.enable=True", "actor_rollout_ref.model.mtp.enable_train=True",
        "actor_rollout_ref.model.mtp.enable_rollout=True", "actor_rollout_ref.model.mtp.speculative_num_steps=2",
        "actor_rollout_ref.model.mtp.speculative_eagle_topk=1", "actor_rollout_ref.model.mtp.speculative_num_draft_tokens=3",
        "actor_rollout_ref.actor.optim.lr=1e-3", "reward_model.reward_manager=dapo", "reward_model.num_workers=0",
        "+reward_model.reward_kwargs.overlong_buffer_cfg.enable=True", "+reward_model.reward_kwargs.overlong_buffer_cfg.len=4",
        "trainer.logger=[jsonl]", f"trainer.default_local_dir={out}", "trainer.test_freq=2", "trainer.save_freq=1",
        "trainer.log_val_generations=2", "data.val_batch_size=8",
    ]
    if reward_file is not None:
        base += [f"custom_reward_function.path={reward_file}"]
    return load_config(None, base + list(extra))


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _comparable(row):
    return {k: v for k, v in row.items() if not k.startswith(("timing_s/", "perf/", "time")) and "tokens_per_s" not in k
            and "elapsed" not in k}


@pytest.fixture
def parity_reward(tmp_path):
    path = tmp_path / "parity_reward.py"
    path.write_text(PARITY_REWARD)
    return path


@pytest.mark.slow
def test_three_dapo_steps_with_mtp_then_resume_exactly(tiny_world, tmp_path, parity_reward):
    extra = ["trainer.total_training_steps=3", "algorithm.filter_groups.enable=True",
             "algorithm.filter_groups.max_num_gen_batches=10", "data.gen_batch_size=4"]
    full = tmp_path / "full"
    train(_cfg(tiny_world, full, *extra, reward_file=parity_reward))
    rows = _rows(full)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]  # validation before training, then 3 steps
    step = rows[1]
    for key in ("critic/score/mean", "actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "actor/entropy",
                "actor/grad_norm", "mtp_losses/mtp_1_loss", "mtp/acc_2", "rollout/spec_accept_length",
                "rollout/spec_accept_rate_1", "rollout/spec_accept_rate_2", "train/num_gen_batches",
                "response_length/mean", "timing_s/gen", "timing_s/update_actor", "perf/throughput"):
        assert key in step, key
    assert any(k.startswith("val-core/synthetic_arith/acc/mean@1") for k in rows[0])
    assert (full / "global_step_3" / "actor" / "config.json").is_file()
    assert (full / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert len((full / "generations.jsonl").read_text().splitlines()) >= 2
    # the MTP layers were trained
    before, after = from_pretrained(tiny_world.model).state_dict(), from_pretrained(full / "global_step_3" / "actor").state_dict()
    assert not torch.equal(before["mtp_layers.0.input_proj.weight"], after["mtp_layers.0.input_proj.weight"])

    # a run stopped after step 2, resumed (resume_mode=auto), gives the same step-3 metrics
    part = tmp_path / "part"
    train(_cfg(tiny_world, part, *extra[1:], "trainer.total_training_steps=2", reward_file=parity_reward))
    train(_cfg(tiny_world, part, *extra[1:], "trainer.total_training_steps=3", reward_file=parity_reward))
    resumed = _rows(part)
    assert [r["step"] for r in resumed] == [0, 1, 2, 2, 3]  # val_before_train validates the resumed run at step 2
    assert _comparable(resumed[-1]) == pytest.approx(_comparable(rows[-1]), rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_the_default_preset_twice_gives_the_same_run(tiny_world, tmp_path, parity_reward, monkeypatch):
    """The tiny_cpu preset (adaptive speculation, cold drafts, dynamic sampling, validation with greedy) run twice
    with one command: the same metrics at every step, validation included - the second time under a clock that
    jumps at random, so nothing the rollout chooses may depend on timings; and a run stopped and resumed gives
    the uninterrupted run's steps."""
    import random
    import time

    overrides = [f"data.train_files={tiny_world.data.train}", f"data.val_files={tiny_world.data.val}",
                 f"actor_rollout_ref.model.path={tiny_world.model}", f"custom_reward_function.path={parity_reward}",
                 "data.max_prompt_length=64", "data.max_response_length=24", "data.train_batch_size=4",
                 "data.gen_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=4", "actor_rollout_ref.rollout.n=4",
                 "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8", "actor_rollout_ref.actor.optim.lr=1e-3",
                 "reward_model.reward_kwargs.overlong_buffer_cfg.len=8",
                 "trainer.total_training_steps=3", "trainer.test_freq=2", "trainer.logger=[jsonl]",
                 "data.val_batch_size=8"]
    cfg = load_config("tiny_cpu", overrides + [f"trainer.default_local_dir={tmp_path / 'first'}"])
    assert cfg.actor_rollout_ref.model.mtp.adaptive and cfg.trainer.val_greedy
    train(cfg)
    jitter = random.Random(0)
    real = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: real() + jitter.random())
    train(load_config("tiny_cpu", overrides + [f"trainer.default_local_dir={tmp_path / 'second'}"]))
    first, second = _rows(tmp_path / "first"), _rows(tmp_path / "second")
    assert [r["step"] for r in first] == [r["step"] for r in second] == [0, 1, 2, 3]
    assert [_comparable(r) for r in second] == [_comparable(r) for r in first]
    depths = [r["rollout/mean_draft_depth"] for r in first[1:]]
    assert max(depths) > 0 and min(depths) < 3, depths  # the rule chose: not all plain, not all the deepest
    # stopped after step 1 and resumed: it validates again at step 1 (val_before_train), which must leave the
    # engine's adaptive state (restored from the checkpoint) as the uninterrupted run had it
    part = [f"trainer.default_local_dir={tmp_path / 'part'}"]
    train(load_config("tiny_cpu", overrides + part + ["trainer.total_training_steps=1"]))
    train(load_config("tiny_cpu", overrides + part))
    resumed = _rows(tmp_path / "part")
    assert [r["step"] for r in resumed] == [0, 1, 1, 2, 3]
    assert [_comparable(r) for r in resumed[3:]] == [_comparable(r) for r in first[2:]]


@pytest.mark.slow
def test_frozen_mtp_layers_never_change(tiny_world, tmp_path):
    out = tmp_path / "frozen"
    train(_cfg(tiny_world, out, "trainer.total_training_steps=1", "trainer.val_before_train=False",
               "actor_rollout_ref.model.mtp.enable_train=False", "actor_rollout_ref.actor.optim.weight_decay=0.5"))
    before, after = from_pretrained(tiny_world.model).state_dict(), from_pretrained(out / "global_step_1" / "actor").state_dict()
    for name in before:
        if name.startswith("mtp_layers."):
            assert torch.equal(before[name], after[name]), name
    assert not torch.equal(before["layers.0.mlp.up_proj.weight"], after["layers.0.mlp.up_proj.weight"])
    row = _rows(out)[-1]
    assert "mtp_losses/mtp_1_loss" not in row and "rollout/spec_accept_length" in row


def test_rollout_logprobs_match_recomputed_old_logprobs(tiny_world):
    from mtprl.trainer.samples import collect_step_samples, to_train_batch
    from mtprl.trainer.setup import setup
    from mtprl.trainer.update import compute_logprobs

    cfg = _cfg(tiny_world, tiny_world.root / "unused", "trainer.resume_mode=disable")
    run = setup(cfg)
    try:
        samples, _ = collect_step_samples(cfg, run.engine, run.reward, run.next_prompts, run.sample_gen, run.tokenizer,
                                          run.group_ids())
        batch = to_train_batch(samples, run.tokenizer.pad_token_id)
        recomputed = compute_logprobs(run.model, batch, cfg)
        mask = batch.response_mask.bool()
        torch.testing.assert_close(batch.rollout_logprobs[mask], recomputed[mask], rtol=0, atol=1e-4)
    finally:
        run.close()


def test_rollout_generators_are_made_on_the_engines_device(tiny_world, monkeypatch):
    """The training rollout's and the validation's generators are created on the engine's device (a CPU generator
    feeding a GPU engine copies every draw - [b, P, V] exponential noise for tree drafts - to the device)."""
    from mtprl.trainer.setup import setup
    from mtprl.trainer.validate import validate

    made = []
    real = torch.Generator
    # records the device each generator is asked for (None: not given, i.e. the CPU)
    monkeypatch.setattr(torch, "Generator", lambda device=None: made.append(device) or real(device=device or "cpu"))
    cfg = _cfg(tiny_world, tiny_world.root / "unused", "trainer.resume_mode=disable")
    run = setup(cfg)
    try:
        assert run.engine.device in made and run.sample_gen.device == run.engine.device
        made.clear()
        validate(cfg, run.engine, run.reward, run.val_prompts, run.tokenizer, run.tracker, 0)
        assert made == [run.engine.device]
    finally:
        run.close()


def test_free_cache_engine_releases_the_engine_on_one_process(tiny_world):
    """rollout.free_cache_engine on one process: the engine's KV cache and packed weights go during the update
    (it was honoured only with a separate multi-rank rollout copy), and the next generation rebuilds them."""
    from mtprl.trainer.samples import collect_step_samples
    from mtprl.trainer.setup import setup

    cfg = _cfg(tiny_world, tiny_world.root / "unused", "trainer.resume_mode=disable",
               "actor_rollout_ref.rollout.free_cache_engine=True")
    run = setup(cfg)
    try:
        def generate():
            return collect_step_samples(cfg, run.engine, run.reward, run.next_prompts, run.sample_gen, run.tokenizer,
                                        run.group_ids())[0]

        generate()
        assert run.engine._trunk_cache is not None and run.engine._stepper is not None
        run.release_rollout()
        assert run.engine._trunk_cache is None and run.engine._mtp_cache is None and run.engine._stepper is None
        assert len(generate()) == 16  # 4 prompts x n=4, with the cache and packed weights built again
    finally:
        run.close()


def test_malformed_data_stops_before_training(tiny_world, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pq.read_table(tiny_world.data.train).to_pylist()[:4]
    rows[2]["reward_model"] = {"style": "rule", "ground_truth": None}
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), bad)
    with pytest.raises(ValueError, match=r"bad.parquet.*row 2.*ground_truth"):
        train(_cfg(tiny_world, tmp_path / "out", f"data.train_files={bad}"))
    assert not (tmp_path / "out").exists()


def test_overlong_prompts_are_not_filtered_by_default(tiny_world, tmp_path):
    # verl: data.filter_overlong_prompts defaults to False; with truncation=error an overlong prompt stops the run
    with pytest.raises(ValueError, match=r"more than max_prompt_length=4.*data.filter_overlong_prompts=true"):
        train(_cfg(tiny_world, tmp_path / "out", "data.max_prompt_length=4"))
    assert not (tmp_path / "out").exists()


def test_missing_custom_reward_is_a_startup_error(tiny_world, tmp_path):
    with pytest.raises(ConfigError, match="nope.py"):
        train(_cfg(tiny_world, tmp_path / "out", reward_file=tmp_path / "nope.py"))


def test_consecutive_bad_steps_stop_with_the_last_checkpoint_intact(tiny_world, tmp_path, monkeypatch):
    import mtprl.trainer.loop as loop

    calls = []

    def nan_update(model, optimizer, batch, cfg, generator, dp=None):
        calls.append(1)
        if len(calls) == 1:  # the first step is healthy
            return {"actor/pg_loss": 0.0}, 0
        return {"actor/pg_loss": float("nan")}, 99  # every optimizer step skipped

    monkeypatch.setattr(loop, "actor_update", nan_update)
    out = tmp_path / "bad"
    cfg = _cfg(tiny_world, out, "trainer.total_training_steps=6", "trainer.val_before_train=False",
               "trainer.test_freq=-1", "actor_rollout_ref.actor.max_bad_steps=2")
    with pytest.raises(FloatingPointError, match=r"2 consecutive steps.*global_step_2"):
        train(cfg)
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert from_pretrained(out / "global_step_2" / "actor") is not None


def test_prometheus_endpoint_serves_rollout_metrics(tiny_world, tmp_path):
    import urllib.request

    from mtprl.trainer.setup import setup

    cfg = _cfg(tiny_world, tmp_path / "p", "actor_rollout_ref.rollout.prometheus.enable=True",
               "actor_rollout_ref.rollout.prometheus.port=0", "trainer.resume_mode=disable")
    run = setup(cfg)
    try:
        run.export({"rollout/spec_accept_length": 2.5, "actor/pg_loss": 1.0})
        body = urllib.request.urlopen(f"http://127.0.0.1:{run.exporter.port}/metrics", timeout=5).read().decode()
    finally:
        run.close()
    assert "mtprl_rollout_spec_accept_length 2.5" in body
    assert "pg_loss" not in body  # only rollout metrics are exported


def test_eval_command_validates_a_checkpoint(tiny_world, tmp_path, capsys):
    from mtprl.cli import main

    rc = main(["eval", f"data.val_files={tiny_world.data.val}", f"actor_rollout_ref.model.path={tiny_world.model}",
               "data.max_response_length=8", "trainer.logger=[jsonl]", f"trainer.default_local_dir={tmp_path}",
               "actor_rollout_ref.rollout.val_kwargs.n=2", "actor_rollout_ref.rollout.val_kwargs.do_sample=True",
               "actor_rollout_ref.rollout.val_kwargs.temperature=1.0"])
    assert rc == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0.0 <= metrics["val-core/synthetic_arith/acc/mean@2"] <= 1.0
    assert "16 prompt rows, 16 kept" in (tmp_path / "generations.jsonl").read_text()


def test_epochs_bound_the_run_when_dynamic_sampling_uses_extra_batches(tiny_world, tmp_path, parity_reward):
    # 64 prompts, gen batches of 16 -> 4 batches in one epoch; each step needs >= 1 batch, often 2
    out = tmp_path / "epochs"
    train(_cfg(tiny_world, out, "trainer.total_epochs=1", "algorithm.filter_groups.enable=True", "data.gen_batch_size=16",
               "data.train_batch_size=12", "actor_rollout_ref.actor.ppo_mini_batch_size=12",
               "actor_rollout_ref.rollout.n=2", "trainer.val_before_train=False", "trainer.test_freq=-1",
               "trainer.save_freq=-1", reward_file=parity_reward))
    rows = _rows(out)
    used = sum(r["train/num_gen_batches"] for r in rows)
    assert used <= 4 and len(rows) < 4  # never more batches than one epoch holds; fewer steps than batches
    assert (out / f"global_step_{rows[-1]['step']}" / "actor" / "config.json").is_file()


def test_actor_lr_is_the_lr_the_step_used(tiny_world, tmp_path, monkeypatch):
    # verl logs actor/lr before stepping the scheduler: the lr of this step's optimizer steps, not the next one's
    import mtprl.trainer.loop as loop

    used = []

    def record_update(model, optimizer, batch, cfg, generator, dp=None):
        used.append(optimizer.param_groups[0]["lr"])
        return {"actor/pg_loss": 0.0}, 0

    monkeypatch.setattr(loop, "actor_update", record_update)
    out = tmp_path / "lr"
    train(_cfg(tiny_world, out, "trainer.total_training_steps=3", "trainer.val_before_train=False",
               "trainer.test_freq=-1", "trainer.save_freq=-1", "actor_rollout_ref.actor.optim.lr_warmup_steps=4"))
    assert used == pytest.approx([0.0, 0.25e-3, 0.5e-3])  # verl's warmup: lr * step / warmup, 0 at the first step
    assert [r["actor/lr"] for r in _rows(out)] == pytest.approx(used)


def test_prometheus_server_is_closed_when_a_later_setup_step_fails(tiny_world, tmp_path, monkeypatch):
    import mtprl.trainer.setup as setup_mod

    exporters = []

    class Recording(setup_mod.PrometheusExporter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.closed = False
            exporters.append(self)

        def close(self):
            self.closed = True
            super().close()

    def broken_tracker(*args, **kwargs):
        raise OSError("cannot create the log directory")

    monkeypatch.setattr(setup_mod, "PrometheusExporter", Recording)
    monkeypatch.setattr(setup_mod, "Tracker", broken_tracker)
    cfg = _cfg(tiny_world, tmp_path / "p", "actor_rollout_ref.rollout.prometheus.enable=True",
               "actor_rollout_ref.rollout.prometheus.port=0", "trainer.resume_mode=disable")
    with pytest.raises(OSError, match="log directory"):
        setup_mod.setup(cfg)
    assert len(exporters) == 1 and exporters[0].closed


def test_run_close_closes_everything_even_when_one_close_fails(tiny_world, tmp_path):
    from mtprl.trainer.setup import setup

    cfg = _cfg(tiny_world, tmp_path / "c", "actor_rollout_ref.rollout.prometheus.enable=True",
               "actor_rollout_ref.rollout.prometheus.port=0", "trainer.resume_mode=disable")
    run = setup(cfg)
    closed = []
    real_reward_close, real_exporter_close, real_tracker_close = run.reward.close, run.exporter.close, run.tracker.close

    def failing_tracker_close():
        raise OSError("disk full")

    run.tracker.close = failing_tracker_close
    run.reward.close = lambda: (closed.append("reward"), real_reward_close())
    run.exporter.close = lambda: (closed.append("exporter"), real_exporter_close())
    with pytest.raises(OSError, match="disk full"):
        run.close()
    real_tracker_close()
    assert closed == ["reward", "exporter"]


def _fast_update(model, optimizer, batch, cfg, generator, dp=None):
    return {"actor/pg_loss": 0.0}, 0


def test_step_time_and_throughput_include_validation_and_checkpoint(tiny_world, tmp_path, monkeypatch):
    # verl's "step" timer wraps generation ... testing ... save_checkpoint; throughput = tokens / that time
    import time

    import mtprl.trainer.loop as loop

    real_validate, real_save = loop.validate, loop.save_run

    def slow_validate(*args, **kwargs):
        time.sleep(0.3)
        return real_validate(*args, **kwargs)

    def slow_save(*args, **kwargs):
        time.sleep(0.3)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(loop, "actor_update", _fast_update)
    monkeypatch.setattr(loop, "validate", slow_validate)
    monkeypatch.setattr(loop, "save_run", slow_save)
    out = tmp_path / "timing"
    train(_cfg(tiny_world, out, "trainer.total_training_steps=1", "trainer.val_before_train=False", "trainer.test_freq=1"))
    row = _rows(out)[-1]
    assert row["timing_s/testing"] >= 0.3 and row["timing_s/save_checkpoint"] >= 0.3
    assert row["timing_s/step"] >= row["timing_s/gen"] + row["timing_s/testing"] + row["timing_s/save_checkpoint"]
    assert row["perf/total_num_tokens"] > 0
    assert row["perf/throughput"] == pytest.approx(row["perf/total_num_tokens"] / row["timing_s/step"])


def test_validation_before_train_also_runs_on_resume(tiny_world, tmp_path, monkeypatch):
    # verl validates whenever val_before_train is set, a resumed run too, logged at the resumed global step
    import mtprl.trainer.loop as loop

    monkeypatch.setattr(loop, "actor_update", _fast_update)
    out = tmp_path / "resume_val"
    common = ["trainer.test_freq=-1", "data.val_batch_size=16"]
    train(_cfg(tiny_world, out, "trainer.total_training_steps=1", "trainer.val_before_train=False", *common))
    train(_cfg(tiny_world, out, "trainer.total_training_steps=2", *common))
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 1, 2]
    assert any(k.startswith("val-core/") for k in rows[1]) and "actor/pg_loss" not in rows[1]


def test_total_epochs_bound_the_run_when_total_training_steps_is_larger(tiny_world, tmp_path, monkeypatch):
    # 64 prompts, 16 per step -> one epoch is 4 steps; total_training_steps=6 is not reached
    import mtprl.trainer.loop as loop

    monkeypatch.setattr(loop, "actor_update", _fast_update)
    out = tmp_path / "epochs_first"
    train(_cfg(tiny_world, out, "trainer.total_epochs=1", "trainer.total_training_steps=6", "data.train_batch_size=16",
               "actor_rollout_ref.actor.ppo_mini_batch_size=16", "actor_rollout_ref.rollout.n=1",
               "trainer.val_before_train=False", "trainer.test_freq=-1", "trainer.save_freq=-1"))
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4]
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "4"


def test_epochs_bound_dynamic_sampling_with_total_training_steps_and_lr_schedule_keeps_its_length(tiny_world, tmp_path):
    from mtprl.trainer.setup import DataExhausted, setup

    cfg = _cfg(tiny_world, tmp_path / "s", "trainer.resume_mode=disable", "trainer.total_epochs=1",
               "trainer.total_training_steps=8", "algorithm.filter_groups.enable=True", "data.gen_batch_size=16",
               "actor_rollout_ref.actor.optim.warmup_style=cosine")
    run = setup(cfg)
    try:
        assert run.total_steps == 4  # min(total_training_steps, total_epochs x 4 batches)
        for _ in range(4):
            assert len(run.next_prompts()) == 16
        with pytest.raises(DataExhausted, match="total_epochs=1"):
            run.next_prompts()
        for _ in range(4):
            run.optimizer.step()
            run.scheduler.step()
        # verl: total_training_steps sets the schedule length: cosine at 4 / 8 -> half the lr
        assert run.scheduler.get_last_lr()[0] == pytest.approx(0.5e-3)
    finally:
        run.close()


def test_seq_final_reward_filter_includes_the_kl_in_reward_penalty(tiny_world, tmp_path, monkeypatch):
    # verl: seq_final_reward = Σ_t token_level_rewards, after the KL-in-reward penalty (computed per generation
    # batch before filtering). old logprobs 0, ref -0.5 -> k1 KL 0.5 per response token; β = 0.1
    import mtprl.trainer.loop as loop
    from mtprl.trainer.samples import Sample, Status, filter_metric_values
    from mtprl.trainer.setup import setup

    monkeypatch.setattr(loop, "compute_logprobs",
                        lambda model, batch, cfg, role="actor", dp=None: torch.zeros(batch.input_ids.shape) - 0.5 * (role == "ref"))
    cfg = _cfg(tiny_world, tmp_path / "k", "trainer.resume_mode=disable", "algorithm.use_kl_in_reward=True",
               "algorithm.kl_ctrl.kl_coef=0.1", "algorithm.filter_groups.enable=True",
               "algorithm.filter_groups.metric=seq_final_reward")
    run = setup(cfg)
    try:
        timing = {}
        values = loop.seq_final_rewards(run, timing)
        prompt = run.val_prompts[0]
        group = [Sample(group_id=0, prompt=prompt, response_ids=[5] * n, rollout_logprobs=[0.0] * n,
                        status=Status.TRUNCATED, score=1.0, raw_score=1.0) for n in (2, 6)]
        assert values(group) == pytest.approx([1.0 - 0.1 * 0.5 * 2, 1.0 - 0.1 * 0.5 * 6])
        assert filter_metric_values(group, "seq_reward", values) == [1.0, 1.0]  # the same shaped score: dropped
        assert filter_metric_values(group, "seq_final_reward", values) == pytest.approx([0.9, 0.7])  # kept
        assert "timing_s/ref" in timing and "timing_s/old_log_prob" in timing
    finally:
        run.close()


def test_mtp_lr_trains_the_mtp_layers_at_their_own_rate_and_resume_keeps_the_grouping(tiny_world, tmp_path):
    out = tmp_path / "mtp_lr"
    args = ["trainer.val_before_train=False", "trainer.test_freq=-1", "actor_rollout_ref.actor.optim.lr=1e-6",
            "actor_rollout_ref.actor.optim.lr_warmup_steps=0", "actor_rollout_ref.model.mtp.lr=1e-3"]
    train(_cfg(tiny_world, out, "trainer.total_training_steps=1", *args))
    row = _rows(out)[-1]
    assert row["actor/lr"] == pytest.approx(1e-6) and row["actor/mtp_lr"] == pytest.approx(1e-3)
    before, after = from_pretrained(tiny_world.model).state_dict(), from_pretrained(out / "global_step_1" / "actor").state_dict()
    moved = {n: float((after[n] - before[n]).abs().max()) for n in before}
    # Adam moves a parameter by at most ~lr per optimizer step (2 mini-batches here)
    assert 1e-4 < moved["mtp_layers.0.input_proj.weight"] <= 2.1e-3
    assert moved["layers.0.mlp.up_proj.weight"] <= 2.1e-6
    with pytest.raises(ValueError, match="2 parameter groups|4 parameter groups"):  # resumed without the key
        train(_cfg(tiny_world, out, "trainer.total_training_steps=2", *args[:-1]))
