"""Forward+backward throughput and peak memory: mtprl's trunk vs transformers' implementation, same weights.

    .venv/bin/python benchmarks/model_forward.py [--repeats 5] [--configs tiny,50m] [--threads N]

What is measured, per config:
  * tokens/s: one training step = forward over [B,T], cross-entropy on the next token (fp32 logits), backward.
    Both models are timed in the same process, interleaved (ours, theirs, ours, ...), after 2 warm-up steps;
    the median over `--repeats` steps is reported, and the ratio ours / transformers (> 1 = we are faster).
    Our model runs with compute_mtp=False (transformers has no MTP layers); a third row shows ours WITH its
    MTP layers for reference (not part of the ratio).
  * peak memory: the rise of the peak resident set size (Linux VmHWM, reset through /proc/self/clear_refs)
    over the RSS just before one training step, in a fresh subprocess per implementation. This counts every
    byte the step makes resident (activations, gradients, allocator slack), not only tensor bytes.
Both models load the same checkpoint (written once by transformers) in fp32 on CPU; transformers uses its
default attention implementation (sdpa).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CONFIGS = {
    # name: (Qwen2 config kwargs, batch size, sequence length)
    "tiny": (dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2), 8, 128),
    "50m": (dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=2), 1, 256),
}


def write_checkpoint(name: str, root: Path) -> Path:
    """Random Qwen2 checkpoint (untied, qkv bias) written by transformers; one MTP-free trunk for both sides."""
    import transformers

    kwargs, _, _ = CONFIGS[name]
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kwargs, max_position_embeddings=4096,
                                                                   tie_word_embeddings=False))
    path = root / name
    model.save_pretrained(path)
    return path


def load(impl: str, path: Path, num_mtp_layers: int = 0):
    if impl == "transformers":
        import transformers

        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    from mtprl.model import from_pretrained

    return from_pretrained(path, num_mtp_layers=num_mtp_layers).train()


def train_step(impl: str, model, ids: torch.Tensor) -> None:
    """forward [B,T] -> next-token CE (fp32) -> backward; grads cleared afterwards."""
    if impl == "transformers":
        logits = model(input_ids=ids).logits
        extra = 0.0
    else:
        out = model(ids, compute_mtp=impl == "mtprl+mtp")
        logits = out.logits
        extra = sum(x.float().mean() for x in out.mtp_logits) if out.mtp_logits else 0.0
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)) + extra
    loss.backward()
    model.zero_grad(set_to_none=True)


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def memory_worker(impl: str, path: str, name: str) -> None:
    """Run in a fresh process: print the peak-RSS rise (MiB) of one training step as JSON."""
    _, batch, seq = CONFIGS[name]
    model = load(impl, Path(path), num_mtp_layers=1 if impl == "mtprl+mtp" else 0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    train_step(impl, model, ids)
    print(json.dumps({"peak_rise_mib": (_status_kib("VmHWM") - before) / 1024}))


def measure_memory(impl: str, path: Path, name: str) -> float | None:
    cmd = [sys.executable, __file__, "--memory-worker", impl, str(path), name]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])["peak_rise_mib"] if proc.returncode == 0 and lines else None


def bench_config(name: str, repeats: int, root: Path) -> dict:
    kwargs, batch, seq = CONFIGS[name]
    path = write_checkpoint(name, root)
    impls = ["mtprl", "transformers", "mtprl+mtp"]
    models = {impl: load(impl, path, num_mtp_layers=1 if impl == "mtprl+mtp" else 0) for impl in impls}
    params = sum(p.numel() for p in models["transformers"].parameters())
    ids = torch.randint(0, kwargs["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for impl in impls:
        for _ in range(2):
            train_step(impl, models[impl], ids)
    for _ in range(repeats):
        for impl in impls:
            start = time.perf_counter()
            train_step(impl, models[impl], ids)
            times[impl].append(time.perf_counter() - start)
    del models
    result = {"config": name, "params_M": params / 1e6, "batch": batch, "seq": seq}
    for impl in impls:
        result[impl] = {"tokens_per_s": batch * seq / statistics.median(times[impl]),
                        "peak_rise_mib": measure_memory(impl, path, name)}
    result["ratio_tokens_per_s"] = result["mtprl"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    return result


def print_result(r: dict) -> None:
    print(f"\n== {r['config']}: {r['params_M']:.1f}M params, batch {r['batch']} x {r['seq']} tokens, fp32 CPU ==")
    print(f"{'implementation':<16}{'tokens/s (median)':>20}{'peak RSS rise MiB':>20}")
    for impl in ("mtprl", "transformers", "mtprl+mtp"):
        mem = r[impl]["peak_rise_mib"]
        print(f"{impl:<16}{r[impl]['tokens_per_s']:>20.1f}{(f'{mem:.1f}' if mem is not None else 'n/a'):>20}")
    mem_ratio = ""
    if r["mtprl"]["peak_rise_mib"] and r["transformers"]["peak_rise_mib"]:
        ratio = r["mtprl"]["peak_rise_mib"] / r["transformers"]["peak_rise_mib"]
        mem_ratio = f", peak memory ours/transformers = {ratio:.2f}x"
    print(f"speed ours/transformers = {r['ratio_tokens_per_s']:.2f}x{mem_ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--configs", default="tiny,50m")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--memory-worker", nargs=3, metavar=("IMPL", "PATH", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker(*args.memory_worker)
        return
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.repeats} timed repeats per implementation")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print_result(bench_config(name, args.repeats, Path(tmp)))


if __name__ == "__main__":
    main()
