"""sync_weights' one-all-gather-per-bucket path against DTensor.full_tensor(), on 2 gloo ranks."""

from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.mark.slow
def test_bucketed_gather_equals_full_tensor(tmp_path, launch_ranks):
    out = tmp_path / "done"
    launch_ranks(HERE / "weight_sync_worker.py", 2, str(out))
    assert sorted(p.read_text() for p in tmp_path.glob("done.*")) == ["ok 0", "ok 1"]
