"""Trainer -> engine weight sync on 2 gloo ranks: one all-gather per bucket (sync_weights) against one
DTensor.full_tensor() per parameter (the reference it replaced), side by side, interleaved.

    .venv/bin/python benchmarks/weight_sync.py [--rounds 8] [--shapes 64x16,256x8]

Each shape is hidden x trunk layers of a MiMo-style policy (1 MTP layer, vocab 384), FSDP2-sharded over the 2
ranks (one thread each) and synced into a full copy; prints the median ms of both (the first 2 rounds left out)
and their ratio. Started as a plain script, it starts the two ranks itself (RANK / WORLD_SIZE / MASTER_* set).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time


def per_parameter(src, dst) -> None:
    import torch

    targets = dict(dst.named_parameters())
    with torch.no_grad():
        for name, p in src.named_parameters():
            targets[name].copy_(p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach())


def rank_main(args) -> None:
    import torch

    from mtprl.distributed.env import destroy_distributed, init_distributed
    from mtprl.distributed.parallelize import apply_fsdp
    from mtprl.distributed.weight_sync import sync_weights
    from mtprl.model import CausalLM, ModelConfig

    torch.set_num_threads(1)
    env = init_distributed("cpu", timeout_s=120)
    for shape in args.shapes.split(","):
        hidden, layers = (int(x) for x in shape.split("x"))
        cfg = ModelConfig(model_type="mimo", vocab_size=384, hidden_size=hidden, intermediate_size=3 * hidden,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          tie_word_embeddings=True, attention_bias=True, num_mtp_layers=1)
        torch.manual_seed(0)
        model, engine = CausalLM(cfg), CausalLM(cfg)
        apply_fsdp(model, env)
        times = {"bucketed": [], "per_parameter": []}
        for r in range(args.rounds):
            for name in (("bucketed", "per_parameter") if r % 2 == 0 else ("per_parameter", "bucketed")):
                torch.distributed.barrier()
                t = time.perf_counter()
                sync_weights(model, engine) if name == "bucketed" else per_parameter(model, engine)
                times[name].append(time.perf_counter() - t)
        if env.is_main:
            mib = sum(p.numel() for p in engine.parameters()) * 4 / 2**20
            fast, ref = (statistics.median(times[k][2:]) * 1000 for k in ("bucketed", "per_parameter"))
            print(f"hidden {hidden} x {layers} layers ({mib:.1f} MiB, {len(list(engine.parameters()))} tensors): "
                  f"per parameter {ref:.1f} ms, one all-gather per bucket {fast:.1f} ms: {ref / fast:.1f}x", flush=True)
    destroy_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--shapes", default="64x16,256x8")
    args = parser.parse_args()
    if "RANK" in os.environ:
        return rank_main(args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, __file__, *sys.argv[1:]],
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1"))
             for r in range(2)]
    sys.exit(max(p.wait() for p in procs))


if __name__ == "__main__":
    main()
