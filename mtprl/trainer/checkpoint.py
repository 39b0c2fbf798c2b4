"""Atomic, resumable checkpoints.

Layout (verl's, so its tooling finds the latest step)::

    <default_local_dir>/
      latest_checkpointed_iteration.txt      # "<step>"
      global_step_<k>/
        actor/                               # HF directory: config.json, safetensors, tokenizer files
        optimizer.pt                         # optimizer + LR scheduler state (multi-rank: the scheduler only)
        dcp/                                 # multi-rank runs: model + optimizer shards (torch.distributed.checkpoint)
        trainer_state.pt                     # TrainerState: step, RNG states, data cursor, counters, the config
        manifest.json                        # written last: {"step", "seq", "files": {relative path: bytes}}

Save protocol (a kill at any point leaves a resumable folder):

1. everything is written into ``global_step_<k>.tmp``, ``manifest.json`` last: a ``.tmp`` without a
   manifest is an interrupted write and is never resumed from;
2. commit: an existing ``global_step_<k>`` (a re-save of the same step) is first renamed to
   ``global_step_<k>.old``, then ``.tmp`` is renamed to ``global_step_<k>``, then ``.old`` is removed;
   no moment exists where neither a complete ``.tmp`` nor a complete ``global_step_<k>`` is on disk;
3. the latest-step file is replaced (tmp file + rename), then old checkpoints are pruned
   (renamed to ``.old`` before removal, so a half-removed one is never mistaken for a checkpoint).

A checkpoint is *complete* when its manifest is there and every file it lists has the listed size
(a truncated safetensors / optimizer file fails this). ``seq`` counts saves in this folder (one more
than any manifest already there), so the newest complete checkpoint is the one with the largest
``seq``, whatever the latest-step file says: a kill between the rename and the latest-step file
write still resumes from the checkpoint just written, and a run resumed at a lower step (resume_path)
in a folder holding later steps of an earlier run resumes from its own newest checkpoint.
Checkpoints written before manifests existed count as complete when ``trainer_state.pt`` is there.

A run (:class:`~mtprl.trainer.setup.Run`) is checkpointed and resumed by :func:`save_run` / :func:`restore_run`;
``mtprl sft`` saves the same :class:`TrainerState` without the RL fields.

Testing hook: ``MTPRL_FAULT=save:<k>`` / ``renamed:<k>`` SIGKILLs the process mid-write (after the
actor, before the optimizer state) / between the rename and the latest-step file (see
:mod:`mtprl.trainer.faults`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from mtprl.config.loader import to_dict
from mtprl.trainer.faults import fault_point

if TYPE_CHECKING:
    from mtprl.trainer.setup import Run

LATEST_FILE = "latest_checkpointed_iteration.txt"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^global_step_(\d+)$")
_TMP_DIR = re.compile(r"^global_step_(\d+)\.tmp$")


class CheckpointError(ValueError):
    """No usable checkpoint where one was asked for (every candidate incomplete or corrupt)."""


class CheckpointWarning(UserWarning):
    """Resuming from an older checkpoint because a newer one is incomplete or corrupt."""


@dataclass
class TrainerState:
    """What ``trainer_state.pt`` holds beside the weights and the optimizer: everything else a resumed run
    continues from. Stored as a plain dict of its fields (tensors, numbers, strings, containers: loadable with
    ``weights_only=True``, see :func:`load_state_file`); a field added later needs a default, so that
    checkpoints written before it still load."""

    step: int  # the training step the checkpoint was saved at
    loader: dict[str, Any]  # PromptLoader.state_dict(): epoch, cursor and what must match on resume
    rng: dict[str, Any]  # rng_state(): torch / numpy / python global RNGs and the named generators
    bad_steps: int  # consecutive steps whose every optimizer step was skipped (non-finite)
    config: dict[str, Any]  # the run's config (to_dict), for the record: resume takes the current command's
    # RL runs only (None / empty in an ``mtprl sft`` checkpoint)
    next_group_id: int | None = None  # the next prompt group's id
    kl_coef: float | None = None  # the KL coefficient (the adaptive controller's current value)
    metrics_row: dict[str, float] | None = None  # the step's metrics, logged on resume if a kill beat the log
    rank_sample_rng: list[torch.Tensor] = field(default_factory=list)  # every rank's sampling generator state
    # every rank's rollout engine state (Engine.state_dict: adaptive speculation's acceptance counts and steps)
    rank_rollout_state: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, raw: Any, path: Path) -> TrainerState:
        """The state of a loaded ``trainer_state.pt`` (``path``, for the error); keys this version does not know
        are ignored. A CheckpointError when it is not a dict or lacks a field that has no default."""
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in raw] if isinstance(raw, dict) else required
        if missing:
            raise CheckpointError(f"{path} is not an mtprl trainer state: it lacks {', '.join(missing)}")
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


def _numpy_state_globals() -> list:
    """What numpy's RNG state (``np.random.get_state()``: an ndarray of uint32) pickles as, allowed by name."""
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"),
            (_reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_state_file(path: Path) -> Any:
    """``trainer_state.pt`` / ``optimizer.pt`` with ``torch.load(weights_only=True)``: tensors, numbers, strings and
    containers, plus numpy's RNG state - never an arbitrary pickled object, whose unpickling could run code (a
    checkpoint folder on a shared disk is input, not code). A file holding anything else is a CheckpointError."""
    import pickle

    try:
        with torch.serialization.safe_globals(_numpy_state_globals()):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                      str(e).splitlines()[0])
        raise CheckpointError(
            f"{path}: refused to load: it holds a pickled object that is not part of an mtprl checkpoint "
            f"({detail}); unpickling it could run arbitrary code. Resume only from checkpoints mtprl wrote") from None


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


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _write_manifest(tmp: Path, step: int, seq: int) -> None:
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    _atomic_write_text(tmp / MANIFEST, json.dumps({"step": step, "seq": seq, "files": files}, indent=1))


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a complete checkpoint (missing / truncated file, no manifest), None when it is."""
    path = Path(path)
    if not (path / MANIFEST).exists():  # written before manifests existed, or a save that did not finish
        return None if (path / "trainer_state.pt").is_file() else f"no {MANIFEST} (the save did not finish)"
    manifest = _read_manifest(path)
    if manifest is None or not isinstance(manifest.get("files"), dict):
        return f"{MANIFEST} is unreadable"
    for name, size in manifest["files"].items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    return None


def _seq(path: Path) -> int:
    manifest = _read_manifest(path)
    return int(manifest["seq"]) if manifest and isinstance(manifest.get("seq"), int) else -1


def _step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)), key=_step_of)


def _remove(path: Path) -> None:
    """Rename to ``.old`` (atomic: the checkpoint is gone at once), then delete."""
    old = path.with_name(path.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    os.replace(path, old)
    shutil.rmtree(old)


def _commit(tmp: Path, final: Path) -> None:
    """Step 2 of the protocol: ``tmp`` (complete) becomes ``final``; an existing ``final`` is replaced."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def _write_tmp(tmp: Path, step: int, model: nn.Module, optimizer, scheduler, trainer_state: TrainerState,
               dist=None, export_model: nn.Module | None = None) -> None:
    """Fill ``tmp``. With more than one rank (``dist``) every rank calls this: rank 0 writes the HF
    export from ``export_model`` (a full copy of the weights), the trainer state and the manifest; every
    rank writes its shards of the model and optimizer under ``dcp/`` (torch.distributed.checkpoint)."""
    sharded = dist is not None and dist.distributed
    main = not sharded or dist.is_main
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        (export_model or model).save_pretrained(str(tmp / "actor"))
    fault_point("save", step)
    if sharded:
        from mtprl.distributed.checkpoint import save_sharded

        dist.barrier()  # the folder exists on every rank's view before DCP writes into it
        save_sharded(tmp, model, optimizer)
    if main and optimizer is not None:  # sharded: the optimizer state is under dcp/, only the schedule here
        torch.save({"optimizer": None if sharded else optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None}, tmp / "optimizer.pt")
    if sharded:
        dist.barrier()  # every rank's shards are written before the manifest lists them
    if main:
        torch.save(trainer_state.to_dict(), tmp / "trainer_state.pt")
        seq = 1 + max((_seq(p) for p in _step_dirs(tmp.parent)), default=0)
        _write_manifest(tmp, step, seq)


def save_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    trainer_state: TrainerState,
    *,
    keep: int | None = None,
    dist=None,
    export_model: nn.Module | None = None,
) -> Path:
    """Write ``global_step_<step>`` by the protocol above; keep only the newest ``keep`` checkpoints when set.
    A failing write (full disk, ...) removes its ``.tmp`` and re-raises; earlier checkpoints are untouched.
    Multi-rank (``dist``, an FSDP-sharded ``model``): every rank calls this; see :func:`_write_tmp`; rank 0
    commits, and every rank returns once the checkpoint is in place."""
    if trainer_state.step != step:
        raise ValueError(f"checkpoint of step {step} given the trainer state of step {trainer_state.step}")
    root = Path(root)
    main = dist is None or dist.is_main
    if main:
        root.mkdir(parents=True, exist_ok=True)
    final = root / f"global_step_{step}"
    tmp = root / f"global_step_{step}.tmp"
    try:
        _write_tmp(tmp, step, model, optimizer, scheduler, trainer_state, dist, export_model)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space a full disk needs; never a complete checkpoint
        raise
    if not main:
        dist.barrier()  # rank 0 commits
        return final
    _commit(tmp, final)
    fault_point("renamed", step)
    _atomic_write_text(root / LATEST_FILE, str(step))
    if keep is not None and keep > 0:
        # the newest ``keep`` up to this step; checkpoints of later steps (left by an earlier, longer run that
        # this one resumed below) are not counted, so the one just written is never deleted
        upto = [p for p in list_checkpoints(root) if _step_of(p) <= step]
        for old in upto[:-keep]:
            _remove(old)
    if dist is not None:
        dist.barrier()
    return final


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest step first (``.tmp`` / ``.old`` leftovers and
    incomplete or corrupt directories are ignored)."""
    return [p for p in _step_dirs(Path(root)) if checkpoint_problem(p) is None]


def find_latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint (largest manifest ``seq``, then step). Newer directories that are
    incomplete or corrupt are left alone and named in a :class:`CheckpointWarning`; when every checkpoint
    directory is broken this raises :class:`CheckpointError` rather than start over silently."""
    dirs = _step_dirs(Path(root))
    problems = {p: checkpoint_problem(p) for p in dirs}
    intact = [p for p in dirs if problems[p] is None]
    broken = [p for p in dirs if problems[p] is not None]
    if not intact:
        if broken:
            raise CheckpointError(
                f"no complete checkpoint under {root}: " + "; ".join(f"{p.name}: {problems[p]}" for p in broken)
                + ". Nothing was deleted; fix or move them, or set trainer.resume_mode=disable to start over")
        return None
    latest = max(intact, key=lambda p: (_seq(p), _step_of(p)))
    newer = [p for p in broken if _seq(p) > _seq(latest) or _step_of(p) > _step_of(latest)]
    if newer:
        warnings.warn(
            "; ".join(f"checkpoint {p} is incomplete or corrupt ({problems[p]})" for p in newer)
            + f"; resuming from {latest} instead (nothing was deleted)", CheckpointWarning, stacklevel=2)
    return latest


def finish_interrupted_saves(root: str | Path) -> None:
    """Complete what a killed save left half done: a complete ``.tmp`` (manifest written) is committed,
    ``.old`` leftovers (superseded or pruned checkpoints) are removed. Incomplete ``.tmp`` directories are
    left for the next save of that step to replace. Only the one process that writes checkpoints into
    ``root`` may call this (a concurrent save's complete ``.tmp`` would be moved under it)."""
    root = Path(root)
    if not root.is_dir():
        return
    for tmp in sorted(root.iterdir()):
        m = _TMP_DIR.match(tmp.name)
        if m and tmp.is_dir() and (tmp / MANIFEST).exists() and checkpoint_problem(tmp) is None:
            _commit(tmp, root / f"global_step_{m.group(1)}")
    for old in root.iterdir():
        if old.is_dir() and old.name.endswith(".old") and _STEP_DIR.match(old.name[: -len(".old")]):
            shutil.rmtree(old)


def checkpoint_step(path: str | Path) -> int:
    """The training step a checkpoint was saved at."""
    manifest = _read_manifest(Path(path))
    if manifest is not None and isinstance(manifest.get("step"), int):
        return manifest["step"]
    state_file = Path(path) / "trainer_state.pt"
    return TrainerState.from_dict(load_state_file(state_file), state_file).step


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any | None = None
) -> TrainerState:
    """Restore model weights (and optimizer / scheduler when given); returns the saved trainer state."""
    from mtprl.model import from_pretrained

    path = Path(path)
    if not (path / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"{path} is not a complete mtprl checkpoint (no trainer_state.pt)")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt: {problem}")
    from mtprl.distributed.checkpoint import has_sharded, load_full_into_sharded, load_sharded
    from mtprl.distributed.parallelize import is_sharded

    opt = load_state_file(path / "optimizer.pt") if (path / "optimizer.pt").is_file() else None
    if optimizer is not None and opt is not None and opt["optimizer"] is not None:
        _check_param_groups(path, optimizer, opt["optimizer"])
    if has_sharded(path):  # written by a multi-rank run: DCP reshards to this run's world size (1 included)
        load_sharded(path, model, optimizer)
    else:
        sharded = is_sharded(model)
        ref = next(model.parameters())
        saved = from_pretrained(str(path / "actor"), dtype=torch.float32 if sharded else ref.dtype,
                                device="cpu" if sharded else ref.device)
        if sharded:  # a single-process checkpoint resumed on several ranks: each keeps its shards
            load_full_into_sharded(model, optimizer, saved.state_dict(),
                                   opt["optimizer"] if opt is not None and optimizer is not None else None)
        else:
            missing, unexpected = model.load_state_dict(saved.state_dict(), strict=False)
            if missing or unexpected:
                raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:4]}, "
                                 f"unexpected {unexpected[:4]}")
            if optimizer is not None and opt is not None:
                optimizer.load_state_dict(opt["optimizer"])
    if scheduler is not None and opt is not None and opt["scheduler"] is not None:
        scheduler.load_state_dict(opt["scheduler"])
    return TrainerState.from_dict(load_state_file(path / "trainer_state.pt"), path / "trainer_state.pt")


def _check_param_groups(path: Path, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """A clear error where torch's would be cryptic: the run builds other parameter groups than the checkpoint's
    optimizer had (actor_rollout_ref.model.mtp.lr adds two, for the MTP layers)."""
    have, want = len(saved.get("param_groups", ())), len(optimizer.param_groups)
    if have != want:
        raise ValueError(f"checkpoint {path} holds optimizer state for {have} parameter groups but this run builds "
                         f"{want}: actor_rollout_ref.model.mtp.lr (set or not) changes the grouping - resume with "
                         f"the setting the run was started with, or start a new run")


def resolve_resume(root: str | Path, resume_mode: str, resume_from_path: str | None, *,
                   recover: bool = True) -> Path | None:
    """The checkpoint to resume from per ``trainer.resume_mode`` (auto | disable | resume_path). With
    ``recover`` (the run that will write checkpoints here), auto first finishes interrupted saves;
    read-only users (validation) pass False."""
    if resume_mode == "disable":
        return None
    if resume_mode == "resume_path":
        path = Path(resume_from_path or "")
        if not (path / "trainer_state.pt").is_file():
            raise FileNotFoundError(f"trainer.resume_from_path={resume_from_path} is not an mtprl checkpoint directory")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise CheckpointError(f"trainer.resume_from_path={resume_from_path} is incomplete or corrupt: {problem}")
        return path
    if recover:
        finish_interrupted_saves(root)
    return find_latest_checkpoint(root)


def _generators(run: Run) -> dict[str, torch.Generator]:
    return {"sample": run.sample_gen, "shuffle": run.shuffle_gen}


def save_run(run: Run, row: dict[str, float] | None = None) -> Path:
    """Checkpoint ``run.step`` (every rank calls it). ``row``: that step's metrics so far, kept in the checkpoint
    so that a run killed after the save but before the row was logged logs it on resume. A failed write (full
    disk) stops the run with an OSError naming the checkpoint and the last intact one, which is untouched."""
    state = TrainerState(step=run.step, loader=run.loader.state_dict(), rng=rng_state(_generators(run)),
                         bad_steps=run.bad_steps, config=to_dict(run.cfg), next_group_id=run.next_group_id,
                         kl_coef=run.kl_coef, metrics_row=dict(row) if row is not None else None,
                         rank_sample_rng=run.dist.all_gather_object(run.sample_gen.get_state()),
                         rank_rollout_state=run.dist.all_gather_object(run.engine.state_dict()))
    try:
        run.last_checkpoint = save_checkpoint(run.root, run.step, run.model, run.optimizer, run.scheduler, state,
                                              keep=run.cfg.trainer.max_actor_ckpt_to_keep, dist=run.dist,
                                              export_model=run.rollout_model)
    except OSError as e:
        message = (f"writing checkpoint {run.root / f'global_step_{run.step}'} failed ({e.strerror or e}); the last "
                   f"intact checkpoint is {run.last_checkpoint or 'none'}: free space and rerun the same command to "
                   "resume from it")
        raise (OSError(e.errno, message) if e.errno is not None else OSError(message)) from e
    return run.last_checkpoint


def restore_run(run: Run, path: Path) -> TrainerState:
    """Load ``path`` into the run (weights, optimizer, data cursor, RNG streams, counters); returns its state.
    A CheckpointError when ``path`` holds no RL state (an ``mtprl sft`` checkpoint)."""
    state = load_checkpoint(path, run.model, run.optimizer, run.scheduler)
    if state.next_group_id is None or state.kl_coef is None:
        raise CheckpointError(f"{path} is not an RL checkpoint (no next_group_id / kl_coef: written by mtprl sft?); "
                              f"start an RL run from its weights with actor_rollout_ref.model.path={path / 'actor'}")
    run.loader.load_state_dict(state.loader)
    set_rng_state(state.rng, _generators(run))
    if run.dist.distributed:  # rank r continues its own sampling stream (a rank new to the run: its seed)
        if run.dist.rank < len(state.rank_sample_rng):
            run.sample_gen.set_state(state.rank_sample_rng[run.dist.rank])
        else:
            run.sample_gen.manual_seed(run.cfg.trainer.seed + 1000003 * run.dist.rank)
    if run.dist.rank < len(state.rank_rollout_state):  # (a rank new to the run, or an older checkpoint: fresh)
        run.engine.load_state_dict(state.rank_rollout_state[run.dist.rank])
    run.sync_rollout()  # the engine's copy gets the restored weights
    run.step, run.bad_steps = state.step, state.bad_steps
    run.next_group_id, run.kl_coef = state.next_group_id, state.kl_coef
    run.last_checkpoint = path
    return state
