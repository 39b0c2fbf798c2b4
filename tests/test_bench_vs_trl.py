"""benchmarks/vs_trl.py --check, run as a script (the benchmark itself runs outside the suite: it needs TRL, the
`bench` extra, and half an hour): every mtprl configuration it runs resolves through mtprl's config validation
with the settings docs/performance.md states, the demo shape's SFT run pins its own settings, and the limits model
is the ~100M-parameter confident LM whose matmul weights set the bandwidth bound."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_trl.py"


def test_check_resolves_every_configuration_and_the_limits_model():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    configs = out["configs"]
    assert set(configs) == {"demo/off", "demo/off_bf16", "demo/on", "demo/adaptive", "demo/on_train",
                            "25m/off", "25m/off_bf16"}
    for name, c in configs.items():
        shape, config = name.split("/")
        # 8 prompts x 8 samples, lr 1e-5, clip 0.2 / 0.28, no KL, no dynamic sampling (docs/performance.md)
        assert (c["prompts"], c["n"], c["lr"], c["clip"]) == (8, 8, 1e-5, [0.2, 0.28])
        assert not c["filter_groups"] and not c["kl_loss"]
        assert c["new_tokens"] == {"demo": 48, "25m": 128}[shape]
        assert c["dtype"] == ("bfloat16" if config == "off_bf16" else "float32")
        assert c["mtp_rollout"] == (not config.startswith("off"))
        assert c["mtp_train"] == (config == "on_train") and c["adaptive"] == (config == "adaptive")
    assert out["demo_sft"] == {"batch": 64, "steps": 300, "new_tokens": 48, "lr": 3e-3, "warmup_style": "cosine",
                               "warmup_steps": 20, "min_lr_ratio": 0.1, "mtp_loss_scaling_factor": 1.0,
                               "recursive_steps": 0}
    limits = out["limits_model"]
    # hidden 768, 14 layers, 12 / 4 heads of 64, SwiGLU 2304, untied head over 512 tokens: per layer q + o 2 x 768^2,
    # k + v 2 x 768 x 256, gate + up + down 3 x 768 x 2304; the head once (biases, norms, embedding, MTP excluded)
    per_layer = 2 * 768 * 768 + 2 * 768 * 256 + 3 * 768 * 2304
    assert limits["matmul_params"] == 14 * per_layer + 512 * 768
    assert 90e6 < limits["trunk_params"] < 110e6
    assert limits["entropy"] < 1.0  # a confident LM: the speculative limit measures acceptance, not noise
