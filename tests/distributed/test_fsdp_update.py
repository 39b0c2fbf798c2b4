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
    for k in ("actor/pg_loss", "actor/grad_norm", "mtp_losses/mtp_1_loss"):
        assert two["metrics"][k] == pytest.approx(one["metrics"][k], rel=1e-4, abs=1e-6), k
