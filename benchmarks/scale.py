"""Scale-out on one machine: a DAPO + MTP step with 1 process vs 2 gloo ranks on the same global batch.

    .venv/bin/python benchmarks/scale.py [--steps 4] [--rounds 3] [--hidden 256] [--layers 8]

Builds a tokenizer, synthetic math data and a random MiMo-style policy (qwen2 trunk, 1 MTP layer) once,
then runs `mtprl train` for --steps steps as (a) one process with 1 thread, (b) one process with 2 threads
and (c) 2 ranks of 1 thread each (RANK / WORLD_SIZE / MASTER_* set as torchrun sets them: FSDP2 over
gloo, colocated engines, weight sync after every update), in rotating order for --rounds rounds. Both use the same config: 8 prompts x 4
samples per step, 1 mini-batch, the same data order. It prints, from each run's metrics.jsonl (the
first step is left out as warm-up), the median seconds of the step and of each phase, the ratios
2 ranks / 1 process, and the weight sync's seconds and bytes per step.

On this 2-core machine the two ranks share the two cores the single process uses, so this measures the
overhead of the distributed path (collectives, gathers, sync) against the work split, not a speed-up
that more hardware would give.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = ("step", "gen", "reward", "old_log_prob", "adv", "update_actor", "update_weights", "save_checkpoint")


def build_world(root: Path, hidden: int, layers: int) -> dict[str, str]:
    from mtprl.data import build_math_tokenizer, write_synthetic_math
    from mtprl.model import ModelConfig
    from mtprl.trainer.policy import init_policy_checkpoint

    tok = build_math_tokenizer(root / "tokenizer", vocab_size=320, num_problems=300, seed=0)
    data = write_synthetic_math(root / "data", num_train=256, num_val=16, seed=0, levels=(1,))
    cfg = ModelConfig.tiny(vocab_size=320, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, num_mtp_layers=1, max_position_embeddings=512)
    init_policy_checkpoint(root / "policy", cfg, tok, seed=0)
    return {"train": str(data.train), "val": str(data.val), "model": str(root / "policy")}


def overrides(world: dict[str, str], out: Path, steps: int, ranks: int) -> list[str]:
    return [
        f"data.train_files={world['train']}", f"data.val_files={world['val']}", "data.max_prompt_length=64",
        "data.max_response_length=32", "data.train_batch_size=8", "actor_rollout_ref.actor.ppo_mini_batch_size=8",
        "actor_rollout_ref.rollout.n=4", f"actor_rollout_ref.model.path={world['model']}",
        "actor_rollout_ref.model.mtp.enable=True", "actor_rollout_ref.model.mtp.enable_train=True",
        "actor_rollout_ref.model.mtp.enable_rollout=True", "actor_rollout_ref.model.mtp.speculative_num_steps=2",
        "actor_rollout_ref.actor.optim.lr=1e-5", "reward_model.reward_manager=dapo", "reward_model.num_workers=0",
        "actor_rollout_ref.actor.use_dynamic_bsz=True", "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=2048",
        "trainer.logger=[jsonl]", f"trainer.default_local_dir={out}", "trainer.save_freq=-1", "trainer.test_freq=-1",
        "trainer.val_before_train=False", f"trainer.total_training_steps={steps}", "trainer.resume_mode=disable",
        f"trainer.n_gpus_per_node={ranks}",
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SETUPS = {"1 proc x 1 thread": (1, 1), "1 proc x 2 threads": (1, 2), "2 ranks x 1 thread": (2, 1)}


def run(world: dict[str, str], out: Path, steps: int, ranks: int, threads: int) -> list[dict]:
    """`mtprl train` as ``ranks`` processes of ``threads`` threads; the metrics rows rank 0 logged."""
    port, procs = free_port(), []
    threads = str(threads)
    for rank in range(ranks):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        if ranks > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(ranks),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, "-c", f"import torch; torch.set_num_threads({threads}); "
               "import sys; from mtprl.cli import main; sys.exit(main())", "train", *overrides(world, out, steps, ranks)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for rank, p in enumerate(procs):
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"{ranks} ranks: rank {rank} failed:\n{err[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mtprl_scale_"))
    world = build_world(root, args.hidden, args.layers)
    times: dict[str, dict[str, list[float]]] = {name: {} for name in SETUPS}
    sync_bytes: list[float] = []
    names = list(SETUPS)
    for r in range(args.rounds):
        for name in names[r % 3:] + names[: r % 3]:
            ranks, threads = SETUPS[name]
            t0 = time.perf_counter()
            rows = run(world, root / f"run_{ranks}_{threads}_{r}", args.steps, ranks, threads)[1:]  # step 1 warms up
            print(f"round {r}: {name}: {time.perf_counter() - t0:.1f} s wall", flush=True)
            for row in rows:
                for phase in PHASES:
                    if f"timing_s/{phase}" in row:
                        times[name].setdefault(phase, []).append(row[f"timing_s/{phase}"])
                if ranks == 2:
                    sync_bytes.append(row["perf/update_weights_bytes"])
    print(f"\nmodel: hidden {args.hidden}, {args.layers} layers, 1 MTP layer; 8 prompts x 4 samples per step; "
          f"medians over {args.rounds} rounds x {args.steps - 1} steps (seconds)")
    print(f"{'phase':16s}" + "".join(f"{n:>21s}" for n in names) + f"{'2r / 1p1t':>11s}{'2r / 1p2t':>11s}")
    med = {n: {ph: statistics.median(v) for ph, v in times[n].items()} for n in names}
    for phase in PHASES:
        vals = [med[n].get(phase, float("nan")) for n in names]
        print(f"{phase:16s}" + "".join(f"{v:21.3f}" for v in vals) + f"{vals[2] / vals[0]:11.2f}{vals[2] / vals[1]:11.2f}")
    print(f"weight sync per step (2 ranks): {med[names[2]]['update_weights']:.4f} s, "
          f"{statistics.median(sync_bytes) / 2**20:.2f} MiB written into each rank's engine")


if __name__ == "__main__":
    main()
