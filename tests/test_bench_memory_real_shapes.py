"""benchmarks/memory_real_shapes.py (#28, "real shapes on CPU"): a random model with Qwen2.5-0.5B's widths, heads
and vocabulary (one trunk layer here, 24 in the benchmark) plus one MTP layer runs one DAPO update on 256-token
responses under bf16 autocast; its peak RSS is near the analytic estimate of docs/performance.md and grows by far
less than one fp32 vocabulary row per token of the micro-batch (the full-logits update grew by ~4 rows)."""

import importlib.util
import math
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_real_shapes.py"
_spec = importlib.util.spec_from_file_location("bench_memory_real_shapes", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_estimate_is_the_documented_formula():
    # runtime + 16 P + 2 P + tokens * (4 H (L + D + 8) + 2 * 3 * (q + kv + I)) + 4 * 4 * chunk * V
    parts = bench.estimate(1000, layers=2, mtp_layers=1, tokens=10, runtime=5, bf16=True, chunk=3, vocab=100)
    assert parts == {"runtime": 5, "state": 16_000, "casts": 2_000,
                     "activations": 10 * (4 * 896 * 11 + 2 * 3 * (896 + 256 + 4864)), "head": 16 * 3 * 100}
    full = bench.estimate(1000, layers=2, mtp_layers=1, tokens=10, runtime=5, bf16=False, chunk=None, vocab=100)
    assert full["casts"] == 0 and full["head"] == 16 * 10 * 100  # before the chunked head: every token's row


@pytest.mark.slow
def test_real_shapes_update_peak_memory_near_the_estimate_and_flat_in_tokens():
    results = bench.run([2, 6], layers=1)  # 556 and 1668 tokens in one micro-batch, each in a fresh process
    row = 4 * bench.QWEN05["vocab_size"]  # one fp32 vocabulary row: 594 KiB
    for r in results:
        assert r["skipped"] == 0 and math.isfinite(r["pg_loss"]), r
        assert 0.8 <= r["fwd_bwd"] / r["estimate"] <= 1.25, (r["fwd_bwd"], r["estimate_parts"])
    per_token = bench.growth_per_token(results)
    assert per_token < 0.5 * row, f"{per_token / row:.2f} rows per token"
