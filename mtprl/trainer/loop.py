"""The RL loop (DAPO / GRPO with MTP), on one screen: :func:`train` and :func:`rl_step`.

generate (n per prompt, speculative with the MTP layers) -> reward -> dynamic sampling -> old
log-probs (skipped on-policy: the update reuses its own) -> reference log-probs (only with a KL term)
-> advantages -> actor update (policy + MTP)
-> the new weights (MTP layers included) reach the rollout engine: one process shares the policy
module with it; with several ranks (SPMD under Ray or torchrun, see :mod:`mtprl.distributed`) each
rank's engine gets them from the FSDP shards -> validation every ``test_freq`` -> checkpoint every
``save_freq``. Every rank runs this same loop on its share of the prompt groups; the kept samples are
gathered so that each rank holds the global batch, and only rank 0 logs.
As verl: ``timing_s/step`` and ``perf/throughput`` cover the whole step, validation and checkpoint
included; ``val_before_train`` validates at the start of every run, a resumed one too (at its step).
Set-up (model, engine, data, optimizer, resume) lives in :mod:`mtprl.trainer.setup`, checkpoints in
:mod:`mtprl.trainer.checkpoint`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

from mtprl.algorithms import adaptive_kl_coef, apply_kl_in_reward, get_adv_estimator, scores_to_token_rewards
from mtprl.config.schema import MtprlConfig
from mtprl.metrics.clock import device_clock
from mtprl.trainer.checkpoint import save_run
from mtprl.trainer.faults import fault_point
from mtprl.trainer.samples import (SeqFinalRewards, collect_step_samples, gather_step_samples, sample_metrics,
                                   to_train_batch)
from mtprl.trainer.setup import DataExhausted, Run, setup, setup_evaluation
from mtprl.trainer.update import actor_update, compute_logprobs, reuses_current_logprobs
from mtprl.trainer.validate import validate


@contextmanager
def timed(metrics: dict, name: str, device=None):
    """Add the block's wall time to ``timing_s/{name}``; on CUDA (``device``) the GPU work it queued is counted."""
    t0 = device_clock(device)
    yield
    metrics[f"timing_s/{name}"] = metrics.get(f"timing_s/{name}", 0.0) + device_clock(device) - t0


def add_logprobs(run: Run, batch, metrics: dict) -> None:
    """Old log-probs (the rollout's, recomputed, or None on-policy: the update then takes its own, detached)
    and, with a KL term, reference log-probs, in place."""
    cfg = run.cfg
    with timed(metrics, "old_log_prob", run.device):
        if cfg.actor_rollout_ref.actor.use_rollout_log_probs:
            batch.old_logprobs = batch.rollout_logprobs
        elif reuses_current_logprobs(cfg, len(batch)):
            batch.old_logprobs = None  # one epoch, one mini-batch: the update's own forward is the old policy
        else:
            batch.old_logprobs = compute_logprobs(run.model, batch, cfg, dp=run.dist)
    if run.ref_model is not None:
        with timed(metrics, "ref", run.device):
            batch.ref_logprobs = compute_logprobs(run.ref_model, batch, cfg, role="ref", dp=run.dist)


def token_rewards(run: Run, batch):
    """(token rewards [N,T], KL metrics): the score on the last response token, minus β·KL_t on every
    response token with ``algorithm.use_kl_in_reward`` (needs old and reference log-probs)."""
    alg = run.cfg.algorithm
    rewards = scores_to_token_rewards(batch.scores, batch.response_mask)
    if not alg.use_kl_in_reward:
        return rewards, {}
    return apply_kl_in_reward(rewards, batch.old_logprobs, batch.ref_logprobs, batch.response_mask,
                              run.kl_coef, alg.kl_penalty)


def seq_final_rewards(run: Run, metrics: dict) -> SeqFinalRewards | None:
    """Dynamic sampling on ``seq_final_reward`` with KL in the reward (verl computes old / reference
    log-probs of each generation batch before filtering): Σ_t token rewards of a generation batch.
    None otherwise (the value is then the shaped score). The kept batch's log-probs are recomputed."""
    alg = run.cfg.algorithm
    if not (alg.use_kl_in_reward and alg.filter_groups.enable and alg.filter_groups.metric == "seq_final_reward"):
        return None

    def values(samples) -> list[float]:
        batch = to_train_batch(samples, run.tokenizer.pad_token_id).to(run.device)
        add_logprobs(run, batch, metrics)
        return token_rewards(run, batch)[0].sum(dim=-1).tolist()

    return values


def rl_step(run: Run) -> dict[str, float]:
    """One step, generation to actor update; :func:`train` adds validation, checkpoint and the step time."""
    cfg, actor, alg = run.cfg, run.cfg.actor_rollout_ref.actor, run.cfg.algorithm
    filter_timing: dict[str, float] = {}
    samples, metrics = collect_step_samples(cfg, run.engine, run.reward, run.next_prompts, run.sample_gen,
                                            run.tokenizer, run.group_ids(), seq_final_rewards(run, filter_timing),
                                            dist=run.dist)
    fault_point("gen", run.step + 1)
    metrics.update(filter_timing)
    samples, metrics = gather_step_samples(run.dist, samples, metrics, cfg.data.train_batch_size
                                           if alg.filter_groups.enable else None)  # every rank: the global batch
    batch = to_train_batch(samples, run.tokenizer.pad_token_id).to(run.device)
    add_logprobs(run, batch, metrics)
    with timed(metrics, "adv", run.device):
        rewards, kl_metrics = token_rewards(run, batch)  # [N,T]
        metrics.update(kl_metrics)
        if alg.use_kl_in_reward and alg.kl_ctrl.type == "adaptive":
            run.kl_coef = adaptive_kl_coef(run.kl_coef, kl_metrics["actor/reward_kl_penalty"],
                                           alg.kl_ctrl.target_kl, alg.kl_ctrl.horizon, len(batch))
        batch.advantages, _ = get_adv_estimator(alg.adv_estimator)(
            rewards, batch.response_mask, batch.group_ids, norm_by_std=alg.norm_adv_by_std_in_grpo, gamma=alg.gamma)
    lrs = run.scheduler.get_last_lr()  # the lr of this step's optimizer steps (verl logs it before stepping)
    run.release_rollout()  # rollout.free_cache_engine: the engine's memory is the update's meanwhile
    with timed(metrics, "update_actor", run.device):
        update_metrics, skipped = actor_update(run.model, run.optimizer, batch, cfg, run.shuffle_gen, dp=run.dist)
        fault_point("update", run.step + 1)
        run.scheduler.step()
    metrics.update(run.sync_rollout())  # multi-rank: the new weights, MTP layers included, into every engine
    mini = actor.ppo_mini_batch_size * cfg.actor_rollout_ref.rollout.n
    run.note_step_health(skipped_all=skipped >= actor.ppo_epochs * math.ceil(len(batch) / mini))
    metrics.update(update_metrics)
    metrics.update(sample_metrics(samples, cfg.data.max_response_length))
    adv = batch.advantages[batch.response_mask.bool()]
    metrics.update({"critic/advantages/mean": adv.mean().item(), "critic/advantages/max": adv.max().item(),
                    "critic/advantages/min": adv.min().item(), "actor/lr": lrs[0],
                    "training/skipped_optimizer_steps": float(skipped), "training/epoch": float(run.loader.epoch),
                    "perf/total_num_tokens": float(batch.attention_mask.sum())})  # prompt + response tokens trained on
    if len(lrs) > 2:  # mtp.lr: the MTP layers' own groups (optim.build_optimizer)
        metrics["actor/mtp_lr"] = lrs[2]
    return metrics


def train(cfg: MtprlConfig, *, console=None) -> dict[str, float]:
    """Run RL training; returns the last step's metrics (validation included when it ran).
    ``trainer.val_only=True`` only validates (same as :func:`evaluate`)."""
    if cfg.trainer.val_only:
        return evaluate(cfg, console=console, from_checkpoint=True)  # verl: the resumed checkpoint, at its step
    run = setup(cfg, console=console)
    last: dict[str, float] = {}
    try:
        if cfg.trainer.val_before_train and run.val_prompts:  # verl: on resume too, at the resumed step
            last = validate(cfg, run.engine, run.reward, run.val_prompts, run.tokenizer, run.tracker, run.step,
                            run.dist)
            run.tracker.log(last, run.step)
        while run.step < run.total_steps:
            t0 = device_clock(run.device)
            try:
                metrics = rl_step(run)
            except DataExhausted:  # dynamic sampling used up the epochs before total_steps
                if run.last_checkpoint is None or run.last_checkpoint.name != f"global_step_{run.step}":
                    save_run(run)
                break
            run.step += 1
            freq = cfg.trainer.test_freq
            if run.val_prompts and freq > 0 and (run.step % freq == 0 or run.step == run.total_steps):
                with timed(metrics, "testing", run.device):
                    metrics.update(validate(cfg, run.engine, run.reward, run.val_prompts, run.tokenizer,
                                            run.tracker, run.step, run.dist))
            if run.step == run.total_steps or (cfg.trainer.save_freq > 0 and run.step % cfg.trainer.save_freq == 0):
                with timed(metrics, "save_checkpoint", run.device):
                    save_run(run, metrics)  # the row rides along: logged on resume if a kill comes before the log below
            metrics["timing_s/step"] = device_clock(run.device) - t0  # generation to checkpoint, as verl's step timer
            # tokens / s per GPU (rank), as verl: the whole batch's tokens over the step time and the ranks
            per_rank_s = metrics["timing_s/step"] * run.dist.world_size
            metrics["perf/throughput"] = metrics["perf/total_num_tokens"] / per_rank_s
            fault_point("log", run.step)
            run.tracker.log(metrics, run.step)
            run.export(metrics)
            last = metrics
    finally:
        run.close()
    return last


def evaluate(cfg: MtprlConfig, *, console=None, from_checkpoint: bool = False) -> dict[str, float]:
    """Validation only: generate on ``data.val_files`` and score; the row is logged at the validated
    checkpoint's step. ``mtprl eval`` validates ``model.path``; ``from_checkpoint`` (``trainer.val_only``) the
    checkpoint ``trainer.resume_mode`` resumes from (``model.path`` when there is none). No train data,
    loader or optimizer is built, so a validation set smaller than a train batch is fine."""
    ev = setup_evaluation(cfg, console=console, from_checkpoint=from_checkpoint)
    try:
        metrics = validate(cfg, ev.engine, ev.reward, ev.val_prompts, ev.tokenizer, ev.tracker, ev.step)
        ev.tracker.log(metrics, ev.step)
    finally:
        ev.close()
    return metrics
