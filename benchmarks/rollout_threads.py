"""Rollout speed by torch intra-op thread count, on a trained policy: plain, fixed-depth and adaptive speculation.

    .venv/bin/python benchmarks/rollout_threads.py RUN_DIR [--threads 2,1] [--repeats 3]

RUN_DIR is an `mtprl demo --out RUN_DIR` folder (its final RL checkpoint and held-out prompts, the tiny_cpu
preset's sampling). Two shapes, as the demo's speed stage: the RL batch (gen_batch_size prompts x rollout.n
samples at their natural lengths) and batch 1 (8 prompts one at a time). Every (threads, mode) pair decodes the
same work in turn, the order reversed every other round, after one untimed round; one engine per thread count,
so adaptive speculation's cost measurements (kept across calls, as in an RL run) are of its own thread count.
Printed per shape: tokens/s of each pair (median over rounds) and its speed-up over plain decoding at the FIRST
thread count of --threads (the median over rounds of the ratio within a round), and speculation's speed-up over
plain at the same thread count - the demo's `rollout_speedup_*` at that setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from demo_policy import in_turn, median_ratios, rl_batch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--threads", default=f"{torch.get_num_threads()},1")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    counts = [int(x) for x in args.threads.split(",")]
    engine, params, batch, spec = rl_batch(args.run_dir)
    engines = {counts[0]: engine}
    for n in counts[1:]:  # each engine packs its own copy of the weights and keeps its own adaptive state
        if n not in engines:
            engines[n] = rl_batch(args.run_dir)[0]
    modes = {"plain": None, "fixed": spec, "adaptive": dataclasses.replace(spec, adaptive=True)}
    shapes = {"RL batch": (params, [batch]), "batch 1": (dataclasses.replace(params, n=1), [[x] for x in batch[:8]])}
    default = torch.get_num_threads()
    pairs = [(n, m) for n in counts for m in modes]
    labels = [f"{m}@{n}" for n, m in pairs]
    for shape, (shape_params, calls) in shapes.items():
        rates: dict[str, list[float]] = {label: [] for label in labels}
        for rep in range(-1, args.repeats):
            for label in in_turn(labels, rep):
                mode, n = label.split("@")
                torch.set_num_threads(int(n))
                gen = torch.Generator().manual_seed(max(rep, 0))
                tokens = seconds = 0.0
                for prompts in calls:
                    res = engines[int(n)].generate_with_metrics(prompts, shape_params, speculative=modes[mode],
                                                                generator=gen)
                    tokens, seconds = tokens + res.metrics.num_generated_tokens, seconds + res.metrics.elapsed_s
                if rep >= 0:
                    rates[label].append(tokens / seconds)
        torch.set_num_threads(default)
        base = median_ratios(rates, f"plain@{counts[0]}")
        print(f"{shape}: tokens/s (median of {args.repeats}) | vs plain at {counts[0]} threads | vs plain at the same "
              f"threads")
        for n in counts:
            same = median_ratios({m: rates[f"{m}@{n}"] for m in modes})
            for m in modes:
                label = f"{m}@{n}"
                print(f"  {n} thread(s) {m:9s} {statistics.median(rates[label]):8.0f} | {base[label]:5.2f}x | "
                      f"{same[m]:5.2f}x")


if __name__ == "__main__":
    main()
