import json
import math

from rich.console import Console

from mtprl.metrics import Tracker


def _scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_all_backends_write(tmp_path):
    console = Console(record=True, width=200, force_terminal=False)
    with Tracker(["console", "jsonl", "tensorboard"], tmp_path, total_steps=2, rank=0, console=console) as tr:
        tr.log({"critic/score/mean": 0.5, "actor/pg_loss": -0.125, "other/x": 3}, step=1)
        tr.log({"critic/score/mean": 0.75, "actor/grad_norm": float("nan")}, step=2)
        tr.log_text("val/generations", "1+1 = 2. Answer: 2", step=2)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["critic/score/mean"] == 0.5 and rows[0]["other/x"] == 3
    assert rows[1]["actor/grad_norm"] is None  # NaN is written as null (strict JSON)
    text = console.export_text()
    assert "step 1 | score 0.5 | pg_loss -0.125" in text
    assert "other/x" not in text  # the console line is compact
    assert "Answer: 2" in text
    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["critic/score/mean"] == [(1, 0.5), (2, 0.75)]
    assert math.isnan(scalars["actor/grad_norm"][0][1])
    gens = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert gens == [{"step": 2, "tag": "val/generations", "text": "1+1 = 2. Answer: 2"}]


def test_other_ranks_write_nothing(tmp_path):
    with Tracker(["console", "jsonl", "tensorboard"], tmp_path / "r1", rank=1) as tr:
        tr.log({"a": 1.0}, step=1)
    assert not (tmp_path / "r1").exists()


def test_rank_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    tr = Tracker(["jsonl"], tmp_path)
    assert tr.rank == 3 and not tr.backends



def test_backends_made_before_a_failing_one_are_closed(tmp_path, monkeypatch):
    import pytest

    from mtprl.metrics import tracking

    made = []

    class RecordingJsonl(tracking.JsonlBackend):
        def __init__(self, path):
            super().__init__(path)
            made.append(self)

    monkeypatch.setattr(tracking, "JsonlBackend", RecordingJsonl)
    console = Console(record=True, width=200, force_terminal=False)
    with pytest.raises(ValueError, match="unknown logger 'wandb'"):
        Tracker(["console", "jsonl", "wandb"], tmp_path, rank=0, console=console)
    assert made and made[0]._file.closed and made[0]._text.closed  # no open file handles left behind
    assert not console._live_stack  # the console progress bar was stopped
