"""Where the seconds of one mtprl DAPO step go: phases, and the update's and the rollout's operators by kind.

    .venv/bin/python benchmarks/step_profile.py [--shape demo|25m] [--config off|on|adaptive] [--threads 1]
                                                [--work runs/bench_vs_trl] [--warmup 2] [set key=value ...]

The same checkpoints and settings as benchmarks/vs_trl.py (built there into --work). After --warmup steps, one
more step is timed by phase (timing_s/*), then its batch's update and one generation are run again under
torch.profiler and their operators summed by kind: matmul (mm / addmm / bmm / linear), attention (SDPA and
mtprl's decode kernel), elementwise and norms, indexing and copies (gather / index / cat / copy / KV writes),
optimizer, other. Extra key=value arguments are config overrides (e.g. actor_rollout_ref.actor.use_prefix_grouper=False).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

KINDS = (("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul")),
         ("attention", ("scaled_dot_product", "decode_attention", "flash_attention")),
         ("optimizer", ("Optimizer", "_foreach", "adamw")),
         ("index/copy", ("index", "gather", "scatter", "aten::cat", "copy_", "aten::clone", "aten::contiguous",
                         "embedding", "narrow", "aten::stack")),
         ("elementwise/norm", ("aten::mul", "aten::add", "aten::sub", "aten::div", "silu", "exp", "log", "softmax",
                               "aten::pow", "rsqrt", "mean", "aten::sum", "layer_norm", "where", "neg", "sqrt",
                               "clamp", "fill_", "addcmul", "masked", "aten::max", "aten::min", "topk", "sort",
                               "multinomial", "argmax", "cumsum", "rand", "exponential")))


def kind_of(name: str) -> str:
    for kind, keys in KINDS:
        if any(k in name for k in keys):
            return kind
    return "other"


def by_kind(prof) -> dict[str, float]:
    """Self CPU seconds per kind (leaf operators only: self time, so nothing is counted twice)."""
    out: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        out[kind_of(evt.key)] += evt.self_cpu_time_total / 1e6
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="demo", choices=("demo", "25m"))
    ap.add_argument("--config", default="off", choices=("off", "on", "adaptive", "on_train"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default="runs/bench_vs_trl")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rows", type=int, default=15, help="operators listed per profile")
    ap.add_argument("--by-shape", action="store_true", help="the update's operators by input shape too")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import torch
    from rich.console import Console
    from torch.profiler import profile

    sys.path.insert(0, str(Path(__file__).parent))
    from vs_trl import ours_overrides, prepare

    from mtprl.config import load_config
    from mtprl.trainer import loop
    from mtprl.trainer.samples import collect_step_samples
    from mtprl.trainer.setup import setup

    torch.set_num_threads(args.threads)
    paths = prepare(Path(args.work))
    overrides = ours_overrides(paths, args.shape, args.config) + [
        f"trainer.default_local_dir={Path(args.work) / 'ckpt' / 'profile'}"] + args.overrides
    run = setup(load_config(None, overrides), console=Console(quiet=True))
    captured = {}
    update = loop.actor_update

    def keep(model, optimizer, batch, cfg, generator, dp=None):
        captured["batch"] = batch
        return update(model, optimizer, batch, cfg, generator, dp)

    loop.actor_update = keep
    try:
        for _ in range(args.warmup):
            loop.rl_step(run)
        t0 = time.perf_counter()
        m = loop.rl_step(run)
        step = time.perf_counter() - t0
        phases = {k[len("timing_s/"):]: v for k, v in m.items() if k.startswith("timing_s/")}
        print(f"{args.shape} / {args.config}: step {step:.3f} s = " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items())
              + f", other {step - sum(phases.values()):.3f}; {m['response_length/mean']:.1f} response tokens a sample, "
              f"rollout {m['rollout/tokens_per_s']:.0f} tokens/s")
        batch = captured["batch"]
        with profile(record_shapes=args.by_shape) as prof:
            t0 = time.perf_counter()
            update(run.model, run.optimizer, batch, run.cfg, run.shuffle_gen)
            took = time.perf_counter() - t0
        kinds = by_kind(prof)
        print(f"update under the profiler {took:.3f} s: " + ", ".join(f"{k} {v:.3f}" for k, v in kinds.items()))
        print(prof.key_averages(group_by_input_shape=args.by_shape).table(sort_by="self_cpu_time_total",
                                                                          row_limit=args.rows))
        with profile() as prof:
            t0 = time.perf_counter()
            collect_step_samples(run.cfg, run.engine, run.reward, run.next_prompts, run.sample_gen, run.tokenizer,
                                 run.group_ids())
            took = time.perf_counter() - t0
        kinds = by_kind(prof)
        print(f"generation + reward under the profiler {took:.3f} s: " + ", ".join(f"{k} {v:.3f}" for k, v in kinds.items()))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    finally:
        loop.actor_update = update
        run.close()


if __name__ == "__main__":
    main()
