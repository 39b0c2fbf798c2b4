"""Peak memory of one DAPO update at Qwen2.5-0.5B's shapes on CPU, against an analytic estimate; and the time of
the demo-shaped update.

    .venv/bin/python benchmarks/memory_real_shapes.py [--layers 24] [--samples 4,12] [--prompt 22] [--response 256]
                                                      [--dtype bfloat16|float32] [--no-checkpointing] [--threads 2]
                                                      [--json]
    .venv/bin/python benchmarks/memory_real_shapes.py --shape demo [--rounds 5] [--before DIR]

Run it from outside the repository root (e.g. `cd /tmp`) with PYTHONPATH=DIR to measure another checkout's mtprl
(the "before" numbers of docs/performance.md: `git archive <rev> mtprl | tar -x -C DIR`).

A random policy with Qwen2.5-0.5B's shapes (hidden 896, 14 / 2 heads, SwiGLU 4864, vocabulary 151,936, tied
embeddings, qkv bias; `--layers` trunk layers, 24 in the real model) plus one MTP layer, fp32 master weights,
gradient checkpointing on, AdamW. Each `--samples` count runs in a fresh process: `samples` rows of `prompt`
prompt + `response` response tokens (2 samples per prompt, on-policy) as ONE micro-batch of one DAPO update
(policy loss + MTP loss), with the update's compute under `--dtype` (bf16 autocast by default). The rollout is
synthetic (random token ids and advantages): generating 256-token responses with a 0.5B model on 2 cores would
take minutes and says nothing about the update's memory.

Measured, from /proc/self/status (VmHWM, the kernel's peak RSS, reset through /proc/self/clear_refs):
  base     RSS once the model and AdamW's state exist (the state allocated by a zero-lr step, as after step 1);
  fwd+bwd  peak RSS from then until the optimizer step (forward and backward of the micro-batch);
  step     peak RSS of the optimizer step.
The estimate of the fwd+bwd peak (docs/performance.md, "Memory at real shapes") is

  runtime + 16 P + 2 P + tokens * (4 H (L + D + 8) + 2 * 3 * (q + kv + I)) + 4 * 4 * chunk * V

with P parameters, L trunk layers, D MTP layers, H hidden, I intermediate, q / kv the query / key-value widths,
and chunk = mtprl.model.head.chunk_rows(V) (the head's chunked rows): fp32 weights, gradients and AdamW's two
moments (16 P); the bf16 copies autocast makes of every weight during the forward (2 P; 0 in fp32); per token
the checkpointed blocks' fp32 inputs plus a few more hidden-wide tensors, and one recomputed block's bf16
activations with their gradients; and four fp32 [chunk, V] buffers of the chunked head. Printed: each size's
numbers, the estimate, and the growth per token between the sizes, in KiB and in fp32 vocabulary rows (4 V
bytes = 594 KiB).

--shape demo times the update of benchmarks/vs_trl.py's demo shape instead (hidden 128, 4 layers, 3 MTP layers,
vocabulary 384, tied; random weights): 8 prompts x 8 samples of 30 + 10..48 tokens, micro-batches of 32, the MTP
loss on, fp32 as the demo runs; the median seconds of `--repeat` updates after one warm-up. With --before DIR, each
round runs this checkout's mtprl and DIR's in turn (order reversed every other round) and prints the median of
the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

DEMO = dict(model_type="mimo", vocab_size=384, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
            max_position_embeddings=256, tie_word_embeddings=True, attention_bias=True, num_mtp_layers=3)
QWEN05 = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
              num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True, rms_norm_eps=1e-6,
              rope_theta=1000000.0, max_position_embeddings=32768)


def _status(key: str) -> int:
    """/proc/self/status's `key` (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": the peak RSS becomes the current RSS
        f.write("5")


def chunk_rows_or_none(vocab: int) -> int | None:
    """The head's rows per chunk at this vocabulary; None before the chunked head existed (the full logits)."""
    try:
        from mtprl.model.head import chunk_rows
    except ImportError:
        return None
    return chunk_rows(vocab)


def estimate(num_params: int, layers: int, mtp_layers: int, tokens: int, runtime: int, bf16: bool,
             chunk: int | None, vocab: int = QWEN05["vocab_size"]) -> dict[str, int]:
    """The parts of the fwd+bwd peak estimate (module docstring), in bytes."""
    h, i = QWEN05["hidden_size"], QWEN05["intermediate_size"]
    head_dim = h // QWEN05["num_attention_heads"]
    q, kv = h, 2 * QWEN05["num_key_value_heads"] * head_dim
    act_bytes = 2 if bf16 else 4
    rows = tokens if chunk is None else min(chunk, tokens)  # before: the whole micro-batch's logits at once
    return {"runtime": runtime, "state": 16 * num_params, "casts": 2 * num_params if bf16 else 0,
            "activations": tokens * (4 * h * (layers + mtp_layers + 8) + act_bytes * 3 * (q + kv + i)),
            "head": 4 * 4 * rows * vocab}


def _config(args, tokens: int, samples: int, n: int):
    from mtprl.config import load_config

    micro = ["actor_rollout_ref.actor.use_dynamic_bsz=True",  # the whole batch: one micro-batch
             f"actor_rollout_ref.actor.ppo_max_token_len_per_gpu={tokens}"]
    if args.shape == "demo":  # the demo preset's micro-batches
        micro = ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=32"]
    return load_config(None, [
        f"actor_rollout_ref.rollout.n={n}", f"data.train_batch_size={samples // n}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={samples // n}", *micro,
        f"data.max_prompt_length={args.prompt}", f"data.max_response_length={args.response}",
        "actor_rollout_ref.model.mtp.enable=True", "actor_rollout_ref.model.mtp.enable_train=True",
        f"actor_rollout_ref.model.mtp.detach_encoder={args.shape == 'demo'}",
        f"actor_rollout_ref.model.dtype={args.dtype}", "actor_rollout_ref.actor.loss_agg_mode=token-mean"])


def _batch(args, vocab: int, samples: int, n: int):
    """`samples` rows, n per prompt: `prompt` random prompt tokens, then `response` response tokens (demo: 10 up to
    `response`, right-padded), advantages +-1 per sample."""
    import torch

    from mtprl.trainer.update import TrainBatch

    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab, (samples // n, args.prompt), generator=g).repeat_interleave(n, 0)
    ids = torch.cat([prompts, torch.randint(0, vocab, (samples, args.response), generator=g)], 1)
    lengths = (torch.full((samples,), args.response) if args.shape == "qwen05" else
               torch.randint(10, args.response + 1, (samples,), generator=g))
    resp = (torch.arange(ids.shape[1])[None] < args.prompt + lengths[:, None]).long()
    attn = resp.clone()
    resp[:, :args.prompt] = 0
    scores = torch.tensor([1.0, -1.0]).repeat(samples // 2)
    return TrainBatch(ids * attn, attn, resp, torch.arange(samples) // n, scores, torch.zeros(ids.shape),
                      advantages=scores[:, None] * resp)


def worker(args) -> dict:
    import resource
    import statistics

    import torch

    torch.set_num_threads(args.threads)
    from mtprl.model import CausalLM, ModelConfig
    from mtprl.trainer.optim import build_optimizer
    from mtprl.trainer.policy import apply_gradient_checkpointing
    from mtprl.trainer.update import actor_update

    runtime = _status("VmRSS")  # torch and mtprl imported: the process before any model
    torch.manual_seed(0)
    shape = QWEN05 | dict(num_hidden_layers=args.layers, num_mtp_layers=1) if args.shape == "qwen05" else DEMO
    model = CausalLM(ModelConfig(**shape))
    if args.checkpointing:
        apply_gradient_checkpointing(model)
    n = 2 if args.shape == "qwen05" else 8
    seq = args.prompt + args.response
    tokens = args.samples * seq
    cfg = _config(args, tokens, args.samples, n)
    optimizer = build_optimizer(model, cfg.actor_rollout_ref.actor.optim)
    for group in optimizer.param_groups:  # AdamW's moments allocated by a zero-lr step: the state after step 1
        group["lr"], lr = 0.0, group["lr"]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group in optimizer.param_groups:
        group["lr"] = lr
    batch = _batch(args, shape["vocab_size"], args.samples, n)

    peaks: dict[str, int] = {}
    step = optimizer.step

    def measured_step(*a, **k):
        peaks["fwd_bwd"] = _status("VmHWM")
        _reset_peak()
        return step(*a, **k)

    optimizer.step = measured_step
    if args.repeat > 1:  # timing: one warm-up update first
        actor_update(model, optimizer, batch, cfg, torch.Generator().manual_seed(0))
    base = _status("VmRSS")
    _reset_peak()
    seconds = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        metrics, skipped = actor_update(model, optimizer, batch, cfg, torch.Generator().manual_seed(0))
        seconds.append(time.perf_counter() - t0)
    peaks["step"] = _status("VmHWM")
    num_params = sum(p.numel() for p in model.parameters())
    est = estimate(num_params, args.layers, 1, tokens, runtime, args.dtype == "bfloat16",
                   chunk_rows_or_none(QWEN05["vocab_size"]))
    return {"samples": args.samples, "tokens": int(batch.attention_mask.sum()), "params": num_params, "base": base,
            **peaks, "estimate": sum(est.values()), "estimate_parts": est, "seconds": statistics.median(seconds),
            "skipped": skipped, "pg_loss": metrics["actor/pg_loss"],
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run(samples: list[int], *, shape: str = "qwen05", layers: int = 24, prompt: int = 22, response: int = 256,
        dtype: str = "bfloat16", checkpointing: bool = True, threads: int = 2, repeat: int = 1,
        pythonpath: str | None = None) -> list[dict]:
    """One fresh process per micro-batch size (with PYTHONPATH=pythonpath when given); their results in order."""
    env = dict(os.environ, PYTHONPATH=pythonpath) if pythonpath else None
    out = []
    for n in samples:
        cmd = [sys.executable, __file__, "--worker", "--shape", shape, "--samples", str(n), "--layers", str(layers),
               "--prompt", str(prompt), "--response", str(response), "--dtype", dtype, "--threads", str(threads),
               "--repeat", str(repeat)]
        if not checkpointing:
            cmd.append("--no-checkpointing")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"worker {n} samples failed:\n{proc.stderr[-4000:]}")
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def growth_per_token(results: list[dict], key: str = "fwd_bwd") -> float:
    """Bytes of `key` peak per extra token, between the first and the last size."""
    a, b = results[0], results[-1]
    return (b[key] - a[key]) / (b["tokens"] - a["tokens"])


def _demo_timing(args) -> None:
    """This checkout's demo update against --before's, rounds in turn (reversed every other round)."""
    import statistics

    sides = {"after": None, "before": args.before}
    times: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(args.rounds):
        for side in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            res = run([64], shape="demo", layers=4, prompt=args.prompt, response=args.response, dtype=args.dtype,
                      checkpointing=args.checkpointing, threads=args.threads, repeat=args.repeat,
                      pythonpath=sides[side])
            times[side].append(res[0]["seconds"])
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()), flush=True)
    ratio = statistics.median(b / a for a, b in zip(times["after"], times["before"]))
    print(f"demo update, median s: after {statistics.median(times['after']):.3f}, before "
          f"{statistics.median(times['before']):.3f}; median per-round speed-up {ratio:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen05", choices=("qwen05", "demo"))
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--samples", default="4,12", help="micro-batch sizes in samples (even: 2 per prompt)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 22; demo 30)")
    ap.add_argument("--response", type=int, default=None, help="response tokens (default 256; demo at most 48)")
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float32"), help="default bfloat16 (demo float32)")
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=None, help="updates timed per process (default 1; demo 5)")
    ap.add_argument("--rounds", type=int, default=5, help="demo: rounds of after / before")
    ap.add_argument("--before", default=None, help="demo: a directory holding another mtprl package to compare")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object instead of a table")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    demo = args.shape == "demo"
    args.prompt = args.prompt or (30 if demo else 22)
    args.response = args.response or (48 if demo else 256)
    args.dtype = args.dtype or ("float32" if demo else "bfloat16")
    args.repeat = args.repeat or (5 if demo else 1)
    if demo:
        args.checkpointing = False
    if args.worker:
        args.samples = int(args.samples)
        print(json.dumps(worker(args)))
        return
    if demo:
        _demo_timing(args)
        return
    results = run([int(s) for s in args.samples.split(",")], layers=args.layers, prompt=args.prompt,
                  response=args.response, dtype=args.dtype, checkpointing=args.checkpointing, threads=args.threads)
    if args.json:
        print(json.dumps({"results": results, "chunk": chunk_rows_or_none(QWEN05["vocab_size"]),
                          "growth_per_token": growth_per_token(results) if len(results) > 1 else None}))
        return
    gib = 2 ** 30
    row = 4 * QWEN05["vocab_size"]
    print(f"layers={args.layers} dtype={args.dtype} checkpointing={args.checkpointing} "
          f"params={results[0]['params'] / 1e6:.1f}M chunk={chunk_rows_or_none(QWEN05['vocab_size'])}")
    print("samples tokens  base GiB  fwd+bwd GiB  step GiB  estimate GiB  measured/estimate  update s")
    for r in results:
        print(f"{r['samples']:7d} {r['tokens']:6d} {r['base'] / gib:9.2f} {r['fwd_bwd'] / gib:12.2f} "
              f"{r['step'] / gib:9.2f} {r['estimate'] / gib:13.2f} {r['fwd_bwd'] / r['estimate']:18.2f} "
              f"{r['seconds']:9.1f}")
    if len(results) > 1:
        per = growth_per_token(results)
        print(f"fwd+bwd peak growth: {per / 1024:.0f} KiB per token = {per / row:.2f} fp32 vocabulary rows "
              f"({row / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
