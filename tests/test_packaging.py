"""What pyproject.toml promises about its dependencies."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_torch_floor_is_the_oldest_release_the_suite_passed_on():
    """torch 2.12.0 passed the suite here (2026-12-07); 2.8.0 and 2.10.0 fail tests/distributed/test_fsdp_update.py
    (FSDP2 frees the head's unsharded storage before a backward reads it: "setStorage ... storage of size 0").
    The code also calls APIs that older releases lack (FSDPModule.set_force_sum_reduction_for_comms,
    nn.utils.get_total_norm / clip_grads_with_norm_, SDPA's enable_gqa). The floor was torch>=2.4."""
    text = (ROOT / "pyproject.toml").read_text()
    floor = re.search(r'"torch>=([0-9.]+)"', text)
    assert floor is not None, "pyproject.toml lost its torch lower bound"
    assert tuple(int(x) for x in floor.group(1).split(".")[:2]) >= (2, 12)
