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
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from mtprl.config import load_config
from mtprl.data import build_math_tokenizer, load_tokenizer, write_synthetic_math
from mtprl.metrics import progress_bar
from mtprl.metrics.report import read_metrics, write_report
from mtprl.model import ModelConfig
from mtprl.trainer.checkpoint import find_latest_checkpoint
from mtprl.trainer.policy import init_policy_checkpoint


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is; ``quick`` is the CI-sized variant."""

    num_train: int = 4000
    num_val: int = 128
    levels: tuple[int, ...] = (1, 1, 1, 2)  # TINY_MODEL_LEVELS: level 1 three times as often as level 2
    sft_prose_frac: float = 0.7  # SFT answers in two styles; only "Answer: n" is graded (see the README)
    sft_steps: int = 300
    sft_batch: int = 64
    rl_steps: int = 40
    hidden: int = 128
    layers: int = 4
    mtp_layers: int = 3


QUICK = DemoSize(num_train=256, num_val=16, sft_steps=6, sft_batch=16, rl_steps=2, hidden=64, layers=2, mtp_layers=2)
# A few SFT steps leave the quick model wrong on every prompt, so dynamic sampling would find no group
# with varied rewards: the quick run (a smoke test of every stage) generates one batch per step instead.
QUICK_RL_OVERRIDES = ("algorithm.filter_groups.enable=False", "data.train_batch_size=8", "data.gen_batch_size=8",
                      "actor_rollout_ref.actor.ppo_mini_batch_size=8", "actor_rollout_ref.rollout.n=4")


def policy_config(size: DemoSize, vocab_size: int) -> ModelConfig:
    return ModelConfig(model_type="mimo", vocab_size=vocab_size, hidden_size=size.hidden,
                       intermediate_size=3 * size.hidden, num_hidden_layers=size.layers, num_attention_heads=4,
                       num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256,
                       tie_word_embeddings=True, attention_bias=True, num_mtp_layers=size.mtp_layers)


def sft_overrides(out: Path, data, model_dir: Path, size: DemoSize) -> list[str]:
    return [f"data.train_files={data.sft_train}", f"data.val_files={data.sft_val}",
            f"data.train_batch_size={size.sft_batch}", f"actor_rollout_ref.actor.ppo_mini_batch_size={size.sft_batch}",
            f"actor_rollout_ref.model.path={model_dir}", "actor_rollout_ref.model.mtp.mtp_loss_scaling_factor=1.0",
            "actor_rollout_ref.actor.optim.lr=3e-3", "actor_rollout_ref.actor.optim.warmup_style=cosine",
            "actor_rollout_ref.actor.optim.lr_warmup_steps=20", "actor_rollout_ref.actor.optim.min_lr_ratio=0.1",
            f"trainer.total_training_steps={size.sft_steps}", f"trainer.test_freq={max(size.sft_steps // 4, 1)}",
            "trainer.save_freq=-1", "trainer.logger=[console,jsonl]", f"trainer.default_local_dir={out / 'sft'}",
            "trainer.experiment_name=demo_sft"]


def rl_overrides(out: Path, data, sft_dir: Path, size: DemoSize, name: str = "rl") -> list[str]:
    return [f"data.train_files={data.train}", f"data.val_files={data.val}", f"actor_rollout_ref.model.path={sft_dir}",
            f"trainer.total_training_steps={size.rl_steps}", f"trainer.default_local_dir={out / name}",
            f"trainer.experiment_name=demo_{name}"]


def measure_rollout_speed(cfg, console: Console) -> dict[str, float]:
    """Tokens/s of the final policy with the same seeds, median of 3: plain, speculative with the configured
    draft steps, and adaptive speculation (the engine picks the depth, 0 = plain, per step; its measurements
    carry over between calls on the engine); on the whole validation set with rollout.n samples per prompt
    (the RL shape: a wide batch), and one prompt at a time (batch 1, the latency shape)."""
    import torch

    from mtprl.data import build_prompt_dataset
    from mtprl.trainer.policy import load_policy, load_policy_tokenizer
    from mtprl.trainer.samples import sampling_params, speculative_config
    from mtprl.trainer.setup import build_engine

    model_cfg = cfg.actor_rollout_ref.model
    tok = load_policy_tokenizer(model_cfg)
    model = load_policy(model_cfg, torch.device("cpu"))
    prompts = build_prompt_dataset(cfg.data.val_files, tok, max_prompt_length=cfg.data.max_prompt_length).prompts
    engine = build_engine(cfg, model)
    wide = sampling_params(cfg, tok)
    narrow = dataclasses.replace(wide, n=1)
    ids = [p.prompt_ids for p in prompts]
    spec = speculative_config(cfg)
    modes = (("plain", None), ("speculative", spec), ("adaptive", dataclasses.replace(spec, adaptive=True)))
    out = {}
    bar = progress_bar(console)
    task = bar.add_task("rollout speed", total=6 * len(modes))
    bar.start()
    for shape, params, batches in (("batch", wide, [ids]), ("b1", narrow, [[x] for x in ids[:16]])):
        for label, mode in modes:
            rates = []
            for rep in range(3):
                gen = torch.Generator().manual_seed(rep)
                tokens = seconds = 0.0
                for prompts_ in batches:
                    m = engine.generate_with_metrics(prompts_, params, speculative=mode, generator=gen).metrics
                    tokens, seconds = tokens + m.num_generated_tokens, seconds + m.elapsed_s
                rates.append(tokens / seconds)
                bar.advance(task)
            out[f"rollout_tokens_per_s_{label}_{shape}"] = sorted(rates)[1]
        plain = out[f"rollout_tokens_per_s_plain_{shape}"]
        out[f"rollout_speedup_{shape}"] = out[f"rollout_tokens_per_s_speculative_{shape}"] / plain
        out[f"rollout_speedup_adaptive_{shape}"] = out[f"rollout_tokens_per_s_adaptive_{shape}"] / plain
        console.print(f"rollout tokens/s, {'RL batch' if shape == 'batch' else 'batch 1'} (median of 3): plain "
                      f"{plain:.0f}, speculative {out[f'rollout_tokens_per_s_speculative_{shape}']:.0f} "
                      f"({out[f'rollout_speedup_{shape}']:.2f}x), adaptive "
                      f"{out[f'rollout_tokens_per_s_adaptive_{shape}']:.0f} ({out[f'rollout_speedup_adaptive_{shape}']:.2f}x)")
    bar.stop()
    return out


def run_demo(out_dir: str | Path = "runs/demo", *, overrides: list[str] = (), quick: bool = False,
             ablation: bool = False, preset: str = "tiny_cpu", console: Console | None = None) -> dict:
    """Run every stage; returns the summary (also written to ``<out_dir>/rl/summary.json``).
    ``overrides`` (and ``preset``) apply to the RL stage."""
    from mtprl.trainer.loop import train
    from mtprl.trainer.sft import run_sft

    console = console or Console()
    size = QUICK if quick else DemoSize()
    out = Path(out_dir)
    t0 = time.perf_counter()
    console.rule("[bold]1/6 synthetic math data")
    data = write_synthetic_math(out / "data", num_train=size.num_train, num_val=size.num_val, seed=0, levels=size.levels,
                                sft_prose_frac=size.sft_prose_frac)
    console.rule("[bold]2/6 tokenizer")
    tok_dir = build_math_tokenizer(out / "tokenizer", vocab_size=384, num_problems=2000, seed=0)
    vocab = -(-len(load_tokenizer(tok_dir)) // 8) * 8  # rounded up to a multiple of 8
    console.rule("[bold]3/6 tiny MiMo-style policy")
    init_dir = init_policy_checkpoint(out / "init", policy_config(size, vocab), tok_dir, seed=0)
    console.rule("[bold]4/6 SFT warm-up (trunk + MTP layers)")
    sft_cfg = load_config("tiny_cpu", sft_overrides(out, data, init_dir, size))
    sft_dir = run_sft(sft_cfg, console=console)
    console.rule("[bold]5/6 DAPO with MTP training and speculative rollouts")
    overrides = (list(QUICK_RL_OVERRIDES) if quick else []) + list(overrides)
    rl_cfg = load_config(preset, rl_overrides(out, data, sft_dir, size) + overrides)
    train(rl_cfg, console=console)
    compare = None
    if ablation:
        console.rule("[bold]ablation: the same RL with the MTP layers frozen")
        frozen = load_config(preset, rl_overrides(out, data, sft_dir, size, "rl_frozen_mtp") + list(overrides)
                             + ["actor_rollout_ref.model.mtp.enable_train=False"])
        train(frozen, console=console)
        compare = {"MTP trained during RL": read_metrics(out / "rl" / "metrics.jsonl"),
                   "MTP frozen": read_metrics(out / "rl_frozen_mtp" / "metrics.jsonl")}
    console.rule("[bold]6/6 rollout speed and report")
    last = find_latest_checkpoint(rl_cfg.trainer.default_local_dir)  # the run may end before total_training_steps
    if last is None:
        raise FileNotFoundError(f"the RL stage left no checkpoint in {rl_cfg.trainer.default_local_dir}")
    final = last / "actor"
    speed_cfg = load_config(preset, rl_overrides(out, data, final, size) + list(overrides))
    extra = measure_rollout_speed(speed_cfg, console)
    extra["wall_seconds"] = time.perf_counter() - t0
    summary = write_report(out / "rl", extra, compare=compare)
    console.print(f"report: {out / 'rl' / 'report.md'}\nplots: {out / 'rl' / 'plots'}\nsummary: "
                  f"{out / 'rl' / 'summary.json'}\nTensorBoard: tensorboard --logdir {out / 'rl' / 'tensorboard'}")
    return summary
