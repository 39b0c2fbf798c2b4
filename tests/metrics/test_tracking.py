import json
import math
import sys
from pathlib import Path

import pytest

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
    with pytest.raises(ValueError, match="unknown logger 'swanlab'"):
        Tracker(["console", "jsonl", "swanlab"], tmp_path, rank=0, console=console)
    assert made and made[0]._file.closed and made[0]._text.closed  # no open file handles left behind
    assert not console._live_stack  # the console progress bar was stopped


# ----- wandb / mlflow, offline: read back what they wrote --------------------------------------------------------
def _remote_config():
    from mtprl.config import load_config

    return load_config(None, ["trainer.project_name=proj", "trainer.experiment_name=exp1",
                              "trainer.wandb_tags=[mtp,dapo]", "data.train_batch_size=16"])


def _log_two_steps(tracker):
    tracker.log({"critic/score/mean": 0.5, "val-core/arith/acc/mean@4": 0.25}, step=1)
    tracker.log({"critic/score/mean": 0.75}, step=2)
    tracker.log_text("val/generations", "1+1 = 2", step=2)
    tracker.log_text("val/generations", "2+2 = 4", step=2)


def _wandb_records(run_dir, timeout_s: float = 20.0):
    """The protobuf records of an offline run's ``run-<id>.wandb``, once its final "exit" record is on disk
    (wandb's service process may still be writing when ``run.finish()`` returns)."""
    import time

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(_parse_wandb_log(path.read_bytes()))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def _parse_wandb_log(data):
    """wandb's LevelDB-style log: a 7-byte file header, then 32 KiB blocks of [crc32 u32, length u16, type u8]
    chunks; type 1 = a full record, 2/3/4 = its first/middle/last piece."""
    import struct

    from wandb.proto import wandb_internal_pb2

    pos, pending = 7, b""
    if data[:4] != b":W&B":  # not written yet
        return
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block tail too short for a header: padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 or pos + 7 + length > len(data):  # zero fill, or a record still being written
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_holds_names_tags_config_and_metrics_by_step(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb"), "WANDB_SILENT": "true",
                       "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "wb").mkdir()
    with Tracker(["jsonl", "wandb"], tmp_path / "run", rank=0, config=_remote_config()) as tr:
        _log_two_steps(tr)
    records = list(_wandb_records(tmp_path / "wb"))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name, list(run.tags)) == ("proj", "exp1", ["mtp", "dapo"])
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["trainer"]["experiment_name"] == "exp1" and config["data"]["train_batch_size"] == 16
    assert config["data"]["gen_batch_size"] == 16  # the resolved config
    history = [{tuple(i.nested_key) or (i.key,): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]  # one row per step
    assert [(h[("_step",)], h[("critic/score/mean",)]) for h in history] == [(1, 0.5), (2, 0.75)]
    assert [h.get(("val-core/arith/acc/mean@4",)) for h in history] == [0.25, None]
    table = {key[1]: v for key, v in history[1].items() if key[0] == "val/generations"}
    assert table["_type"] == "table-file" and (table["nrows"], table["ncols"]) == (2, 2)  # both lines, (step, text)


def test_wandb_only_on_rank_0_and_in_the_run_dir_by_default(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    with Tracker(["wandb"], tmp_path / "r1", rank=1, config=_remote_config()) as tr:
        tr.log({"a": 1.0}, step=1)
    assert list(tmp_path.iterdir()) == []  # no run, no folder, on other ranks
    with Tracker(["wandb"], tmp_path / "r0", rank=0) as tr:
        tr.log({"a": 1.0}, step=1)
    assert len(list((tmp_path / "r0").glob("wandb/offline-run-*/run-*.wandb"))) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r0"]


def test_mlflow_file_store_holds_run_params_and_metrics_by_step(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 keeps its file store behind this switch
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    with Tracker(["mlflow"], tmp_path / "run", rank=0, config=_remote_config()) as tr:
        _log_two_steps(tr)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("proj").experiment_id])
    assert run.info.run_name == "exp1" and run.info.status == "FINISHED"
    assert {"mtp", "dapo"} <= set(run.data.tags)
    params = run.data.params
    assert params["trainer/experiment_name"] == "exp1" and params["data/gen_batch_size"] == "16"
    assert params["trainer/logger"] == '["console"]' and len(params) > 100  # the whole config, over 100 params
    history = client.get_metric_history(run.info.run_id, "critic/score/mean")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.75)]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val-core/arith/acc/mean_at_4")] == [
        (1, 0.25)]
    text = (tmp_path / "texts").mkdir() or client.download_artifacts(
        run.info.run_id, "val/generations/step_00000002.txt", str(tmp_path / "texts"))
    assert Path(text).read_text() == "1+1 = 2\n2+2 = 4\n"


def test_mlflow_default_store_is_sqlite_in_the_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    with Tracker(["mlflow"], tmp_path / "run", rank=0) as tr:
        tr.log({"x": 3.0}, step=5)
        tr.log_text("data/train", "64 prompts", step=5)
    client = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("mtprl").experiment_id])
    assert run.info.run_name == "default" and run.data.metrics == {"x": 3.0}
    assert (tmp_path / "run" / "mlartifacts").is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_mlflow_metric_keys_are_sanitised_as_verl():
    from mtprl.metrics.remote import mlflow_metric_key

    assert mlflow_metric_key("val-core/x//acc/mean@4") == "val-core/x/acc/mean_at_4"
    assert mlflow_metric_key("timing_s/gen (s)") == "timing_s/gen (s)".replace("(", "_").replace(")", "_")


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_missing_package_names_the_extra(name, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, name, None)  # import -> ImportError, as if not installed
    console = Console(record=True, width=200, force_terminal=False)
    with pytest.raises(ImportError, match=rf"pip install 'mtprl\[{name}\]'"):
        Tracker(["console", name], tmp_path, rank=0, console=console)
    assert not console._live_stack  # the console bar made before it was stopped
