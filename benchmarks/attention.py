"""Decode attention on the CPU: mtprl's kernel (mtprl/model/cpu_attention.py) vs F.scaled_dot_product_attention.

    .venv/bin/python benchmarks/attention.py [--head-dim 16] [--kv-heads 2] [--kv-len 200] [--threads 1]

Shapes as in a decode step of the rollout benchmark's model: per layer, q [B, Hkv, M, Dh] (M = query rows per kv
head: GQA group x tokens of the step), K/V [B, Hkv, kv_len, Dh] sliced from a cache with 2x the slots, an additive
mask with -inf holes. The 24 layers' caches are cycled so that K/V come from memory as in a real step, not from a
warm L1/L2. Prints microseconds per layer (median of 5) and the ratio kernel / SDPA; the packed path uses the
kernel up to cpu_attention.MAX_ROWS[head_dim] rows (head dims 16 and 32 only).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from mtprl.model import cpu_attention


def per_layer_us(fn, layers: int, repeats: int = 5, calls: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times) / layers * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--kv-len", type=int, default=200)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if cpu_attention.kernel() is None:
        raise SystemExit("the CPU attention kernel is not available here (see the warning above)")
    dh, hkv, s, layers = args.head_dim, args.kv_heads, args.kv_len, args.layers
    print(f"head_dim {dh}, kv heads {hkv}, kv_len {s}, {layers} layers cycled, {args.threads} thread(s)")
    print("batch  rows  sdpa us/layer  kernel us/layer  kernel/sdpa")
    for b in (1, 16, 64):
        k_cache = torch.randn(layers, b, hkv, 2 * s, dh)
        v_cache = torch.randn(layers, b, hkv, 2 * s, dh)
        for rows in (2, 4, 8, 12, 24):
            q = torch.randn(b, hkv, rows, dh)
            mask = torch.zeros(b, 1, rows, s)
            mask[..., s - 10:] = float("-inf")

            def sdpa():
                for layer in range(layers):
                    F.scaled_dot_product_attention(q, k_cache[layer, :, :, :s], v_cache[layer, :, :, :s],
                                                   attn_mask=mask)

            def ours():
                for layer in range(layers):
                    cpu_attention.decode_attention(q, k_cache[layer, :, :, :s], v_cache[layer, :, :, :s], mask,
                                                   dh ** -0.5)

            a, k = per_layer_us(sdpa, layers), per_layer_us(ours, layers)
            print(f"{b:5d} {rows:5d} {a:14.1f} {k:16.1f} {k / a:12.2f}", flush=True)


if __name__ == "__main__":
    main()
