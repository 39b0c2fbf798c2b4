"""AdaptiveDepth as of a git revision against the working tree's, on a demo run's RL batch, side by side.

    .venv/bin/python benchmarks/adaptive_ab.py RUN_DIR --rev REV [--rounds 40] [--every 10]

RUN_DIR is an `mtprl demo --out RUN_DIR` folder (its final RL checkpoint and held-out prompts, the tiny_cpu
preset's sampling: benchmarks/demo_policy.py). Modes, each decoding the whole RL batch in one call: plain, fixed
depth 2, adaptive with the class of mtprl/rollout/speculative.py at REV ("old"), and adaptive with the current
class ("new"). Each adaptive mode keeps its own state across calls, as an RL run does. The modes take turns (the
order reversed every other round), one untimed round first; printed every --every rounds: each mode's median
over rounds of its tokens/s ratio to plain in the same round (a slow spell of the shared machine slows both
sides of a ratio). REV must hold an AdaptiveDepth with the same constructor and choose/observe methods.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from demo_policy import in_turn, median_ratios, rl_batch  # noqa: E402

import mtprl.rollout.engine as engine_mod  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def class_at(rev: str):
    """AdaptiveDepth from mtprl/rollout/speculative.py at git revision `rev`, loaded as its own module."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:mtprl/rollout/speculative.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "speculative_at_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("speculative_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up while the class is built)
    spec.loader.exec_module(module)
    return module.AdaptiveDepth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--rev", required=True, help="git revision whose AdaptiveDepth is the 'old' mode")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--every", type=int, default=10, help="print the medians every this many rounds")
    args = ap.parse_args()
    engine, params, prompts, spec = rl_batch(args.run_dir)
    classes = {"old": class_at(args.rev), "new": engine_mod.AdaptiveDepth}
    adaptive = dataclasses.replace(spec, adaptive=True)
    modes = {"plain": None, "d2": dataclasses.replace(spec, num_steps=2, num_draft_tokens=3), "old": adaptive,
             "new": adaptive}
    states: dict[str, dict] = {"old": {}, "new": {}}
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for rnd in range(-1, args.rounds):  # -1: untimed (weights packed, adaptive exploration done)
        for label in in_turn(list(modes), rnd):
            if label in classes:  # the engine builds its AdaptiveDepth from this name; each mode keeps its own
                engine_mod.AdaptiveDepth, engine._adaptive = classes[label], states[label]
            res = engine.generate_with_metrics(prompts, params, speculative=modes[label],
                                               generator=torch.Generator().manual_seed(max(rnd, 0)))
            if rnd >= 0:
                rates[label].append(res.metrics.num_generated_tokens / res.metrics.elapsed_s)
        if rnd >= 0 and (rnd + 1) % args.every == 0:
            print(f"after {rnd + 1} rounds, tokens/s vs plain (medians of per-round ratios): " + ", ".join(
                f"{m} {r:.3f}x" for m, r in median_ratios(rates).items()), flush=True)
    engine_mod.AdaptiveDepth = classes["new"]


if __name__ == "__main__":
    main()
