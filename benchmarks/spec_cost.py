"""What a speculative decode step costs next to a plain one, by model shape and live rows - the bound on speculation.

    .venv/bin/python benchmarks/spec_cost.py [--layers 8,16,24,36] [--hidden 64] [--rows 1,16,128] [--steps 3]
                                             [--repeats 5] [--threads 0] [--tokens-per-step 2.55]

A speculative step with K chain drafts emits E tokens per row (1 <= E <= K+1) and costs r plain steps, so it runs
E / r as fast as plain decoding. r does not depend on the weights (the chain's shapes are fixed: K MTP forwards,
one K+1-token verification, the acceptance, the MTP commit), so a random MiMo-shaped model (trunk + 1 MTP layer,
reused for every draft) measures it exactly; E is the trained model's (`mtprl demo` prints it: 2.55 on its
final policy). Printed per shape and row count: ms per plain step and per speculative step (medians over
--repeats interleaved calls of --new-tokens tokens per row, each call's wall time over its decode steps,
prefill included), r, the cap (K+1) / r that perfect acceptance would give, and E / r at --tokens-per-step.
The first call per shape and mode is an untimed warm-up. --threads 0 keeps torch's default (the demo's).

--ops counts instead of timing: operator calls per plain step and per speculative step (aten ops as dispatched,
plus the CPU kernels' decode_attention / small_mm calls), the speculative step split into drafting, verification
with acceptance, the MTP commit and the rest (emitting, bookkeeping). Where a step costs per op (a narrow model on
a CPU) the op ratio is r without the machine's noise: a floor under the timed r, since a 4-token op costs more
than a 1-token one.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mtprl.rollout.engine as engine_mod
from mtprl.model import CausalLM, ModelConfig, cpu_attention
from mtprl.rollout import Engine, SamplingParams, SpeculativeConfig


def step_ms(engine: Engine, rows: int, new_tokens: int, spec: SpeculativeConfig | None, seed: int) -> float:
    params = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, n=rows)
    out = engine.generate_with_metrics([list(range(3, 35))], params, speculative=spec,
                                       generator=torch.Generator().manual_seed(seed))
    return 1000 * out.metrics.elapsed_s / out.metrics.num_decode_steps


class _OpCount(TorchDispatchMode):
    """Counts the aten operators dispatched while active (views and in-place ops included)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


SPEC_PHASES = ("draft_tree", "verify_and_accept", "commit_mtp")  # engine-module names of a speculative step's parts


def op_counts(engine: Engine, rows: int, new_tokens: int, spec: SpeculativeConfig | None) -> dict[str, float]:
    """Operator calls per decode step of one call (plain: "step"; speculative: "step" and each SPEC_PHASES part),
    counted through the engine's step methods and speculative.py's functions as engine.py calls them."""
    totals: dict[str, int] = defaultdict(int)
    steps = [0]
    stack: list[_OpCount] = []

    def counted(name, fn, is_step=False):
        def wrapper(*args, **kwargs):
            mode = _OpCount()
            stack.append(mode)
            try:
                with mode:
                    return fn(*args, **kwargs)
            finally:
                stack.pop()
                totals[name] += mode.count  # (an outer mode sees the inner one's ops too: modes nest)
                steps[0] += is_step

        return wrapper

    def kernel_call(fn):
        def wrapper(*args, **kwargs):
            for mode in stack:  # a C++ extension call: no mode sees it dispatched
                mode.count += 1
            return fn(*args, **kwargs)

        return wrapper

    saved = {name: getattr(engine_mod, name) for name in SPEC_PHASES}
    saved_steps = engine_mod.Engine._plain_step, engine_mod.Engine._spec_step
    saved_kernels = cpu_attention.decode_attention, cpu_attention.small_mm
    try:
        for name in SPEC_PHASES:
            setattr(engine_mod, name, counted(name, saved[name]))
        engine_mod.Engine._plain_step = counted("step", saved_steps[0], True)
        engine_mod.Engine._spec_step = counted("step", saved_steps[1], True)
        cpu_attention.decode_attention = kernel_call(saved_kernels[0])
        cpu_attention.small_mm = kernel_call(saved_kernels[1])
        params = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, n=rows)
        engine.generate_with_metrics([list(range(3, 35))], params, speculative=spec,
                                     generator=torch.Generator().manual_seed(0))
    finally:
        for name, fn in saved.items():
            setattr(engine_mod, name, fn)
        engine_mod.Engine._plain_step, engine_mod.Engine._spec_step = saved_steps
        cpu_attention.decode_attention, cpu_attention.small_mm = saved_kernels
    return {name: count / max(steps[0], 1) for name, count in totals.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="8,16,24,36")
    ap.add_argument("--hidden", default="64")
    ap.add_argument("--rows", default="1,16,128")
    ap.add_argument("--steps", type=int, default=3, help="chain drafts K (the demo: 3)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--tokens-per-step", type=float, default=2.55, help="E: the trained model's accepted length")
    ap.add_argument("--ops", action="store_true", help="count operator calls per step instead of timing")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = SpeculativeConfig(num_steps=args.steps)
    e, cap_tokens = args.tokens_per_step, args.steps + 1
    print(f"torch threads {torch.get_num_threads()}; chain of {args.steps} drafts; E = {e} tokens per step")
    if args.ops:
        print(f"{'hidden':>6} {'layers':>6} {'rows':>5} | {'plain ops':>9} {'spec ops':>8} = {'draft':>5} + "
              f"{'verify':>6} + {'commit':>6} + {'rest':>4} | {'r ops':>5} | {'cap (K+1)/r':>11} | {'E/r':>5}")
    else:
        print(f"{'hidden':>6} {'layers':>6} {'rows':>5} | {'plain ms':>8} {'spec ms':>8} | {'r':>5} | "
              f"{'cap (K+1)/r':>11} | {'E/r':>5}")
    for hidden in (int(x) for x in args.hidden.split(",")):
        for layers in (int(x) for x in args.layers.split(",")):
            torch.manual_seed(0)
            cfg = ModelConfig(model_type="mimo", vocab_size=384, hidden_size=hidden, intermediate_size=3 * hidden,
                              num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=512, tie_word_embeddings=True, attention_bias=True,
                              num_mtp_layers=1)
            engine = Engine(CausalLM(cfg).eval(), max_num_seqs=max(int(x) for x in args.rows.split(",")),
                            max_seq_len=160)
            for rows in (int(x) for x in args.rows.split(",")):
                if args.ops:
                    for mode in (None, spec):  # warm-up: packing, cache allocation, the kernel's first load
                        step_ms(engine, rows, 8, mode, 0)
                    plain = op_counts(engine, rows, args.new_tokens, None)
                    specd = op_counts(engine, rows, args.new_tokens, spec)
                    parts = [specd.get(name, 0.0) for name in SPEC_PHASES]
                    r = specd["step"] / plain["step"]
                    print(f"{hidden:>6} {layers:>6} {rows:>5} | {plain['step']:9.0f} {specd['step']:8.0f} = "
                          f"{parts[0]:5.0f} + {parts[1]:6.0f} + {parts[2]:6.0f} + {specd['step'] - sum(parts):4.0f} | "
                          f"{r:5.2f} | {cap_tokens / r:10.2f}x | {e / r:4.2f}x", flush=True)
                    continue
                times: dict[str, list[float]] = {"plain": [], "spec": []}
                for rep in range(-1, args.repeats):  # -1: untimed warm-up (packing, cache allocation)
                    for label, mode in (("plain", None), ("spec", spec)):
                        ms = step_ms(engine, rows, args.new_tokens, mode, max(rep, 0))
                        if rep >= 0:
                            times[label].append(ms)
                plain, specd = statistics.median(times["plain"]), statistics.median(times["spec"])
                r = specd / plain
                print(f"{hidden:>6} {layers:>6} {rows:>5} | {plain:8.2f} {specd:8.2f} | {r:5.2f} | "
                      f"{cap_tokens / r:10.2f}x | {e / r:4.2f}x", flush=True)


if __name__ == "__main__":
    main()
