"""Checkpoint layout, latest-step file and pruning (a stub model: only save_pretrained is needed)."""

import torch

from mtprl.trainer.checkpoint import LATEST_FILE, find_latest_checkpoint, list_checkpoints, save_checkpoint


class _Stub(torch.nn.Module):
    def save_pretrained(self, path):
        import pathlib

        pathlib.Path(path).mkdir(parents=True)
        (pathlib.Path(path) / "config.json").write_text("{}")


def _save(root, step, keep=None):
    return save_checkpoint(root, step, _Stub(), None, None, {"x": step}, keep=keep)


def test_keep_prunes_the_oldest(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["global_step_2", "global_step_3"]
    assert find_latest_checkpoint(tmp_path).name == "global_step_3"


def test_keep_never_deletes_the_checkpoint_just_written(tmp_path):
    # a run resumed (resume_mode=resume_path) from step 2 in a folder that still holds step 5 of an earlier,
    # longer run: saving step 3 with keep=1 must keep step 3, the one the latest-step file now names
    for step in (2, 5):
        _save(tmp_path, step)
    _save(tmp_path, 3, keep=1)
    assert (tmp_path / LATEST_FILE).read_text() == "3"
    assert (tmp_path / "global_step_3" / "trainer_state.pt").is_file()
    assert find_latest_checkpoint(tmp_path).name == "global_step_3"
    assert not (tmp_path / "global_step_2").exists()
