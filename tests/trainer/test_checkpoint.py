"""Checkpoint layout, latest-step file, pruning and crash safety (a stub model: only save_pretrained is needed)."""

import pytest
import torch

from mtprl.trainer.checkpoint import (LATEST_FILE, TrainerState, find_latest_checkpoint, list_checkpoints,
                                     save_checkpoint)


class _Stub(torch.nn.Module):
    def save_pretrained(self, path):
        import pathlib

        pathlib.Path(path).mkdir(parents=True)
        (pathlib.Path(path) / "config.json").write_text("{}")


def _state(step, **config):
    return TrainerState(step=step, loader={}, rng={}, bad_steps=0, config=config)


def _save(root, step, keep=None):
    return save_checkpoint(root, step, _Stub(), None, None, _state(step), keep=keep)


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


# --- crash safety: every state a kill can leave resumes from the newest complete checkpoint ---------------


def test_kill_between_the_rename_and_the_latest_file_resumes_from_the_new_checkpoint(tmp_path):
    for step in (1, 2):
        _save(tmp_path, step)
    (tmp_path / LATEST_FILE).write_text("1")  # what a kill right after the rename of step 2 leaves
    assert find_latest_checkpoint(tmp_path).name == "global_step_2"


def test_a_run_resumed_below_an_older_runs_steps_resumes_from_its_own_newest(tmp_path):
    # step 5 of an earlier, longer run; this run resumed at 2 (resume_path) and wrote 3 and 4, then was
    # killed between the rename of 4 and the latest-step file: 4 is the newest save, not 5
    for step in (2, 5, 3, 4):
        _save(tmp_path, step)
    (tmp_path / LATEST_FILE).write_text("3")
    assert find_latest_checkpoint(tmp_path).name == "global_step_4"


def test_interrupted_writes_are_ignored_and_finished_writes_committed(tmp_path):
    from mtprl.trainer.checkpoint import resolve_resume

    _save(tmp_path, 1)
    partial = tmp_path / "global_step_2.tmp"  # killed mid-write: no manifest
    (partial / "actor").mkdir(parents=True)
    (partial / "trainer_state.pt").write_bytes(b"\x00" * 10)
    assert resolve_resume(tmp_path, "auto", None).name == "global_step_1"
    assert partial.is_dir()  # left for the next save of step 2 to replace
    # killed after the manifest was written, before the rename: the write was complete, so it is committed
    _save(tmp_path, 3)
    (tmp_path / "global_step_3").rename(tmp_path / "global_step_3.tmp")
    (tmp_path / LATEST_FILE).write_text("1")
    assert resolve_resume(tmp_path, "auto", None).name == "global_step_3"
    assert (tmp_path / "global_step_3").is_dir() and not (tmp_path / "global_step_3.tmp").exists()
    # validation reads the folder without changing it
    _save(tmp_path, 4)
    (tmp_path / "global_step_4").rename(tmp_path / "global_step_4.tmp")
    assert resolve_resume(tmp_path, "auto", None, recover=False).name == "global_step_3"
    assert (tmp_path / "global_step_4.tmp").is_dir()


def test_a_kill_while_a_step_is_saved_again_never_loses_it(tmp_path, monkeypatch):
    # re-saving an existing step (a run resumed below it): the old copy used to be deleted before the new one
    # was renamed into place; a kill in between left no checkpoint of that step at all
    import os

    import mtprl.trainer.checkpoint as ckpt

    _save(tmp_path, 3)
    real_replace = os.replace

    def killed_at_the_second_rename(src, dst):
        if str(src).endswith("global_step_3.tmp"):
            raise KeyboardInterrupt  # stands in for the kill
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", killed_at_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 3, _Stub(), None, None, _state(3, x="again"))
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    found = ckpt.resolve_resume(tmp_path, "auto", None)
    assert found.name == "global_step_3" and ckpt.checkpoint_problem(found) is None
    assert torch.load(found / "trainer_state.pt", weights_only=False)["config"]["x"] == "again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step_3", LATEST_FILE]


def test_a_corrupt_latest_checkpoint_falls_back_with_a_warning_naming_both(tmp_path):
    from mtprl.trainer.checkpoint import CheckpointWarning

    for step in (1, 2):
        _save(tmp_path, step)
    state = tmp_path / "global_step_2" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:20])  # truncated
    with pytest.warns(CheckpointWarning, match=r"global_step_2 is incomplete or corrupt \(trainer_state.pt has 20 "
                                               r"bytes.*resuming from \S*global_step_1 instead"):
        assert find_latest_checkpoint(tmp_path).name == "global_step_1"
    assert state.is_file()  # nothing deleted
    assert [p.name for p in list_checkpoints(tmp_path)] == ["global_step_1"]


def test_no_intact_checkpoint_is_a_clear_error_not_a_fresh_start(tmp_path):
    from mtprl.trainer.checkpoint import CheckpointError, resolve_resume

    _save(tmp_path, 1)
    (tmp_path / "global_step_1" / "actor" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"global_step_1: actor/config.json is missing.*trainer.resume_mode=disable"):
        resolve_resume(tmp_path, "auto", None)
    with pytest.raises(CheckpointError, match="trainer.resume_from_path=.*global_step_1 is incomplete"):
        resolve_resume(tmp_path, "resume_path", str(tmp_path / "global_step_1"))
    assert (tmp_path / "global_step_1" / "trainer_state.pt").is_file()


def test_a_failing_write_leaves_the_previous_checkpoint_and_no_leftover(tmp_path, monkeypatch):
    import errno

    import mtprl.trainer.checkpoint as ckpt

    _save(tmp_path, 1)
    real_save = torch.save

    def disk_full(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _save(tmp_path, 2)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step_1", LATEST_FILE]
    assert (tmp_path / LATEST_FILE).read_text() == "1"
    assert ckpt.checkpoint_problem(tmp_path / "global_step_1") is None


class _RunsCode:
    """A pickled object whose unpickling calls a function: what a crafted checkpoint would carry."""

    def __reduce__(self):
        import os

        return os.system, ("echo pwned > /dev/null",)


@pytest.mark.parametrize("name", ["trainer_state.pt", "optimizer.pt"])
def test_a_crafted_pickle_in_a_checkpoint_is_refused(tmp_path, name):
    """Resume reads trainer_state.pt / optimizer.pt with weights_only=True: a pickle that would run code when
    loaded (a checkpoint folder on a shared disk) is a clear error, not executed."""
    from mtprl.trainer.checkpoint import CheckpointError, load_state_file

    path = tmp_path / name
    torch.save({"step": 3, "payload": _RunsCode()}, path)
    with pytest.raises(CheckpointError, match="refused to load.*arbitrary code"):
        load_state_file(path)


def test_trainer_state_with_rng_states_loads_with_weights_only(tmp_path):
    from mtprl.trainer.checkpoint import load_state_file, rng_state

    g = torch.Generator().manual_seed(3)
    path = _save(tmp_path, 1)
    torch.save({"rng": rng_state({"sample": g}), "step": 1, "config": {"a": [1, 2.0, "x", None]}},
               path / "trainer_state.pt")
    state = load_state_file(path / "trainer_state.pt")
    assert state["step"] == 1 and torch.equal(state["rng"]["generators"]["sample"], g.get_state())
    assert state["rng"]["numpy"][0] == "MT19937" and state["config"] == {"a": [1, 2.0, "x", None]}


def _previous_rl_state(g: torch.Generator) -> dict:
    """trainer_state.pt as the RL trainer wrote it before TrainerState (setup.save's dict, key for key)."""
    from mtprl.trainer.checkpoint import rng_state

    return {"loader": {"epoch": 1, "cursor": 4}, "rng": rng_state({"sample": g, "shuffle": g}), "bad_steps": 1,
            "next_group_id": 12, "kl_coef": 0.001, "config": {"a": 1}, "metrics_row": {"critic/score/mean": 0.5},
            "rank_sample_rng": [g.get_state()], "step": 3}


def test_trainer_state_reads_checkpoints_the_previous_code_wrote(tmp_path):
    from mtprl.trainer.checkpoint import load_state_file

    g = torch.Generator().manual_seed(3)
    old = _previous_rl_state(g)
    path = _save(tmp_path, 3) / "trainer_state.pt"
    torch.save(old, path)
    state = TrainerState.from_dict(load_state_file(path), path)
    assert (state.step, state.bad_steps, state.next_group_id, state.kl_coef) == (3, 1, 12, 0.001)
    assert state.loader == {"epoch": 1, "cursor": 4} and state.metrics_row == {"critic/score/mean": 0.5}
    assert torch.equal(state.rank_sample_rng[0], g.get_state())
    assert old.keys() <= state.to_dict().keys()  # the file keeps every key: the previous code reads it too
    # older still: written before the per-rank streams and the metrics row were saved
    older = TrainerState.from_dict({k: v for k, v in old.items() if k not in ("rank_sample_rng", "metrics_row")}, path)
    assert older.rank_sample_rng == [] and older.metrics_row is None
    # an SFT checkpoint: no RL fields
    sft = TrainerState.from_dict({k: old[k] for k in ("step", "loader", "rng", "bad_steps", "config")}, path)
    assert sft.next_group_id is None and sft.kl_coef is None


def test_a_trainer_state_missing_a_field_is_a_clear_error(tmp_path):
    from mtprl.trainer.checkpoint import CheckpointError

    state = _previous_rl_state(torch.Generator())
    del state["loader"], state["bad_steps"]
    with pytest.raises(CheckpointError, match="trainer_state.pt is not an mtprl trainer state: it lacks loader, "
                                              "bad_steps"):
        TrainerState.from_dict(state, tmp_path / "trainer_state.pt")
    with pytest.raises(CheckpointError, match="it lacks step, loader"):
        TrainerState.from_dict([1, 2], tmp_path / "trainer_state.pt")


def test_a_state_of_another_step_is_refused(tmp_path):
    with pytest.raises(ValueError, match="checkpoint of step 3 given the trainer state of step 2"):
        save_checkpoint(tmp_path, 3, _Stub(), None, None, _state(2))
    assert not any(tmp_path.iterdir())
