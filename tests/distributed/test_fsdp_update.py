"""2 ranks with FSDP2 (gloo) vs 1 process on the same global batches: equal parameters after 3 updates."""

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


@pytest.mark.slow
def test_two_fsdp_ranks_equal_one_process(tmp_path, launch_ranks):
    script = HERE / "fsdp_update_worker.py"
    launch_ranks(script, 1, str(tmp_path / "one.pt"))
    launch_ranks(script, 2, str(tmp_path / "two.pt"))
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["state"].keys() == two["state"].keys()
    assert any(k.startswith("mtp_layers.") for k in one["state"])
    moved = max(float((one["state"][k] - one["initial"][k]).abs().max()) for k in one["state"])
    assert moved > 1e-3  # the updates did something the comparison can see
    for k in one["state"]:
        torch.testing.assert_close(two["state"][k], one["state"][k], rtol=0, atol=1e-5, msg=k)
    for k in ("actor/pg_loss", "actor/grad_norm", "mtp_losses/mtp_1_loss", "mtp_losses/mtp_3_loss"):
        assert two["metrics"][k] == pytest.approx(one["metrics"][k], rel=1e-4, abs=1e-6), k


@pytest.mark.slow
def test_mixed_precision_and_cpu_offload_paths(tmp_path, launch_ranks):
    """FSDP2's bf16 mixed precision (fp32 master weights and gradient reduction; the worker asserts fp32
    parameters) and its CPU offload policy, on gloo: offload changes nothing, bf16 stays close."""
    script = HERE / "fsdp_update_worker.py"
    launch_ranks(script, 1, str(tmp_path / "one.pt"))
    launch_ranks(script, 2, str(tmp_path / "offload.pt"), "offload")
    launch_ranks(script, 2, str(tmp_path / "bf16.pt"), "bf16")
    one, off, bf16 = (torch.load(tmp_path / f"{n}.pt") for n in ("one", "offload", "bf16"))
    for k in one["state"]:
        torch.testing.assert_close(off["state"][k], one["state"][k], rtol=0, atol=1e-5, msg=k)
        torch.testing.assert_close(bf16["state"][k], one["state"][k], rtol=0, atol=2e-2, msg=k)
    assert bf16["metrics"]["actor/pg_loss"] == pytest.approx(one["metrics"]["actor/pg_loss"], rel=1e-3)
    assert bf16["metrics"]["actor/grad_norm"] == pytest.approx(one["metrics"]["actor/grad_norm"], rel=1e-2)
