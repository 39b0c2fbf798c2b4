"""Everything the RL loop holds between steps (:class:`Run`), how it is built from the config, saved
and restored; and the smaller :class:`Evaluation` that validation alone needs (no training data, no
optimizer)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from rich.console import Console

from mtprl.config.loader import ConfigError, to_dict
from mtprl.config.schema import MtprlConfig
from mtprl.data import PromptLoader, build_prompt_dataset
from mtprl.distributed.env import DistEnv, init_distributed
from mtprl.metrics import Tracker
from mtprl.metrics.prometheus import PrometheusExporter
from mtprl.reward.registry import RewardManager, build_reward_manager
from mtprl.trainer.checkpoint import (checkpoint_step, load_checkpoint, resolve_resume, rng_state, save_checkpoint,
                                     set_rng_state)
from mtprl.trainer.optim import build_optimizer, build_scheduler
from mtprl.trainer.policy import compute_dtype, load_policy, load_policy_tokenizer, resolve_device, set_trainable


class DataExhausted(Exception):
    """The configured epochs are used up."""


@dataclass
class Run:
    cfg: MtprlConfig
    device: torch.device
    tokenizer: Any
    model: torch.nn.Module  # the policy (FSDP2-sharded with more than one rank)
    ref_model: torch.nn.Module | None  # frozen initial policy, only when a KL term is on (sharded like model)
    engine: Any
    reward: RewardManager
    loader: PromptLoader
    val_prompts: Any  # PromptDataset or []
    optimizer: torch.optim.Optimizer
    scheduler: Any
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
    tokenizer: Any
    model: torch.nn.Module
    engine: Any
    reward: RewardManager
    val_prompts: Any  # PromptDataset of data.val_files
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


def plan_kv_cache(model_config, rollout_cfg, max_seq_len: int, device, *, dtype: torch.dtype,
                  free_bytes: int | None = None, speculative=None):
    """The rollout engine's KV cache (rows, slots, bytes; nothing allocated) for this config: rows =
    min(rollout.max_num_seqs, what fits the bound), the bound being rollout.gpu_memory_utilization x the free
    memory on CUDA (free_bytes; default torch.cuda.mem_get_info, i.e. what the loaded weights left) and
    rollout.cpu_kv_cache_gb GiB elsewhere. MTP layers are counted when speculative (a SpeculativeConfig) is
    given. A ConfigError naming the key when not one row of max_seq_len (+ speculative slots) fits."""
    from mtprl.rollout.engine import cache_slots
    from mtprl.rollout.kv_cache import GiB, plan_cache

    r, device = rollout_cfg, torch.device(device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] if free_bytes is None else free_bytes
        limit = int(free * r.gpu_memory_utilization)
        key = (f"actor_rollout_ref.rollout.gpu_memory_utilization={r.gpu_memory_utilization} of {free / GiB:.2f} GiB "
               "free")
    else:
        limit = int(r.cpu_kv_cache_gb * GiB)
        key = f"actor_rollout_ref.rollout.cpu_kv_cache_gb={r.cpu_kv_cache_gb}"
    try:
        return plan_cache(model_config, max_num_seqs=r.max_num_seqs, num_slots=cache_slots(max_seq_len, speculative),
                          dtype=dtype, with_mtp=speculative is not None, limit_bytes=limit, limit_name=key,
                          with_history=speculative is not None and speculative.adaptive)
    except ValueError as e:
        raise ConfigError(f"{e} (max_seq_len = data.max_prompt_length + data.max_response_length = "
                          f"{max_seq_len})") from None


def build_engine(cfg: MtprlConfig, model, *, console=None):
    """The rollout engine, its KV cache as plan_kv_cache gives it (one line on the run's console; stderr by
    default, so that a command's stdout stays its output)."""
    from rich.console import Console

    from mtprl.rollout.engine import Engine
    from mtprl.trainer.samples import speculative_config

    r = cfg.actor_rollout_ref.rollout
    if r.name == "vllm":
        from mtprl.rollout.vllm_engine import build_vllm_engine

        return build_vllm_engine(cfg, model, console=console)
    max_seq_len = cfg.data.max_prompt_length + cfg.data.max_response_length
    ref = next(model.parameters())
    spec = speculative_config(cfg)
    plan = plan_kv_cache(model.config, r, max_seq_len, ref.device, dtype=ref.dtype, speculative=spec)
    # without chunked prefill, every admitted prompt is prefilled in one forward
    prefill_tokens = r.max_num_batched_tokens if r.enable_chunked_prefill else plan.rows * max_seq_len
    engine = Engine(model, max_num_seqs=r.max_num_seqs, max_num_batched_tokens=prefill_tokens, max_seq_len=max_seq_len,
                    kv_cache_bytes=plan.limit_bytes)
    line = f"rollout: {plan.describe()} (actor_rollout_ref.rollout.max_num_seqs={r.max_num_seqs})"
    (console or Console(stderr=True)).print(line, highlight=False)
    return engine


def build_reward(cfg: MtprlConfig) -> RewardManager:
    rm, custom = cfg.reward_model, cfg.custom_reward_function
    kwargs = dict(custom_reward_path=custom.path, custom_reward_name=custom.name, use_math_verify=rm.use_math_verify,
                  num_workers=rm.num_workers, timeout_s=rm.timeout_s, failure_score=rm.failure_score)
    if rm.reward_manager == "dapo":
        buf = rm.reward_kwargs.overlong_buffer_cfg
        kwargs.update(max_resp_len=rm.reward_kwargs.max_resp_len,
                      overlong_buffer_cfg=dict(enable=buf.enable, len=buf.len, penalty_factor=buf.penalty_factor, log=buf.log))
    try:
        return build_reward_manager(rm.reward_manager, **kwargs)
    except (FileNotFoundError, AttributeError, ImportError, ValueError) as e:
        raise ConfigError(f"reward set-up failed: {e}") from None


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
            state = restore(run, resume)
            row, seen = state.get("metrics_row"), run.tracker.last_logged_step
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
    step = load_checkpoint(checkpoint, model)["step"] if checkpoint is not None else 0
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
        model, ref_model, rollout_model = _load_sharded(cfg, dist, with_ref)
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
                          console=console if dist.is_main else Console(quiet=True))
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
    run = Run(cfg=cfg, device=device, tokenizer=tokenizer, model=model, ref_model=ref_model,
               engine=engine, reward=reward, loader=loader,
               val_prompts=val_set.prompts if val_set else [], optimizer=optimizer, scheduler=scheduler,
               tracker=tracker, exporter=exporter, total_steps=total,
               root=root, sample_gen=torch.Generator().manual_seed(cfg.trainer.seed + 1000003 * dist.rank),
               shuffle_gen=torch.Generator().manual_seed(cfg.trainer.seed + 1), kl_coef=alg.kl_ctrl.kl_coef,
               dist=dist, rollout_model=rollout_model)
    return run, resume


def _load_sharded(cfg: MtprlConfig, dist: DistEnv, with_ref: bool):
    """(policy, reference or None, rollout copy) of a multi-rank run. The policy and the reference are built on
    the meta device, sharded with FSDP2 (fp32 master weights, the forward in the configured dtype through FSDP's
    mixed precision) and each rank reads only its shard from the checkpoint; the rollout engine's full copy is
    read in the configured dtype directly (no fp32 model on the device, no deep copies)."""
    from mtprl.distributed.loading import load_sharded_policy

    model_cfg, fsdp = cfg.actor_rollout_ref.model, cfg.actor_rollout_ref.actor.fsdp_config
    dtype = compute_dtype(model_cfg)
    cuda = dist.device.type == "cuda"  # CPU: nothing to offload
    model = load_sharded_policy(model_cfg, dist, compute_dtype=dtype,
                                offload=cuda and (fsdp.param_offload or fsdp.optimizer_offload))
    ref_model = None
    if with_ref:
        ref_model = load_sharded_policy(model_cfg, dist, compute_dtype=dtype,
                                        offload=cuda and cfg.actor_rollout_ref.ref.fsdp_config.param_offload)
        ref_model.requires_grad_(False)
    rollout_model = load_policy(model_cfg, dist.device, dtype=dtype).requires_grad_(False).eval()
    return model, ref_model, rollout_model


def _generators(run: Run) -> dict[str, torch.Generator]:
    return {"sample": run.sample_gen, "shuffle": run.shuffle_gen}


def save(run: Run, row: dict[str, float] | None = None) -> Path:
    """Checkpoint ``run.step``. ``row``: that step's metrics so far, kept in the checkpoint so that a run
    killed after the save but before the row was logged logs it on resume. A failed write (full disk)
    stops the run with an OSError naming the checkpoint and the last intact one, which is untouched."""
    state = {"loader": run.loader.state_dict(), "rng": rng_state(_generators(run)), "bad_steps": run.bad_steps,
             "next_group_id": run.next_group_id, "kl_coef": run.kl_coef, "config": to_dict(run.cfg),
             "metrics_row": dict(row) if row is not None else None,
             "rank_sample_rng": run.dist.all_gather_object(run.sample_gen.get_state())}  # per-rank sampling streams
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


def restore(run: Run, path: Path) -> dict[str, Any]:
    """Load ``path`` into the run; returns the saved trainer state."""
    state = load_checkpoint(path, run.model, run.optimizer, run.scheduler)
    run.loader.load_state_dict(state["loader"])
    set_rng_state(state["rng"], _generators(run))
    streams = state.get("rank_sample_rng") or []
    if run.dist.distributed:  # rank r continues its own sampling stream (a rank new to the run: its seed)
        if run.dist.rank < len(streams):
            run.sample_gen.set_state(streams[run.dist.rank])
        else:
            run.sample_gen.manual_seed(run.cfg.trainer.seed + 1000003 * run.dist.rank)
    run.sync_rollout()  # the engine's copy gets the restored weights
    run.step, run.bad_steps = state["step"], state["bad_steps"]
    run.next_group_id, run.kl_coef = state["next_group_id"], state["kl_coef"]
    run.last_checkpoint = path
    return state
