"""benchmarks/memory_real_shapes.py (docs/performance.md, "Memory at real shapes"), run as a script: a random model
with Qwen2.5-0.5B's widths, heads and vocabulary (one trunk layer here, 24 in the benchmark) plus one MTP layer runs
one DAPO update on 256-token responses under bf16 autocast. The estimate it prints is the documented formula, the
measured peak RSS is near it, and the peak grows by far less than one fp32 vocabulary row per token of the
micro-batch (the full-logits update grew by ~4 rows)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_real_shapes.py"
VOCAB, HIDDEN, Q, KV, INTERMEDIATE = 151_936, 896, 896, 2 * 2 * 64, 4864  # Qwen2.5-0.5B: 14 / 2 heads of 64


@pytest.mark.slow
def test_real_shapes_update_peak_memory_near_the_estimate_and_flat_in_tokens():
    # 2 and 6 samples of 22 + 256 tokens: 556 and 1668 tokens in one micro-batch, each size in a fresh process
    cmd = [sys.executable, str(SCRIPT), "--layers", "1", "--samples", "2,6", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    row = 4 * VOCAB  # one fp32 vocabulary row: 594 KiB
    for r in out["results"]:
        assert r["skipped"] == 0 and math.isfinite(r["pg_loss"]), r
        # runtime + 16 P + 2 P + tokens * (4 H (L + D + 8) + 2 * 3 * (q + kv + I)) + 4 * 4 * chunk * V
        parts, p = r["estimate_parts"], r["params"]
        assert r["tokens"] == r["samples"] * (22 + 256)
        assert (parts["state"], parts["casts"]) == (16 * p, 2 * p)
        assert parts["activations"] == r["tokens"] * (4 * HIDDEN * (1 + 1 + 8) + 2 * 3 * (Q + KV + INTERMEDIATE))
        assert parts["head"] == 4 * 4 * min(out["chunk"], r["tokens"]) * VOCAB
        assert r["estimate"] == sum(parts.values())
        assert 0.8 <= r["fwd_bwd"] / r["estimate"] <= 1.25, (r["fwd_bwd"], parts)
    assert out["growth_per_token"] < 0.5 * row, f"{out['growth_per_token'] / row:.2f} rows per token"
