"""The final policy of an `mtprl demo --out RUN_DIR` folder on its RL batch, for the benchmarks that measure it
(draft_temperature.py, depth_by_rows.py, adaptive_ab.py): the tiny_cpu preset with the run's data, its last RL
checkpoint; and how those benchmarks interleave their modes."""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

import torch

from mtprl.config import load_config
from mtprl.data import build_prompt_dataset
from mtprl.rollout import Engine, SamplingParams, SpeculativeConfig
from mtprl.trainer.checkpoint import find_latest_checkpoint
from mtprl.trainer.policy import load_policy, load_policy_tokenizer
from mtprl.trainer.samples import sampling_params, speculative_config
from mtprl.trainer.setup import build_engine


def rl_batch(run_dir: Path) -> tuple[Engine, SamplingParams, list[list[int]], SpeculativeConfig]:
    """(engine, the preset's sampling, the RL batch's prompt ids - the first gen_batch_size held-out prompts, each
    sampled rollout.n times -, the preset's speculation at its fixed depth)."""
    last = find_latest_checkpoint(run_dir / "rl")
    if last is None:
        raise SystemExit(f"{run_dir / 'rl'} holds no RL checkpoint: run `mtprl demo --out {run_dir}` first")
    data = run_dir / "data"
    cfg = load_config("tiny_cpu", [f"data.train_files={data / 'train.parquet'}", f"data.val_files={data / 'val.parquet'}",
                                   f"actor_rollout_ref.model.path={last / 'actor'}"])
    tok = load_policy_tokenizer(cfg.actor_rollout_ref.model)
    engine = build_engine(cfg, load_policy(cfg.actor_rollout_ref.model, torch.device("cpu")))
    prompts = build_prompt_dataset(cfg.data.val_files, tok, max_prompt_length=cfg.data.max_prompt_length).prompts
    ids = [p.prompt_ids for p in prompts][:cfg.data.gen_batch_size or cfg.data.train_batch_size]
    return engine, sampling_params(cfg, tok), ids, dataclasses.replace(speculative_config(cfg), adaptive=False)


def in_turn(labels: list[str], round_index: int) -> list[str]:
    """The order of the modes in one round: as given, reversed every other round (neither side of a ratio always
    runs first)."""
    return list(labels) if round_index % 2 == 0 else list(labels)[::-1]


def median_ratios(rates: dict[str, list[float]], base: str = "plain") -> dict[str, float]:
    """Each mode's median over rounds of its rate divided by `base`'s rate in the same round (a slow spell of the
    shared machine slows both sides of a ratio, not one mode's median)."""
    return {m: statistics.median(a / b for a, b in zip(v, rates[base])) for m, v in rates.items()}
