"""``mtprl sft``: supervised fine-tuning of the trunk and/or the MTP layers (MTP warm-up).

Reads prompt/response parquet (``data.train_files``, ``data.prompt_key``, ``data.response_key``),
trains with token-mean cross-entropy on the response tokens plus, with ``mtp.enable_train``, the MTP
loss of ``mtprl.model.mtp_loss``; ``sft.freeze_trunk=True`` trains the MTP layers alone (the seed's
"train MTP heads from scratch" for a checkpoint that has none). Checkpoints are HF directories under
``trainer.default_local_dir/global_step_<k>/actor``, resumable with ``trainer.resume_mode=auto``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mtprl.config.loader import ConfigError, to_dict
from mtprl.config.schema import MtprlConfig
from mtprl.data import PromptLoader, load_sft_records, tokenize_sft
from mtprl.data.sft import SFT_TRUNCATION_MODES
from mtprl.metrics import Tracker
from mtprl.model import TokenScoring, mtp_loss_from_scores, mtp_valid_counts
from mtprl.trainer.batching import pad_right, split_by_tokens, split_fixed, trim_padding
from mtprl.trainer.checkpoint import (TrainerState, load_checkpoint, resolve_resume, rng_state, save_checkpoint,
                                     set_rng_state)
from mtprl.trainer.optim import build_optimizer, build_scheduler, clip_and_check
from mtprl.trainer.policy import compute_autocast, load_policy, load_policy_tokenizer, resolve_device, set_trainable


def _examples(cfg: MtprlConfig, tokenizer, files):
    records = load_sft_records(files, prompt_key=cfg.data.prompt_key, response_key=cfg.data.response_key)
    return tokenize_sft(records, tokenizer, max_length=cfg.data.max_prompt_length + cfg.data.max_response_length,
                        truncation=cfg.data.truncation)


def sft_loss(model, examples, *, pad_id: int, num_targets: int, train_trunk: bool, train_mtp: bool, cfg: MtprlConfig,
             mtp_counts: list[int] | None = None):
    """Loss of one micro-batch, scaled so that summing over micro-batches gives the token-mean over the
    whole batch (``num_targets`` target tokens; the MTP depths' means over ``mtp_counts``, the whole batch's
    per-depth counts from :func:`batch_mtp_counts`, default: this micro-batch's own). Returns (loss, metrics of
    this micro-batch)."""
    mtp_cfg = cfg.actor_rollout_ref.model.mtp
    device = next(model.parameters()).device
    ids = pad_right([e.input_ids for e in examples], pad_id).to(device)
    loss_mask = pad_right([e.loss_mask for e in examples], 0).to(device)
    attn = pad_right([[1] * len(e.input_ids) for e in examples], 0).to(device)
    if cfg.actor_rollout_ref.model.use_remove_padding:
        ids, loss_mask, attn = trim_padding(ids, loss_mask, attn, attention_mask=attn)
    # the target tokens' log-probs and MTP losses, the head a chunk of positions at a time (model/head.py)
    scoring = TokenScoring(loss_mask, mtp_loss_mask=loss_mask if train_mtp else None, mtp_loss_type=mtp_cfg.loss_type,
                           attention_mask=attn)
    with compute_autocast(cfg.actor_rollout_ref.model, device):  # bf16: mixed precision; the log-softmax in fp32
        out = model(ids, attention_mask=attn, compute_mtp=train_mtp,
                    mtp_detach_encoder=mtp_cfg.detach_encoder or not train_trunk,
                    mtp_detach_head=mtp_cfg.detach_lm_head or not train_trunk,
                    mtp_recursive_steps=mtp_cfg.recursive_steps, scoring=scoring)
    share = float(loss_mask[:, 1:].sum()) / max(num_targets, 1)  # this micro-batch's share of the batch targets
    lm = -out.token_logprobs.sum() / max(num_targets, 1)  # 0 off the loss mask
    loss = lm if train_trunk else lm.detach()
    metrics = {"sft/lm_loss": float(lm.detach())}
    if train_mtp:
        scale = mtp_cfg.mtp_loss_scaling_factor if train_trunk else 1.0
        m_loss, m_metrics = mtp_loss_from_scores(out.mtp_token_losses, out.mtp_token_correct, loss_mask,
                                                 scaling_factor=scale, attention_mask=attn, num_valid=mtp_counts)
        if mtp_counts is None:  # this micro-batch's own means, weighted by its share of the targets
            m_loss, m_metrics = m_loss * share, {k: v * share for k, v in m_metrics.items()}
        loss = loss + m_loss
        metrics.update(m_metrics)
    return loss, metrics


def batch_mtp_counts(model, examples, cfg: MtprlConfig) -> list[int]:
    """The counted positions of each MTP depth over ``examples`` (mtp_valid_counts), for sft_loss's
    ``mtp_counts``: the MTP loss of the batch is then its per-depth mean however it is split."""
    loss_mask = pad_right([e.loss_mask for e in examples], 0)
    depths = model.num_mtp_depths(cfg.actor_rollout_ref.model.mtp.recursive_steps)
    return mtp_valid_counts(loss_mask, depths)  # right padding: every counted target's anchor is a real token


def sft_micro_batches(examples, cfg: MtprlConfig, micro: int | None) -> list[list[int]]:
    """The micro-batches of one SFT step: packed by padded tokens (``sft.use_dynamic_bsz``, at most
    ``sft.max_token_len_per_gpu`` = rows x longest row each; short examples then share a forward, which on the
    demo's mixed 25-165 token sums made a step ~8% faster than 8 sequences per forward), else ``micro`` examples
    each in order of length."""
    if cfg.sft.use_dynamic_bsz:
        return split_by_tokens([len(e.input_ids) for e in examples], cfg.sft.max_token_len_per_gpu)
    return length_sorted_micro_batches(examples, micro)


def length_sorted_micro_batches(examples, micro: int | None) -> list[list[int]]:
    """Micro-batches of ``micro`` examples (the whole batch when None), formed in order of length so that each
    pads to a similar length (mixed lengths padded to the longest of the batch waste up to half the compute).
    The loss is normalised by the whole batch's target count, so the gradient does not depend on the split."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    return [[order[i] for i in group] for group in split_fixed(len(order), micro)]


def run_sft(cfg: MtprlConfig, *, console=None) -> Path:
    """Train; returns the HF directory of the final checkpoint."""
    if cfg.trainer.nnodes * cfg.trainer.n_gpus_per_node > 1:
        raise ConfigError("mtprl sft runs on one process (data-parallel SFT is not built); set trainer.nnodes=1 "
                          "trainer.n_gpus_per_node=1 (multi-rank runs are for mtprl train)")
    mtp_cfg = cfg.actor_rollout_ref.model.mtp
    train_trunk, train_mtp = not cfg.sft.freeze_trunk, mtp_cfg.enable and mtp_cfg.enable_train
    if not train_trunk and not train_mtp:
        raise ConfigError("sft.freeze_trunk=True trains only the MTP layers: set actor_rollout_ref.model.mtp.enable=True "
                          "and actor_rollout_ref.model.mtp.enable_train=True")
    if not cfg.data.train_files:
        raise ConfigError("data.train_files is empty: give SFT parquet files with prompt and response columns")
    if cfg.data.truncation not in SFT_TRUNCATION_MODES:
        raise ConfigError(f"data.truncation={cfg.data.truncation!r} is an RL prompt mode; SFT sequences are cut "
                          "left, right or error (keep the response: left)")
    device = resolve_device(cfg.trainer.device)
    torch.manual_seed(cfg.trainer.seed)
    tokenizer = load_policy_tokenizer(cfg.actor_rollout_ref.model)
    model = load_policy(cfg.actor_rollout_ref.model, device)
    set_trainable(model, trunk=train_trunk, mtp=train_mtp)
    model.train()
    train = _examples(cfg, tokenizer, cfg.data.train_files)
    val = _examples(cfg, tokenizer, cfg.data.val_files) if cfg.data.val_files else []
    loader = PromptLoader(train, batch_size=cfg.data.train_batch_size, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    total = cfg.trainer.total_training_steps or cfg.trainer.total_epochs * len(loader)
    optim_cfg = cfg.actor_rollout_ref.actor.optim
    optimizer = build_optimizer(model, optim_cfg, mtp_cfg.lr)
    scheduler = build_scheduler(optimizer, optim_cfg, total)
    root = Path(cfg.trainer.default_local_dir)
    step, bad_steps = 0, 0
    resume = resolve_resume(root, cfg.trainer.resume_mode, cfg.trainer.resume_from_path)
    if resume is not None:
        state = load_checkpoint(resume, model, optimizer, scheduler)
        step, bad_steps = state.step, state.bad_steps
        loader.load_state_dict(state.loader)
        set_rng_state(state.rng)
    kwargs = dict(pad_id=tokenizer.pad_token_id, train_trunk=train_trunk, train_mtp=train_mtp, cfg=cfg)
    micro = cfg.sft.micro_batch_size_per_gpu
    last_saved = None
    with Tracker(cfg.trainer.logger, root, total_steps=total, console=console, description="sft", config=cfg,
                 keep_through=step if resume is not None else -1) as tracker:  # no duplicate rows after a resume
        batches = iter(loader)
        while step < total:
            batch = next(batches, None)
            if batch is None:
                batches = iter(loader)
                continue
            t0 = time.perf_counter()
            num_targets = sum(sum(e.loss_mask[1:]) for e in batch)
            counts = batch_mtp_counts(model, batch, cfg) if train_mtp else None
            metrics: dict[str, float] = {}
            for group in sft_micro_batches(batch, cfg, micro):
                loss, m = sft_loss(model, [batch[i] for i in group], num_targets=num_targets, mtp_counts=counts,
                                   **kwargs)
                loss.backward()
                for k, v in m.items():
                    metrics[k] = metrics.get(k, 0.0) + v
            grad_norm, finite = clip_and_check(model, optim_cfg.clip_grad)
            lr = scheduler.get_last_lr()[0]  # the lr this step's optimizer step uses
            if finite:
                optimizer.step()
                bad_steps = 0
            else:  # the optimizer step is skipped, the schedule still advances (verl's SFT and RL actors)
                bad_steps += 1
                if bad_steps >= cfg.actor_rollout_ref.actor.max_bad_steps:
                    raise FloatingPointError(f"{bad_steps} consecutive steps with a non-finite gradient norm; "
                                             f"the last good checkpoint is {last_saved or 'none'}; lower the lr")
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - t0
            metrics.update({"actor/grad_norm": grad_norm, "actor/lr": lr,
                            "training/skipped_steps": float(not finite), "timing_s/step": elapsed,
                            "perf/throughput": sum(len(e.input_ids) for e in batch) / elapsed})
            if val and cfg.trainer.test_freq > 0 and (step % cfg.trainer.test_freq == 0 or step == total):
                metrics.update(evaluate_sft(model, val, micro or cfg.data.train_batch_size, **kwargs))
            tracker.log(metrics, step)
            if step == total or (cfg.trainer.save_freq > 0 and step % cfg.trainer.save_freq == 0):
                state = TrainerState(step=step, loader=loader.state_dict(), rng=rng_state(), bad_steps=bad_steps,
                                     config=to_dict(cfg))
                last_saved = save_checkpoint(root, step, model, optimizer, scheduler, state,
                                             keep=cfg.trainer.max_actor_ckpt_to_keep)
    return (last_saved or resume) / "actor"


@torch.no_grad()
def evaluate_sft(model, examples, batch_size: int, **kwargs) -> dict[str, float]:
    """Token-mean validation loss (and MTP accuracies) over ``examples``, prefixed ``val/``."""
    model.eval()
    num_targets = sum(sum(e.loss_mask[1:]) for e in examples)
    counts = batch_mtp_counts(model, examples, kwargs["cfg"]) if kwargs["train_mtp"] else None
    totals: dict[str, float] = {}
    for group in sft_micro_batches(examples, kwargs["cfg"], batch_size):
        _, m = sft_loss(model, [examples[i] for i in group], num_targets=num_targets, mtp_counts=counts, **kwargs)
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + v
    model.train()
    return {f"val/{k}": v for k, v in totals.items()}
