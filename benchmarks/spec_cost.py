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
The first call per shape and mode is an untimed warm-up. --threads 0 keeps torch's default (the demo's). Under
each row, the r that adaptive speculation's cost model (mtprl.rollout.adaptive.StepCost) predicts for the same
shape, rows and mean length: how far its depth choices' premise is from this machine.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from mtprl.model import CausalLM, ModelConfig
from mtprl.rollout import Engine, SamplingParams, SpeculativeConfig
from mtprl.rollout.adaptive import StepCost
from mtprl.rollout.tree import build_tree


def step_ms(engine: Engine, rows: int, new_tokens: int, spec: SpeculativeConfig | None, seed: int) -> float:
    params = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, n=rows)
    out = engine.generate_with_metrics([list(range(3, 35))], params, speculative=spec,
                                       generator=torch.Generator().manual_seed(seed))
    return 1000 * out.metrics.elapsed_s / out.metrics.num_decode_steps


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
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = SpeculativeConfig(num_steps=args.steps)
    e, cap_tokens = args.tokens_per_step, args.steps + 1
    print(f"torch threads {torch.get_num_threads()}; chain of {args.steps} drafts; E = {e} tokens per step")
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
            cost = StepCost(cfg, build_tree(args.steps, 1, args.steps + 1), torch.float32, "cpu")
            context = 32 + args.new_tokens / 2  # the rows' mean length over a call
            for rows in (int(x) for x in args.rows.split(",")):
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
                predicted = cost.speculative(args.steps, rows, context) / cost.plain(rows, context)
                print(f"{'':>20} StepCost predicts r = {predicted:.2f}", flush=True)


if __name__ == "__main__":
    main()
