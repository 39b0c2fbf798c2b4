"""Everything the RL loop holds between steps (:class:`Run`) and how it is built from the config; and the
smaller :class:`Evaluation` that validation alone needs (no training data, no optimizer). The parts have
their own homes: the rollout engine and its KV plan :mod:`mtprl.rollout.build`, the reward manager
:mod:`mtprl.reward.build`, multi-rank loading :mod:`mtprl.distributed.loading`, saving and restoring a run
:mod:`mtprl.trainer.checkpoint` (:func:`~mtprl.trainer.checkpoint.save_run` / ``restore_run``)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from rich.console import Console

from mtprl.config.loader import ConfigError
from mtprl.config.schema import MtprlConfig
from mtprl.data import PromptLoader, TokenizedPrompt, build_prompt_dataset
from mtprl.distributed.env import DistEnv, init_distributed
from mtprl.metrics import Tracker
from mtprl.metrics.prometheus import PrometheusExporter
from mtprl.reward.build import build_reward
from mtprl.reward.registry import RewardManager
from mtprl.rollout.build import RolloutEngine, build_engine
from mtprl.trainer.checkpoint import checkpoint_step, load_checkpoint, resolve_resume, restore_run
from mtprl.trainer.optim import build_optimizer, build_scheduler, pending_state_bytes
from mtprl.trainer.policy import load_policy, load_policy_tokenizer, resolve_device, set_trainable

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class DataExhausted(Exception):
    """The configured epochs are used up."""


@dataclass
class Run:
    cfg: MtprlConfig
    device: torch.device
    tokenizer: PreTrainedTokenizerBase
    model: torch.nn.Module  # the policy (FSDP2-sharded with more than one rank)
    ref_model: torch.nn.Module | None  # frozen initial policy, only when a KL term is on (sharded like model)
    engine: RolloutEngine
    reward: RewardManager
    loader: PromptLoader
    val_prompts: list[TokenizedPrompt]  # data.val_files' prompts ([] without val files)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    tracker: Tracker
    exporter: PrometheusExporter | None
    total_steps: int
    root: Path
    sample_gen: torch.Generator  # rollout sampling
    shuffle_gen: torch.Generator  # mini-batch shuffling
    step: int = 0
    next_group_id: int = 0
    kl_coef: float = 0.0
    bad_steps: int = 0
    last_checkpoint: Path | None = None
    dist: DistEnv = field(default_factory=DistEnv)  # this rank (a single process: rank 0 of 1)
    # the engine's own full copy of the weights with more than one rank (refreshed by sync_rollout); None: the
    # engine holds ``model`` itself, so it always sees the current weights
    rollout_model: torch.nn.Module | None = None
    _batches: Iterator | None = field(default=None, repr=False)

    def next_prompts(self) -> list:
        """This rank's share of the next loader batch (``data.gen_batch_size`` prompts; every rank draws
        the same batch and takes every ``world_size``-th prompt, so prompt groups stay whole on a rank),
        rolling over epochs. The run is at most ``trainer.total_epochs`` passes over the data,
        ``trainer.total_training_steps`` or not (verl's epoch loop): past them this raises DataExhausted
        (dynamic sampling may use up the data first)."""
        while True:
            if self.loader.epoch >= self.cfg.trainer.total_epochs:
                raise DataExhausted(f"trainer.total_epochs={self.cfg.trainer.total_epochs} passes over the data done")
            if self._batches is None:
                self._batches = iter(self.loader)
            batch = next(self._batches, None)
            if batch is not None:
                return batch[self.dist.rank::self.dist.world_size]
            self._batches = None

    def sync_rollout(self) -> dict[str, float]:
        """Copy the updated policy (MTP layers included) from the FSDP shards into the engine's weights
        (every rank calls it); nothing to do when the engine holds the policy module itself. A back-end with
        its own copy of the weights (vLLM: ``engine.holds_own_weights``) gets them pushed, on one process too."""
        r = self.cfg.actor_rollout_ref.rollout
        parts = []
        if self.rollout_model is not None:
            from mtprl.distributed.weight_sync import sync_weights

            parts.append(sync_weights(self.model, self.rollout_model, bucket_bytes=r.update_weights_bucket_megabytes << 20))
        if getattr(self.engine, "holds_own_weights", False):
            parts.append(self.engine.sync_weights(self.model, bucket_bytes=r.update_weights_bucket_megabytes << 20))
        if not parts:
            return {}
        return {"timing_s/update_weights": sum(p.seconds for p in parts),
                "perf/update_weights_bytes": float(sum(p.bytes for p in parts)),
                "perf/update_weights_buckets": float(sum(p.num_buckets for p in parts))}

    def release_rollout(self) -> None:
        """``rollout.free_cache_engine``: during the update the engine holds nothing - its KV cache and packed
        weights are dropped (one process and N ranks alike; the next generate call re-allocates and re-packs
        them) and, with several ranks, its weight copy too (refilled by the next :meth:`sync_rollout`)."""
        if not self.cfg.actor_rollout_ref.rollout.free_cache_engine:
            return
        self.engine.release()
        if self.rollout_model is not None:
            from mtprl.distributed.weight_sync import release_weights

            release_weights(self.rollout_model)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # back from the caching allocator, for the update's activations

    def group_ids(self) -> Iterator[int]:
        while True:
            self.next_group_id += 1
            yield self.next_group_id - 1

    def note_step_health(self, skipped_all: bool) -> None:
        """Count consecutive steps whose every optimizer step was skipped (NaN / inf); stop at the limit."""
        self.bad_steps = self.bad_steps + 1 if skipped_all else 0
        limit = self.cfg.actor_rollout_ref.actor.max_bad_steps
        if self.bad_steps >= limit:
            raise FloatingPointError(
                f"{self.bad_steps} consecutive steps had a non-finite loss or gradient norm and were skipped "
                f"(actor_rollout_ref.actor.max_bad_steps={limit}); the last good checkpoint is "
                f"{self.last_checkpoint or 'none (no checkpoint was saved)'}. Lower the learning rate or check the data.")

    def export(self, metrics: dict[str, float]) -> None:
        if self.exporter is not None:
            self.exporter.update({k: v for k, v in metrics.items() if k.startswith("rollout/")}, step=self.step)

    def close(self) -> None:
        """Close tracker, reward workers and Prometheus server; each is closed even when an earlier one
        fails (the first error is raised after)."""
        from mtprl.distributed.env import destroy_distributed

        _close_all([self.tracker.close, self.reward.close] + ([self.exporter.close] if self.exporter is not None else [])
                   + ([self.engine.close] if hasattr(self.engine, "close") else [])  # vLLM: shut its engine down
                   + ([destroy_distributed] if self.dist.distributed else []))


@dataclass
class Evaluation:
    """What validation alone needs (``mtprl eval``, ``trainer.val_only``): no train loader, no optimizer."""

    cfg: MtprlConfig
    tokenizer: PreTrainedTokenizerBase
    model: torch.nn.Module
    engine: RolloutEngine
    reward: RewardManager
    val_prompts: list[TokenizedPrompt]  # data.val_files' prompts
    tracker: Tracker
    step: int  # the validated checkpoint's training step (0 for actor_rollout_ref.model.path)
    checkpoint: Path | None  # the validated checkpoint, None when model.path is validated as it is

    def close(self) -> None:
        _close_all([self.tracker.close, self.reward.close] + ([self.engine.close] if hasattr(self.engine, "close") else []))


def _close_all(closers) -> None:
    """Call every closer even when an earlier one fails; the first error is raised after."""
    error: BaseException | None = None
    for close in closers:
        try:
            close()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the others are closed
            error = error or e
    if error is not None:
        raise error


def _prompt_dataset(cfg: MtprlConfig, tokenizer, files):
    d = cfg.data
    return build_prompt_dataset(files, tokenizer, max_prompt_length=d.max_prompt_length, truncation=d.truncation,
                                filter_overlong_prompts=d.filter_overlong_prompts, prompt_key=d.prompt_key,
                                reward_fn_key=d.reward_fn_key)


def setup(cfg: MtprlConfig, *, console=None) -> Run:
    """Everything for training, resumed per ``trainer.resume_mode`` (model, optimizer, data cursor, RNG;
    the metrics logs are cut back to the resumed step, see :class:`mtprl.metrics.Tracker`)."""
    tr = cfg.trainer
    dist = init_distributed(resolve_device(tr.device).type, timeout_s=tr.collective_timeout_s,
                            expected_world_size=tr.nnodes * tr.n_gpus_per_node)
    torch.manual_seed(tr.seed)
    tokenizer = load_policy_tokenizer(cfg.actor_rollout_ref.model)
    if not cfg.data.train_files:
        raise ConfigError("data.train_files is empty: give RL parquet files in verl's schema")
    # malformed data stops the run here, before any training
    train_set = _prompt_dataset(cfg, tokenizer, cfg.data.train_files)
    val_set = _prompt_dataset(cfg, tokenizer, cfg.data.val_files) if cfg.data.val_files else []
    reward = build_reward(cfg)  # worker processes: closed below if anything after this fails
    try:
        run, resume = _build_run(cfg, dist, tokenizer, train_set, val_set, reward, console)
    except BaseException:
        reward.close()
        raise
    try:
        if resume is not None:
            state = restore_run(run, resume)
            row, seen = state.metrics_row, run.tracker.last_logged_step
            if row and seen is not None and seen < run.step:  # killed between the save and the log of this step
                run.tracker.log(row, run.step)
            run.tracker.log_text("trainer/resume", f"resumed from {resume} (step {run.step})", run.step)
        run.tracker.log_text("data/train", train_set.describe(), run.step)  # how many prompts were filtered / truncated
        if val_set:
            run.tracker.log_text("data/val", val_set.describe(), run.step)
    except BaseException:
        run.close()
        raise
    return run


def setup_evaluation(cfg: MtprlConfig, *, console=None, from_checkpoint: bool = False) -> Evaluation:
    """Model, engine, reward, tracker and validation prompts only. ``from_checkpoint``: validate the
    checkpoint ``trainer.resume_mode`` names (``trainer.val_only``, as verl: auto = the newest complete one
    in ``trainer.default_local_dir``, disable = ``model.path``), else ``model.path`` (``mtprl eval``)."""
    tr = cfg.trainer
    device = resolve_device(tr.device)
    torch.manual_seed(tr.seed)
    tokenizer = load_policy_tokenizer(cfg.actor_rollout_ref.model)
    if not cfg.data.val_files:
        raise ConfigError("data.val_files is empty: evaluation needs validation parquet files in verl's schema")
    val_set = _prompt_dataset(cfg, tokenizer, cfg.data.val_files)
    root = Path(tr.default_local_dir)
    # read-only: a training run may be writing checkpoints into the same folder
    checkpoint = resolve_resume(root, tr.resume_mode, tr.resume_from_path, recover=False) if from_checkpoint else None
    model = load_policy(cfg.actor_rollout_ref.model, device).requires_grad_(False)
    step = load_checkpoint(checkpoint, model).step if checkpoint is not None else 0
    engine = build_engine(cfg, model, console=console)
    reward = build_reward(cfg)
    try:
        tracker = Tracker(tr.logger, root, console=console, description="eval", config=cfg)
        tracker.log_text("data/val", val_set.describe(), step)
    except BaseException:
        reward.close()
        raise
    return Evaluation(cfg=cfg, tokenizer=tokenizer, model=model, engine=engine, reward=reward,
                      val_prompts=val_set.prompts, tracker=tracker, step=step, checkpoint=checkpoint)


def _build_run(cfg: MtprlConfig, dist: DistEnv, tokenizer, train_set, val_set, reward, console
               ) -> tuple[Run, Path | None]:
    """The run before its checkpoint is restored, and the checkpoint to restore (None: a fresh start)."""
    device = dist.device
    mtp, actor, alg = cfg.actor_rollout_ref.model.mtp, cfg.actor_rollout_ref.actor, cfg.algorithm
    with_ref = actor.use_kl_loss or alg.use_kl_in_reward
    if dist.distributed:  # colocated: the engine gets a full copy, training an FSDP2 shard
        from mtprl.distributed.loading import load_sharded_models

        model, ref_model, rollout_model = load_sharded_models(cfg, dist, with_ref)
    else:
        model = load_policy(cfg.actor_rollout_ref.model, device)
        ref_model = copy.deepcopy(model).requires_grad_(False).eval() if with_ref else None
        rollout_model = None
    set_trainable(model, trunk=True, mtp=mtp.enable and mtp.enable_train)  # frozen MTP layers never change
    loader = PromptLoader(train_set.prompts, batch_size=cfg.data.gen_batch_size, seed=cfg.data.seed,
                          shuffle=cfg.data.shuffle)
    epoch_steps = cfg.trainer.total_epochs * len(loader)
    schedule = cfg.trainer.total_training_steps or epoch_steps  # verl: total_training_steps sets the LR schedule
    total = min(schedule, epoch_steps)  # and the run stops at whichever of the two bounds comes first
    optimizer = build_optimizer(model, actor.optim, mtp.lr)
    scheduler = build_scheduler(optimizer, actor.optim, schedule)
    root = Path(cfg.trainer.default_local_dir)
    prom = cfg.actor_rollout_ref.rollout.prometheus
    engine = build_engine(cfg, rollout_model if rollout_model is not None else model,
                          console=console if dist.is_main else Console(quiet=True),
                          pending_bytes=lambda: pending_state_bytes(optimizer))
    # rank 0 picks the checkpoint (finishing an interrupted rename) and tells the others
    resume = dist.broadcast_object(resolve_resume(root, cfg.trainer.resume_mode, cfg.trainer.resume_from_path)
                                   if dist.is_main else None)
    # before the tracker's live bar; rank 0 only (ranks of a node would fight over the port)
    exporter = PrometheusExporter(prom.port, prom.host) if prom.enable and dist.is_main else None
    try:  # rows an earlier run logged past the resumed step (or all, on a fresh start) are dropped
        tracker = Tracker(cfg.trainer.logger, root, total_steps=total, console=console, description="rl", config=cfg,
                          keep_through=checkpoint_step(resume) if resume is not None else -1)
    except BaseException:
        if exporter is not None:  # its server thread holds the port
            exporter.close()
        raise
    # the rollout draws where the engine samples (a CPU generator on a GPU engine copies every draw to the device)
    sample_gen = torch.Generator(device=engine.device).manual_seed(cfg.trainer.seed + 1000003 * dist.rank)
    run = Run(cfg=cfg, device=device, tokenizer=tokenizer, model=model, ref_model=ref_model,
               engine=engine, reward=reward, loader=loader,
               val_prompts=val_set.prompts if val_set else [], optimizer=optimizer, scheduler=scheduler,
               tracker=tracker, exporter=exporter, total_steps=total,
               root=root, sample_gen=sample_gen,
               shuffle_gen=torch.Generator().manual_seed(cfg.trainer.seed + 1), kl_coef=alg.kl_ctrl.kl_coef,
               dist=dist, rollout_model=rollout_model)
    return run, resume
