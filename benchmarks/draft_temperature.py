"""Accepted length of a trained policy's 3-draft chain at several draft temperatures (speculative_draft_temperature).

    .venv/bin/python benchmarks/draft_temperature.py RUN_DIR [--taus none,0.8,0.6,0.4,0.2] [--seeds 1]

RUN_DIR is an `mtprl demo --out RUN_DIR` folder: its final RL checkpoint and held-out prompts are used, with the
tiny_cpu preset's sampling (temperature 1.0) on the RL batch (gen_batch_size prompts x rollout.n samples, natural
lengths). Every temperature is exact - only how often drafts are accepted changes - so the printed figure is the
mean accepted length (tokens per row per step, the bonus token included) and the per-depth acceptance rates.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from demo_policy import rl_batch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--taus", default="none,0.8,0.6,0.4,0.2", help="'none' = the sampling temperature")
    ap.add_argument("--seeds", type=int, default=1, help="generator seeds per temperature (figures averaged)")
    args = ap.parse_args()
    engine, params, ids, spec = rl_batch(args.run_dir)
    for text in args.taus.split(","):
        tau = None if text.strip().lower() == "none" else float(text)
        lengths, rates = [], []
        for seed in range(args.seeds):
            m = engine.generate_with_metrics(ids, params, speculative=dataclasses.replace(spec, draft_temperature=tau),
                                             generator=torch.Generator().manual_seed(seed)).metrics
            lengths.append(m.mean_accept_length)
            rates.append(m.accept_rate_per_depth)
        per_depth = [sum(r[j] for r in rates) / len(rates) for j in range(len(rates[0]))]
        print(f"draft temperature {'sampling' if tau is None else tau}: accepted length "
              f"{sum(lengths) / len(lengths):.3f}, acceptance per depth {[round(x, 3) for x in per_depth]}", flush=True)


if __name__ == "__main__":
    main()
