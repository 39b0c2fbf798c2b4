"""Atomic, resumable checkpoints.

Layout (verl's, so its tooling finds the latest step)::

    <default_local_dir>/
      latest_checkpointed_iteration.txt      # "<step>"
      global_step_<k>/
        actor/                               # HF directory: config.json, safetensors, tokenizer files
        optimizer.pt                         # optimizer + LR scheduler state
        trainer_state.pt                     # step, RNG states, data cursor, counters, the config

A checkpoint is written into ``global_step_<k>.tmp`` and renamed into place, then the latest-step file
is replaced the same way, so a run killed mid-save leaves the previous checkpoint intact and
resumable.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

LATEST_FILE = "latest_checkpointed_iteration.txt"
_STEP_DIR = re.compile(r"^global_step_(\d+)$")


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    state["generators"] = {name: g.get_state() for name, g in (generators or {}).items()}
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    for name, g in (generators or {}).items():
        if name in state["generators"]:
            g.set_state(state["generators"][name])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    trainer_state: dict[str, Any],
    *,
    keep: int | None = None,
) -> Path:
    """Write ``global_step_<step>`` atomically; keep only the newest ``keep`` checkpoints when set."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"global_step_{step}"
    tmp = root / f"global_step_{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save_pretrained(str(tmp / "actor"))
    if optimizer is not None:
        torch.save({"optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None}, tmp / "optimizer.pt")
    torch.save({**trainer_state, "step": step}, tmp / "trainer_state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(root / LATEST_FILE, str(step))
    if keep is not None and keep > 0:
        # the newest ``keep`` up to this step; checkpoints of later steps (left by an earlier, longer run that
        # this one resumed below) are not counted, so the one just written is never deleted
        upto = [p for p in list_checkpoints(root) if _step_of(p) <= step]
        for old in upto[:-keep]:
            shutil.rmtree(old)
    return final


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest first (``.tmp`` leftovers are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    found = [(s, p) for s, p in found if (p / "trainer_state.pt").is_file()]
    return [p for _, p in sorted(found)]


def find_latest_checkpoint(root: str | Path) -> Path | None:
    root = Path(root)
    latest = root / LATEST_FILE
    if latest.is_file():
        candidate = root / f"global_step_{latest.read_text().strip()}"
        if (candidate / "trainer_state.pt").is_file():
            return candidate
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any | None = None
) -> dict[str, Any]:
    """Restore model weights (and optimizer / scheduler when given); returns the saved trainer state."""
    from mtprl.model import from_pretrained

    path = Path(path)
    if not (path / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"{path} is not a complete mtprl checkpoint (no trainer_state.pt)")
    ref = next(model.parameters())
    saved = from_pretrained(str(path / "actor"), dtype=ref.dtype, device=ref.device)
    missing, unexpected = model.load_state_dict(saved.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if optimizer is not None and (path / "optimizer.pt").is_file():
        opt = torch.load(path / "optimizer.pt", weights_only=False)
        optimizer.load_state_dict(opt["optimizer"])
        if scheduler is not None and opt["scheduler"] is not None:
            scheduler.load_state_dict(opt["scheduler"])
    return torch.load(path / "trainer_state.pt", weights_only=False)


def resolve_resume(root: str | Path, resume_mode: str, resume_from_path: str | None) -> Path | None:
    """The checkpoint to resume from per ``trainer.resume_mode`` (auto | disable | resume_path)."""
    if resume_mode == "disable":
        return None
    if resume_mode == "resume_path":
        path = Path(resume_from_path or "")
        if not (path / "trainer_state.pt").is_file():
            raise FileNotFoundError(f"trainer.resume_from_path={resume_from_path} is not an mtprl checkpoint directory")
        return path
    return find_latest_checkpoint(root)
