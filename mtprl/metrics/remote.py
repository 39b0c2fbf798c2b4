"""Remote experiment trackers for ``trainer.logger``: wandb and mlflow (optional extras).

As verl's ``verl/utils/tracking.py``: the run is named by ``trainer.project_name`` (wandb project, mlflow
experiment) and ``trainer.experiment_name`` (wandb run name, mlflow run name), the resolved config is stored
with it (wandb ``config``; mlflow params, flattened with "/"), and metric keys mlflow rejects are sanitised
the way verl does ("@" -> "_at_", any other character outside ``[/\\w.\\- :]`` -> "_", "//" -> "/").
Ours: ``trainer.wandb_tags`` become wandb tags and mlflow run tags.

Where the data goes:
  * wandb: ``wandb.init`` reads its own environment (WANDB_API_KEY, WANDB_ENTITY, WANDB_MODE=offline, ...);
    the run folder is WANDB_DIR when set, else the run directory (verl: the current directory).
  * mlflow: MLFLOW_TRACKING_URI when set (a server, ``file://...``, ``sqlite:///...``), MLFLOW_RUN_ID to attach
    to an existing run, as verl; else ``sqlite:///<run dir>/mlflow.db`` with artifacts in ``<run dir>/mlartifacts``
    (verl: ``sqlite:////tmp/mlruns.db``), so a run directory holds all its logs.
Only rank 0 builds these (the Tracker is a no-op elsewhere), so one run is created per training job.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

REMOTE_LOGGERS = ("wandb", "mlflow")
# trainer.logger name -> (module imported, pip extra that installs it)
EXTRAS = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
_MLFLOW_INVALID = re.compile(r"[^/\w.\- :]")  # mlflow's allowed metric-key characters, as verl
_MLFLOW_MAX_PARAM_CHARS = 6000  # mlflow's limit on one param value


@dataclass
class RunInfo:
    """What names a remote run and is stored with it; ``config`` is the resolved config as a nested dict."""

    project: str = "mtprl"
    experiment: str = "default"
    tags: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg) -> "RunInfo":
        """From an MtprlConfig: trainer.project_name / experiment_name / wandb_tags and the whole config."""
        from mtprl.config.loader import to_dict

        tr = cfg.trainer
        return cls(project=tr.project_name, experiment=tr.experiment_name, tags=tuple(tr.wandb_tags),
                   config=to_dict(cfg))


def import_extra(name: str):
    """The module behind logger ``name``, or an ImportError naming the pip extra that installs it."""
    import importlib

    module, extra = EXTRAS[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"trainer.logger includes '{name}' but the {module} package is not installed: "
                          f"pip install 'mtprl[{extra}]'") from None


class WandbBackend:
    """One wandb run: scalars with ``run.log(step=...)``, text as a wandb Table per tag (step, text) rows."""

    def __init__(self, run_dir: Path, info: RunInfo):
        self.wandb = import_extra("wandb")
        folder = Path(os.environ.get("WANDB_DIR") or run_dir)  # passed on: wandb reads its env once a process
        folder.mkdir(parents=True, exist_ok=True)
        self.run = self.wandb.init(project=info.project, name=info.experiment, tags=list(info.tags) or None,
                                   config=info.config, dir=str(folder))
        self._rows: dict[str, list[list]] = {}

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        rows = self._rows.setdefault(tag, [])
        rows.append([step, text])  # the whole table so far, as verl logs its validation generations
        self.run.log({tag: self.wandb.Table(columns=["step", "text"], data=list(rows))}, step=step)

    def close(self) -> None:
        self.run.finish()


def mlflow_metric_key(key: str) -> str:
    """verl's sanitising of a metric key for mlflow (``val-core/x/acc/mean@4`` -> ``val-core/x/acc/mean_at_4``)."""
    key = re.sub(r"/+", "/", key.replace("@", "_at_"))
    return _MLFLOW_INVALID.sub("_", key)


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1, "c": [1, 2]}} -> {"a/b": "1", "a/c": "[1, 2]"}: nested keys joined by "/" as verl,
    lists and None as JSON (verl spreads lists into ``list_len``/``0``/``1``...; one param per list reads
    better), values cut at mlflow's 6000-character limit."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, prefix=f"{name}/"))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:_MLFLOW_MAX_PARAM_CHARS]
    return out


class MlflowBackend:
    """One mlflow run through an explicit ``MlflowClient`` (no fluent active-run state): metrics with
    ``step``, the flattened config as params, text as artifacts ``<tag>/step_<n>.txt`` (one line per call)."""

    def __init__(self, run_dir: Path, info: RunInfo):
        import_extra("mlflow")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None
        if not uri:
            run_dir.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
            artifacts = (run_dir.resolve() / "mlartifacts").as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        run_id = os.environ.get("MLFLOW_RUN_ID")
        if run_id:
            self.run_id = self.client.get_run(run_id).info.run_id
        else:
            exp = self.client.get_experiment_by_name(info.project)
            exp_id = (exp.experiment_id if exp is not None
                      else self.client.create_experiment(info.project, artifact_location=artifacts))
            tags = {tag: "" for tag in info.tags}
            self.run_id = self.client.create_run(exp_id, run_name=info.experiment, tags=tags).info.run_id
        params = [Param(k, v) for k, v in flatten_params(info.config).items()]
        self.client.log_batch(self.run_id, params=params)
        self._texts: dict[tuple[str, int], list[str]] = {}

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(mlflow_metric_key(k), float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_text(self, tag: str, text: str, step: int) -> None:
        lines = self._texts.setdefault((tag, step), [])
        lines.append(text)
        self.client.log_text(self.run_id, "\n".join(lines) + "\n", f"{tag}/step_{step:08d}.txt")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def remote_backend(name: str, run_dir: Path, info: RunInfo):
    """The backend for ``trainer.logger`` entry ``name`` (one of REMOTE_LOGGERS)."""
    return WandbBackend(run_dir, info) if name == "wandb" else MlflowBackend(run_dir, info)
