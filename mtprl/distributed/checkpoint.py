"""Sharded, resharding checkpoints of an FSDP2 policy and its optimizer with torch.distributed.checkpoint.

``<checkpoint>/dcp/`` holds the model and optimizer state as DCP writes it: every rank saves its own
shards, and a load on any world size (1 process included) reads the pieces it needs, so a run saved on
2 ranks resumes on 1 or 4. The HF export (``actor/``) and the trainer state stay as the single-process
checkpoint writes them (see :mod:`mtprl.trainer.checkpoint`); a single-process checkpoint (``actor/`` +
``optimizer.pt``, full tensors) loads into a sharded run through :func:`load_full_into_sharded`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

DCP_DIR = "dcp"


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """{"model": ..., "optim": ...} keyed by parameter name, each rank's shards as DTensors (plain tensors on
    one process); the optimizer state is initialised first when it is still empty, so a load has targets."""
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    return {"model": model_sd} if optimizer is None else {"model": model_sd, "optim": optim_sd}


def save_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Write model (+ optimizer) state under ``path / dcp``; every rank calls it (a collective)."""
    dcp.save(_state(model, optimizer), checkpoint_id=str(Path(path) / DCP_DIR))


def load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Read ``path / dcp`` into ``model`` (+ ``optimizer``), resharding to this run's world size."""
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=str(Path(path) / DCP_DIR))
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optim", {}))


def load_full_into_sharded(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                           model_state: dict[str, torch.Tensor], optim_state: dict | None) -> None:
    """Load full (unsharded) model / optimizer state dicts, as a single process saved them, into a
    sharded model: each rank keeps its own shards of every tensor."""
    opts = StateDictOptions(full_state_dict=True, strict=True)
    if optimizer is None or optim_state is None:
        set_state_dict(model, [], model_state_dict=model_state, optim_state_dict={}, options=opts)
        return
    # optimizer.state_dict() of a plain model is keyed by parameter index; DCP's is keyed by name
    # (the index order is the optimizer's: its param groups in order; this run builds the same groups)
    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    by_name = {"state": {names[i]: s for i, s in optim_state["state"].items()},
               "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in optim_state["param_groups"]]}
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=by_name, options=opts)


def has_sharded(path: Path) -> bool:
    return (Path(path) / DCP_DIR / ".metadata").is_file()
