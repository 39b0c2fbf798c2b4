"""benchmarks/spec_cost.py runs as a script on a tiny shape and prints one row per (hidden, layers, rows) whose
ratios follow from its two timings: r = spec ms / plain ms, cap = (K+1) / r, E/r."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "spec_cost.py"


def test_runs_on_a_tiny_shape_and_its_ratios_follow_from_its_timings():
    cmd = [sys.executable, str(SCRIPT), "--layers", "1,2", "--hidden", "32", "--rows", "1,2", "--repeats", "1",
           "--new-tokens", "8", "--steps", "2", "--tokens-per-step", "1.5", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.count("|") == 4][1:]  # [0]: the header
    assert [tuple(int(x) for x in r[0].split()) for r in rows] == [(32, 1, 1), (32, 1, 2), (32, 2, 1), (32, 2, 2)]
    for r in rows:
        plain, spec = (float(x) for x in r[1].split())
        ratio, cap, e_over_r = float(r[2]), float(r[3].strip().rstrip("x")), float(r[4].strip().rstrip("x"))
        assert plain > 0 and spec > 0
        assert ratio == pytest.approx(spec / plain, rel=0.05)  # the ms are printed to 2 decimals
        assert cap == pytest.approx(3 / ratio, rel=0.02, abs=0.01)  # K + 1 = 3 tokens at most per step
        assert e_over_r == pytest.approx(1.5 / ratio, rel=0.02, abs=0.01)
