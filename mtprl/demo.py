"""The main job on the embedded default (``mtprl demo`` / ``make demo``): from nothing to a DAPO+MTP
trained model with a report, offline, on a laptop CPU.

Stages: synthetic math data (verl schema) -> offline BPE tokenizer (HF format, chat template) ->
a random tiny MiMo-style policy (trunk + MTP layers) -> SFT warm-up of trunk and MTP layers ->
DAPO with MTP training, speculative rollouts, dynamic sampling, overlong shaping, validation and
checkpoints (preset ``tiny_cpu``) -> rollout speed with and without speculation on the final
model -> report (``report.md``, ``plots/``, ``summary.json``, TensorBoard logs).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Any
from pathlib import Path

from rich.console import Console

from mtprl.config import load_config
from mtprl.data import build_math_tokenizer, load_tokenizer, write_synthetic_math
from mtprl.data.synthetic import WORKED_LEVELS
from mtprl.metrics import progress_bar
from mtprl.metrics.report import read_metrics, write_report
from mtprl.model import ModelConfig
from mtprl.trainer.checkpoint import find_latest_checkpoint
from mtprl.trainer.policy import init_policy_checkpoint

# the demo's mix of worked levels (see DemoSize): column additions of 1 to 5 digits, 2 and 3 digits most often
DEMO_LEVELS = (5, 6, 6, 6, 7, 7, 7, 8, 9)
DEMO_INSTRUCTION = "Solve step by step."  # short prompts: the SFT data teaches the worked format and "Answer:"


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is; ``quick`` is the CI-sized variant.

    levels: worked levels of :mod:`mtprl.data.synthetic`, round-robin (repeats weight a level): column
    additions a+b of 1 to 5 digits, ~25 to ~125 tokens (one line per column).
    The policy is MiMo-shaped: a deep, narrow trunk and ONE MTP layer, which the rollout reuses for every
    draft step (recursive_steps trains it for that, in SFT and RL).
    """

    num_train: int = 8000
    num_val: int = 128
    levels: tuple[int, ...] = DEMO_LEVELS
    sft_prose_frac: float = 0.0  # every SFT answer in the graded "Answer: n" style
    # a careless SFT teacher: drops 40% of the carries of its worked sums (so ~1 in 4 of its 2-3 digit answers is
    # wrong); the SFT model slips as often when sampling, and DAPO, rewarded on the answer only, learns not to
    sft_slip_frac: float = 0.4
    sft_steps: int = 500
    sft_batch: int = 32
    sft_lr: float = 3e-3
    rl_steps: int = 40
    # 8 sequences per SFT forward, in order of length. Packing by tokens (sft.use_dynamic_bsz, 1536) made SFT
    # 0.89x as long, but its one demo run (same seed, other rounding) ended SFT at a higher validation loss
    # (0.128 vs 0.097) and RL gained 7.0 points instead of 13.5: not adopted on one run (docs/rollout.md,
    # "Tried and not kept")
    sft_micro_batch: int = 8
    hidden: int = 64
    layers: int = 16
    mtp_layers: int = 1
    recursive_steps: int = 3  # = speculative_num_steps of the RL preset


QUICK = DemoSize(num_train=256, num_val=16, sft_steps=6, sft_batch=16, rl_steps=2, hidden=64, layers=2)
# A few SFT steps leave the quick model wrong on every prompt, so dynamic sampling would find no group
# with varied rewards: the quick run (a smoke test of every stage) generates one batch per step instead.
QUICK_RL_OVERRIDES = ("algorithm.filter_groups.enable=False", "data.train_batch_size=8", "data.gen_batch_size=8",
                      "actor_rollout_ref.actor.ppo_mini_batch_size=8", "actor_rollout_ref.rollout.n=4",
                      "data.max_response_length=32", "actor_rollout_ref.rollout.val_kwargs.n=2",
                      "reward_model.reward_kwargs.overlong_buffer_cfg.len=8")


def policy_config(size: DemoSize, vocab_size: int) -> ModelConfig:
    return ModelConfig(model_type="mimo", vocab_size=vocab_size, hidden_size=size.hidden,
                       intermediate_size=3 * size.hidden, num_hidden_layers=size.layers, num_attention_heads=4,
                       num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=512,
                       tie_word_embeddings=True, attention_bias=True, num_mtp_layers=size.mtp_layers)


def sft_overrides(out: Path, data, model_dir: Path, size: DemoSize) -> list[str]:
    return [f"data.train_files={data.sft_train}", f"data.val_files={data.sft_val}",
            f"data.train_batch_size={size.sft_batch}", f"actor_rollout_ref.actor.ppo_mini_batch_size={size.sft_batch}",
            f"actor_rollout_ref.model.path={model_dir}", "actor_rollout_ref.model.mtp.mtp_loss_scaling_factor=1.0",
            f"actor_rollout_ref.model.mtp.recursive_steps={size.recursive_steps}",
            f"actor_rollout_ref.actor.optim.lr={size.sft_lr}", "actor_rollout_ref.actor.optim.warmup_style=cosine",
            "actor_rollout_ref.actor.optim.lr_warmup_steps=20", "actor_rollout_ref.actor.optim.min_lr_ratio=0.1",
            "actor_rollout_ref.actor.optim.betas=[0.9,0.95]", f"sft.micro_batch_size_per_gpu={size.sft_micro_batch}",
            f"trainer.total_training_steps={size.sft_steps}", f"trainer.test_freq={max(size.sft_steps // 4, 1)}",
            "trainer.save_freq=-1", "trainer.logger=[console,jsonl]", f"trainer.default_local_dir={out / 'sft'}",
            "trainer.experiment_name=demo_sft"]


def rl_overrides(out: Path, data, sft_dir: Path, size: DemoSize, name: str = "rl") -> list[str]:
    return [f"data.train_files={data.train}", f"data.val_files={data.val}", f"actor_rollout_ref.model.path={sft_dir}",
            f"trainer.total_training_steps={size.rl_steps}", f"trainer.default_local_dir={out / name}",
            f"trainer.experiment_name=demo_{name}"]


def measure_rollout_speed(cfg, console: Console) -> tuple[dict[str, float], list[int]]:
    """Tokens/s of the final policy on held-out prompts at the RL sampling settings, side by side: plain,
    speculative with the configured draft steps, and adaptive speculation (the engine picks the depth per
    step, 0 = plain; its measurements carry over between calls, as in an RL run). Two shapes: the RL batch
    (``data.gen_batch_size`` prompts x ``rollout.n`` samples, every sample to its natural length, so the batch
    thins out as the short answers finish) and batch 1 (8 prompts one at a time, one sample each). One untimed
    call per mode first (weights packed, adaptive exploration done), then 3 rounds of every mode in turn (the
    order reversed every other round); tokens/s are medians over rounds, speed-ups the median over rounds of each
    round's own ratio to plain (a slow spell of the machine then slows both sides of a ratio, not one mode's
    median). Returns the figures and the response lengths of the plain RL-batch samples."""
    import torch

    from mtprl.data import build_prompt_dataset
    from mtprl.rollout.build import build_engine
    from mtprl.trainer.policy import load_policy, load_policy_tokenizer
    from mtprl.trainer.samples import sampling_params, speculative_config

    model_cfg = cfg.actor_rollout_ref.model
    tok = load_policy_tokenizer(model_cfg)
    model = load_policy(model_cfg, torch.device("cpu"))
    prompts = build_prompt_dataset(cfg.data.val_files, tok, max_prompt_length=cfg.data.max_prompt_length).prompts
    engine = build_engine(cfg, model)
    wide = sampling_params(cfg, tok)
    ids = [p.prompt_ids for p in prompts]
    rl_batch = cfg.data.gen_batch_size or cfg.data.train_batch_size
    shapes = {"batch": (wide, [ids[:rl_batch]]), "b1": (dataclasses.replace(wide, n=1), [[x] for x in ids[:8]])}
    spec = speculative_config(cfg)
    # the preset's RL setting may be adaptive: "speculative" is always the fixed depth, "adaptive" the engine's pick
    modes = {"plain": None, "speculative": dataclasses.replace(spec, adaptive=False),
             "adaptive": dataclasses.replace(spec, adaptive=True)}
    rates: dict[tuple[str, str], list[float]] = {(s, m): [] for s in shapes for m in modes}
    accepts: dict[str, list[float]] = {s: [] for s in shapes}  # of the fixed-depth mode
    lengths: list[int] = []
    bar = progress_bar(console)
    task = bar.add_task("rollout speed", total=4 * len(shapes) * len(modes))
    bar.start()
    for rep in range(-1, 3):  # -1: the untimed warm-up round
        for shape, (params, batches) in shapes.items():
            for label in (list(modes) if rep % 2 == 0 else list(modes)[::-1]):
                mode = modes[label]
                gen = torch.Generator(device=engine.device).manual_seed(max(rep, 0))
                tokens = seconds = emitted = row_steps = 0.0
                for batch in batches:
                    res = engine.generate_with_metrics(batch, params, speculative=mode, generator=gen)
                    tokens, seconds = tokens + res.metrics.num_generated_tokens, seconds + res.metrics.elapsed_s
                    emitted += res.metrics.mean_accept_length * res.metrics.num_row_steps
                    row_steps += res.metrics.num_row_steps
                    if rep >= 0 and shape == "batch" and label == "plain":
                        lengths += [len(c.token_ids) for c in res.completions]
                if rep >= 0:
                    rates[shape, label].append(tokens / seconds)
                    if label == "speculative":
                        accepts[shape].append(emitted / max(row_steps, 1))
                bar.advance(task)
    bar.stop()
    out: dict[str, float] = {}
    for shape in shapes:
        for label in modes:
            out[f"rollout_tokens_per_s_{label}_{shape}"] = statistics.median(rates[shape, label])
        # tokens per row per decode step with every step drafting the configured depth (the MTP layer's quality,
        # which adaptive runs, mostly plain when speculation does not pay, do not show)
        out[f"accept_length_speculative_{shape}"] = statistics.median(accepts[shape])
        plain = out[f"rollout_tokens_per_s_plain_{shape}"]
        for label, key in (("speculative", "rollout_speedup"), ("adaptive", "rollout_speedup_adaptive")):
            out[f"{key}_{shape}"] = statistics.median(
                a / b for a, b in zip(rates[shape, label], rates[shape, "plain"]))
        what = f"RL batch ({rl_batch} prompts x {wide.n})" if shape == "batch" else "batch 1"
        console.print(f"rollout tokens/s, {what}, median of 3 (speed-ups: of the rounds' ratios): plain {plain:.0f}, "
                      f"speculative "
                      f"{out[f'rollout_tokens_per_s_speculative_{shape}']:.0f} ({out[f'rollout_speedup_{shape}']:.2f}x), "
                      f"adaptive {out[f'rollout_tokens_per_s_adaptive_{shape}']:.0f} "
                      f"({out[f'rollout_speedup_adaptive_{shape}']:.2f}x); accepted length with "
                      f"{spec.num_steps} draft steps {out[f'accept_length_speculative_{shape}']:.2f}")
    return out, lengths


def seed_gains(out: Path, names: list[str]) -> dict[str, Any]:
    """Validation accuracy (val_kwargs) before and after RL in each named run, the gains, their mean and
    (sample) standard deviation."""
    from mtprl.metrics.report import summarize

    runs = []
    for name in names:
        s = summarize(read_metrics(out / name / "metrics.jsonl"))
        if s["val_acc_before"] is None or s["val_acc_after"] is None:
            raise ValueError(f"{out / name}: no validation before and after RL to compare")
        runs.append({"run": name, "val_acc_before": s["val_acc_before"], "val_acc_after": s["val_acc_after"],
                     "gain": s["val_acc_after"] - s["val_acc_before"]})
    gains = [r["gain"] for r in runs]
    return {"seed_runs": runs, "seed_gain_mean": statistics.fmean(gains),
            "seed_gain_std": statistics.stdev(gains) if len(gains) > 1 else 0.0}


def run_demo(out_dir: str | Path = "runs/demo", *, overrides: list[str] = (), quick: bool = False,
             ablation: bool = False, seeds: int = 1, preset: str = "tiny_cpu",
             console: Console | None = None) -> dict:
    """Run every stage; returns the summary (also written to ``<out_dir>/rl/summary.json``).
    ``overrides`` (and ``preset``) apply to the RL stage. ``seeds`` > 1 repeats the RL stage from the same SFT
    checkpoint with trainer.seed and data.seed = 2..seeds (runs ``rl_seed<k>``) and reports the gain in
    validation accuracy of every run, with mean and standard deviation."""
    from mtprl.trainer.loop import train
    from mtprl.trainer.sft import run_sft

    console = console or Console()
    size = QUICK if quick else DemoSize()
    out = Path(out_dir)
    t0 = time.perf_counter()
    console.rule("[bold]1/6 synthetic math data")
    data = write_synthetic_math(out / "data", num_train=size.num_train, num_val=size.num_val, seed=0, levels=size.levels,
                                sft_prose_frac=size.sft_prose_frac, sft_slip_frac=size.sft_slip_frac,
                                instruction=DEMO_INSTRUCTION, disjoint=True)
    console.rule("[bold]2/6 tokenizer")
    tok_dir = build_math_tokenizer(out / "tokenizer", vocab_size=384, num_problems=2000, seed=0, levels=WORKED_LEVELS)
    vocab = -(-len(load_tokenizer(tok_dir)) // 8) * 8  # rounded up to a multiple of 8
    console.rule(f"[bold]3/6 tiny MiMo-shaped policy ({size.layers} trunk layers, {size.mtp_layers} MTP layer)")
    init_dir = init_policy_checkpoint(out / "init", policy_config(size, vocab), tok_dir, seed=0)
    console.rule("[bold]4/6 SFT warm-up (trunk + MTP layer, recursive draft depths)")
    sft_cfg = load_config("tiny_cpu", sft_overrides(out, data, init_dir, size))
    sft_dir = run_sft(sft_cfg, console=console)
    console.rule("[bold]5/6 DAPO with MTP training and adaptive speculative rollouts")
    overrides = (list(QUICK_RL_OVERRIDES) if quick else []) + list(overrides)
    rl_cfg = load_config(preset, rl_overrides(out, data, sft_dir, size) + overrides)
    train(rl_cfg, console=console)
    compare = None
    if ablation:
        console.rule("[bold]ablation: the same RL with the MTP layer frozen")
        frozen = load_config(preset, rl_overrides(out, data, sft_dir, size, "rl_frozen_mtp") + list(overrides)
                             + ["actor_rollout_ref.model.mtp.enable_train=False"])
        train(frozen, console=console)
        compare = {"MTP trained during RL": read_metrics(out / "rl" / "metrics.jsonl"),
                   "MTP frozen": read_metrics(out / "rl_frozen_mtp" / "metrics.jsonl")}
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    for k in range(2, seeds + 1):
        console.rule(f"[bold]the same RL with seed {k} (of {seeds})")
        again = load_config(preset, rl_overrides(out, data, sft_dir, size, f"rl_seed{k}") + overrides
                            + [f"trainer.seed={k}", f"data.seed={k}"])
        train(again, console=console)
    console.rule("[bold]6/6 rollout speed and report")
    last = find_latest_checkpoint(rl_cfg.trainer.default_local_dir)  # the run may end before total_training_steps
    if last is None:
        raise FileNotFoundError(f"the RL stage left no checkpoint in {rl_cfg.trainer.default_local_dir}")
    final = last / "actor"
    speed_cfg = load_config(preset, rl_overrides(out, data, final, size) + list(overrides))
    extra, lengths = measure_rollout_speed(speed_cfg, console)
    extra["num_mtp_layers"] = size.mtp_layers
    extra["num_trunk_layers"] = size.layers
    if seeds > 1:
        extra.update(seed_gains(out, ["rl"] + [f"rl_seed{k}" for k in range(2, seeds + 1)]))
        console.print("validation accuracy gain over seeds: " + ", ".join(
            f"{r['run']} {r['val_acc_before']:.1%} -> {r['val_acc_after']:.1%}" for r in extra["seed_runs"])
            + f"; mean {extra['seed_gain_mean']:+.1%} +- {extra['seed_gain_std']:.1%}")
    extra["wall_seconds"] = time.perf_counter() - t0
    summary = write_report(out / "rl", extra, compare=compare, lengths=lengths)
    console.print(f"report: {out / 'rl' / 'report.md'}\nplots: {out / 'rl' / 'plots'}\nsummary: "
                  f"{out / 'rl' / 'summary.json'}\nTensorBoard: tensorboard --logdir {out / 'rl' / 'tensorboard'}")
    return summary
