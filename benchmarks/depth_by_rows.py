"""What each draft depth costs and emits by live rows, on a trained policy's RL batch - the bound on adaptive speculation.

    .venv/bin/python benchmarks/depth_by_rows.py RUN_DIR [--repeats 4]

RUN_DIR is an `mtprl demo --out RUN_DIR` folder: its final RL checkpoint and held-out prompts, with the tiny_cpu
preset's sampling, on the RL batch (gen_batch_size prompts x rollout.n samples at their natural lengths, so the
live rows fall from 128 as answers finish). Every call decodes with ONE mode throughout: plain, a fixed chain of
d = 1..K drafts, or adaptive; the modes take turns (the order reversed every other round), --repeats rounds
after an untimed one, and each mode's speed is the median over rounds of its ratio to plain in the same round
(a slow spell of the shared machine slows both sides of a ratio). Each decode step is
timed (the engine's `_decode_step`, wrapped here; an adaptive step's MTP catch-up included) and grouped by live
rows (powers of two, as AdaptiveDepth's buckets). Printed per bucket: plain ms per step and the share of plain
decoding's time spent there; r(d) = a depth-d step's time in plain steps; E(d) = tokens per row and step; E/r,
the speed-up depth d gives there. The "oracle" weights the best fixed depth of each bucket (or plain) by plain's
time shares: what a perfect depth choice could reach on this batch, next to adaptive's measured ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

import mtprl.rollout.engine as engine_mod

sys.path.insert(0, str(Path(__file__).parent))
from demo_policy import in_turn, median_ratios, rl_batch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--repeats", type=int, default=4)
    args = ap.parse_args()
    engine, params, batch, spec = rl_batch(args.run_dir)
    modes: dict[str, object] = {"plain": None}
    for d in range(1, spec.num_steps + 1):
        modes[f"d{d}"] = dataclasses.replace(spec, num_steps=d, num_draft_tokens=d + 1)
    modes["adaptive"] = dataclasses.replace(spec, adaptive=True)

    steps: list[tuple[int, float, float]] = []  # (live rows, seconds, tokens emitted) of every decode step
    decode_step = engine_mod.Engine._decode_step

    def timed_step(self, run) -> None:
        rows = run.live
        before = float(run.emitted) if run.spec is not None else run.tokens_emitted
        start = time.perf_counter()
        decode_step(self, run)
        seconds = time.perf_counter() - start
        steps.append((rows, seconds, (float(run.emitted) if run.spec is not None else run.tokens_emitted) - before))

    engine_mod.Engine._decode_step = timed_step
    per_bucket = {m: defaultdict(lambda: [0.0, 0.0, 0]) for m in modes}  # bucket -> [seconds, tokens, steps]
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for rep in range(-1, args.repeats):
        for label in in_turn(list(modes), rep):
            mode = modes[label]
            steps.clear()
            res = engine.generate_with_metrics(batch, params, speculative=mode,
                                               generator=torch.Generator().manual_seed(max(rep, 0)))
            if rep < 0:
                continue
            rates[label].append(res.metrics.num_generated_tokens / res.metrics.elapsed_s)
            for rows, seconds, tokens in steps:
                acc = per_bucket[label][rows.bit_length()]
                acc[0], acc[1], acc[2] = acc[0] + seconds, acc[1] + tokens, acc[2] + 1
    engine_mod.Engine._decode_step = decode_step

    ratio = median_ratios(rates)
    print(f"RL batch: {len(batch)} prompts x {params.n}; tokens/s vs plain (median of {args.repeats} rounds' ratios): "
          + ", ".join(f"{m} {r:.2f}x" for m, r in ratio.items()))
    depths = [m for m in modes if m.startswith("d")]
    print(f"{'rows':>8} {'plain ms':>8} {'share':>6} | " + " ".join(f"r({m[1:]})" for m in depths) + " | "
          + " ".join(f"E({m[1:]})" for m in depths) + " | " + " ".join(f"E/r({m[1:]})" for m in depths))
    plain = per_bucket["plain"]
    total = sum(v[0] for v in plain.values())
    oracle_time = 0.0
    for bucket in sorted(plain):
        seconds, tokens, count = plain[bucket]
        t0, rows = seconds / count, tokens / count  # plain: one token per live row and step
        r, e = [], []
        for m in depths:
            got = per_bucket[m].get(bucket)
            ok = got is not None and got[2] > 0
            r.append(got[0] / got[2] / t0 if ok else float("nan"))
            e.append(got[1] / got[2] / rows if ok else float("nan"))
        gains = [ei / ri for ei, ri in zip(e, r)]
        best = max([1.0] + [g for g in gains if g == g])
        oracle_time += seconds / best
        lo, hi = 1 << (bucket - 1), (1 << bucket) - 1
        print(f"{lo:>3}-{hi:<4} {t0 * 1e3:8.2f} {seconds / total:6.1%} | " + " ".join(f"{x:4.2f}" for x in r) + " | "
              + " ".join(f"{x:4.2f}" for x in e) + " | " + " ".join(f"{x:6.2f}" for x in gains))
    print(f"oracle (best fixed depth per row bucket, on plain's time shares): {total / oracle_time:.2f}x plain; "
          f"adaptive measured {ratio['adaptive']:.2f}x")


if __name__ == "__main__":
    main()
