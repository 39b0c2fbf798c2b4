"""Validation: generate on the validation set with ``rollout.val_kwargs`` and score.

Metrics (verl's names): ``val-core/{data_source}/acc/mean@{n}``, ``val-aux/{data_source}/score/mean@{n}``,
``val/response_length/mean`` and the rollout metrics of the validation generation under ``val/``.
With ``trainer.val_greedy`` (ours) a second, greedy pass adds ``val-aux/{data_source}/acc/greedy@1``,
``val-aux/{data_source}/score/greedy@1`` and ``val/greedy/response_length/mean`` (skipped when
``val_kwargs`` is greedy already: the first pass is that one).
Validation draws from its own generator seeded from ``trainer.seed`` and leaves the engine's state as it found
it, so it never shifts the training samples (a resumed run validates and trains exactly like an uninterrupted
one).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch

from mtprl.config.schema import MtprlConfig
from mtprl.rollout.types import RolloutMetrics
from mtprl.trainer.samples import counter, generate_samples, sampling_params, score_samples, speculative_config


def _generate_and_score(cfg: MtprlConfig, engine, manager, val_prompts, tokenizer, params, generator, dist):
    """Samples of every validation prompt under ``params`` (gathered over ranks) and their rollout metrics.
    With data parallelism each rank generates every ``world_size``-th prompt on its own engine."""
    rank, world = (dist.rank, dist.world_size) if dist is not None and dist.distributed else (0, 1)
    spec = speculative_config(cfg)
    val_prompts = [val_prompts[i] for i in range(rank, len(val_prompts), world)]
    size = cfg.data.val_batch_size or len(val_prompts)
    samples, rollout = [], []
    gids = counter(0)
    for start in range(0, len(val_prompts), size):
        batch, r_metrics = generate_samples(engine, [val_prompts[i] for i in range(start, min(start + size, len(val_prompts)))],
                                            params, spec, generator, tokenizer, gids)
        score_samples(manager, batch)
        samples += batch
        rollout.append(r_metrics)
    merged = RolloutMetrics.merge(rollout) if rollout else None
    if world > 1:
        parts = dist.all_gather_object((samples, merged))
        samples = [s for part, _ in parts for s in part]
        merged = RolloutMetrics.merge_ranks([m for _, m in parts if m is not None])
    return samples, merged


def _by_source(samples) -> dict[str, list]:
    by_source: dict[str, list] = defaultdict(list)
    for s in samples:
        by_source[s.prompt.record.data_source].append(s)
    return dict(sorted(by_source.items()))


def validate(cfg: MtprlConfig, engine, manager, val_prompts, tokenizer, tracker, step: int,
             dist=None) -> dict[str, float]:
    """Validation metrics of ``val_prompts``. With data parallelism (``dist``) each rank generates every
    ``world_size``-th prompt on its own engine and the samples are gathered, so the metrics are those of
    the whole set."""
    params = sampling_params(cfg, tokenizer, validation=True)
    rank = dist.rank if dist is not None and dist.distributed else 0
    # drawn where the engine samples (a CPU generator on a GPU engine copies every draw to the device)
    generator = torch.Generator(device=engine.device).manual_seed(cfg.trainer.seed + 7919 + 1000003 * rank)
    # validation leaves the engine's state (adaptive speculation) as it found it: it starts from the training's
    # state at this step whatever was validated before, so a resumed run (which validates again at the step it
    # resumes from) validates and trains like the uninterrupted one
    before = engine.state_dict()
    try:
        return _validate(cfg, engine, manager, val_prompts, tokenizer, tracker, step, dist, params, generator)
    finally:
        engine.load_state_dict(before)


def _validate(cfg, engine, manager, val_prompts, tokenizer, tracker, step, dist, params, generator) -> dict[str, float]:
    samples, merged = _generate_and_score(cfg, engine, manager, val_prompts, tokenizer, params, generator, dist)
    n = params.n
    metrics = {}
    for source, group in _by_source(samples).items():
        metrics[f"val-core/{source}/acc/mean@{n}"] = sum(s.acc for s in group) / len(group)
        metrics[f"val-aux/{source}/score/mean@{n}"] = sum(s.score for s in group) / len(group)
    metrics["val/response_length/mean"] = sum(len(s.response_ids) for s in samples) / len(samples)
    metrics.update(merged.as_dict(prefix="val/rollout/"))  # counts summed over the batches (and ranks)
    if cfg.trainer.val_greedy and not params.greedy:
        greedy = dataclasses.replace(params, temperature=0.0, top_p=1.0, top_k=0, n=1)
        g_samples, _ = _generate_and_score(cfg, engine, manager, val_prompts, tokenizer, greedy, generator, dist)
        for source, group in _by_source(g_samples).items():
            metrics[f"val-aux/{source}/acc/greedy@1"] = sum(s.acc for s in group) / len(group)
            metrics[f"val-aux/{source}/score/greedy@1"] = sum(s.score for s in group) / len(group)
        metrics["val/greedy/response_length/mean"] = sum(len(s.response_ids) for s in g_samples) / len(g_samples)
    for s in samples[: cfg.trainer.log_val_generations]:
        prompt = s.prompt.record.messages[-1]["content"]
        tracker.log_text("val/generations", f"[prompt] {prompt!r} [response] {s.response_text!r} "
                         f"[ground truth] {s.prompt.record.ground_truth} [score] {s.score:g}", step)
    return metrics


def val_accuracy(metrics: dict[str, float]) -> float | None:
    """Mean of the ``val-core/*/acc/*`` entries (one number for reports), None when there are none."""
    accs = [v for k, v in metrics.items() if k.startswith("val-core/") and "/acc/" in k]
    return sum(accs) / len(accs) if accs else None
