"""Metric trackers chosen by ``trainer.logger``: console (progress bar + compact line), JSONL, TensorBoard,
and wandb / mlflow (optional extras ``mtprl[wandb]``, ``mtprl[mlflow]``; see ``mtprl.metrics.remote``).

Only rank 0 writes anything; other ranks get a tracker whose calls do nothing, so the training code
calls ``tracker.log`` unconditionally on every rank.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mtprl.metrics.remote import REMOTE_LOGGERS, RunInfo, remote_backend

# Keys shown on the console line, in this order, with short labels; everything else goes to files.
CONSOLE_KEYS: tuple[tuple[str, str], ...] = (
    ("sft/lm_loss", "loss"),
    ("val/sft/lm_loss", "val_loss"),
    ("critic/score/mean", "score"),
    ("critic/acc/mean", "acc"),
    ("response_length/mean", "resp_len"),
    ("actor/pg_loss", "pg_loss"),
    ("actor/entropy", "entropy"),
    ("actor/grad_norm", "gnorm"),
    ("mtp_losses/mtp_1_loss", "mtp1"),
    ("mtp/acc_1", "mtp_acc1"),
    ("rollout/spec_accept_length", "acc_len"),
    ("perf/throughput", "tok/s"),
    ("timing_s/step", "step_s"),
)


def current_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _fmt(value: float) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if value != value or math.isinf(value):
        return str(value)
    return f"{value:.4g}"


def progress_bar(console: Console | None = None, *, transient: bool = False) -> Progress:
    """The one progress-bar layout used by every stage: description, bar, n/N, elapsed, ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )


class Backend(Protocol):
    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_text(self, tag: str, text: str, step: int) -> None: ...

    def close(self) -> None: ...


class ConsoleBackend:
    """A step progress bar with ETA plus one compact metrics line per step."""

    def __init__(self, total_steps: int | None, console: Console | None = None, description: str = "train"):
        self.console = console or Console()
        self.progress = progress_bar(self.console)
        self.task = self.progress.add_task(description, total=total_steps)
        self.progress.start()

    def line(self, metrics: Mapping[str, float], step: int) -> str:
        parts = [f"step {step}"]
        parts += [f"{label} {_fmt(metrics[key])}" for key, label in CONSOLE_KEYS if key in metrics]
        return " | ".join(parts)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.progress.console.print(self.line(metrics, step), highlight=False)
        self.progress.update(self.task, completed=step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.progress.console.print(f"[dim]{tag} (step {step}):[/dim] {text}", highlight=False)

    def close(self) -> None:
        self.progress.stop()


class JsonlBackend:
    """One JSON object per step: ``{"step": n, "time": unix_s, "<metric>": value, ...}`` (NaN -> null)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a", encoding="utf-8")
        self._text = (path.parent / "generations.jsonl").open("a", encoding="utf-8")

    @staticmethod
    def _clean(v: float) -> float | None:
        return None if isinstance(v, float) and (v != v or math.isinf(v)) else v

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        row = {"step": step, "time": time.time(), **{k: self._clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def log_text(self, tag: str, text: str, step: int) -> None:
        self._text.write(json.dumps({"step": step, "tag": tag, "text": text}) + "\n")
        self._text.flush()

    def close(self) -> None:
        self._file.close()
        self._text.close()


class TensorBoardBackend:
    """``purge_step``: a resumed run's first step; TensorBoard hides the earlier run's events from there on."""

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, global_step=step)

    def close(self) -> None:
        self.writer.close()


def _truncated(path: Path, after_step: int) -> list[dict]:
    """The rows of a JSONL file with ``step <= after_step``, the file rewritten atomically (tmp + rename)
    when anything was dropped. A line that does not parse (a write cut off by a kill) is dropped too."""
    if not path.is_file():
        return []
    rows, dropped = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= after_step:
            rows.append(row)
        else:
            dropped = dropped or bool(line.strip())
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, path)
    return rows


def truncate_logs(run_dir: Path, after_step: int) -> int:
    """Resume hook: drop the rows past ``after_step`` from ``metrics.jsonl`` and ``generations.jsonl``
    (the resumed run logs those steps again); returns the last step left in ``metrics.jsonl`` (-1: none)."""
    rows = _truncated(run_dir / "metrics.jsonl", after_step)
    _truncated(run_dir / "generations.jsonl", after_step)
    return max((r["step"] for r in rows), default=-1)


class Tracker:
    """Fans metrics out to the backends named in ``trainer.logger``; a no-op on ranks other than 0.
    ``config`` (the resolved MtprlConfig) names the wandb / mlflow run (trainer.project_name, experiment_name,
    wandb_tags) and is stored with it; without it the run is mtprl/default with no config."""

    def __init__(
        self,
        loggers: Sequence[str],
        run_dir: str | Path,
        *,
        total_steps: int | None = None,
        rank: int | None = None,
        console: Console | None = None,
        description: str = "train",
        config: Any = None,
        keep_through: int | None = None,
    ):
        """``keep_through``: rows logged earlier in ``run_dir`` up to this step are kept, later ones dropped
        (JSONL rewritten, TensorBoard ``purge_step=keep_through + 1``): a resumed run passes its checkpoint's
        step, a fresh run -1; None appends to what is there. ``last_logged_step`` is then the last step left
        in ``metrics.jsonl`` (-1: none; None without the jsonl logger or without ``keep_through``)."""
        self.rank = current_rank() if rank is None else rank
        self.run_dir = Path(run_dir)
        self.backends: dict[str, Backend] = {}
        self.last_logged_step: int | None = None
        if self.rank != 0:
            return
        if keep_through is not None and "jsonl" in loggers:
            self.last_logged_step = truncate_logs(self.run_dir, keep_through)
        purge_step = None if keep_through is None else keep_through + 1
        try:
            for name in loggers:
                if name == "console":
                    self.backends[name] = ConsoleBackend(total_steps, console, description)
                elif name == "jsonl":
                    self.backends[name] = JsonlBackend(self.run_dir / "metrics.jsonl")
                elif name == "tensorboard":
                    self.backends[name] = TensorBoardBackend(self.run_dir / "tensorboard", purge_step)
                elif name in REMOTE_LOGGERS:
                    info = RunInfo() if config is None else RunInfo.from_config(config)
                    self.backends[name] = remote_backend(name, self.run_dir, info)
                else:
                    raise ValueError(f"unknown logger '{name}'; choose from console, jsonl, tensorboard, "
                                     f"{', '.join(REMOTE_LOGGERS)}")
        except BaseException:
            self.close()  # the backends made so far: a started progress bar, open files
            raise

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        numeric = {k: float(v) if not isinstance(v, (int, bool)) else v for k, v in metrics.items()}
        for backend in self.backends.values():
            backend.log(numeric, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        for backend in self.backends.values():
            backend.log_text(tag, text, step)

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()
        self.backends.clear()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
