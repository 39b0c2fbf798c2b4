"""The actor update: policy loss (+ KL loss, entropy bonus) and the MTP loss, over mini- and micro-batches.

One RL step's samples are split into mini-batches of ``ppo_mini_batch_size x rollout.n`` samples (one
optimizer step each, ``ppo_epochs`` passes); each mini-batch into micro-batches (a fixed
``ppo_micro_batch_size_per_gpu``, or packed by ``ppo_max_token_len_per_gpu`` with ``use_dynamic_bsz``).
Micro-batch losses use the mini-batch's token / sequence counts as normalisers, so their gradients sum
to exactly the mini-batch loss's gradient whatever the split.

On-policy steps (:func:`reuses_current_logprobs`: one PPO epoch and one mini-batch) need no old-policy
forward: the update's first and only forward IS the old policy, so the old log-probs are its own log-probs,
detached (``TrainBatch.old_logprobs = None``; verl's ``on_policy`` branch of ``update_policy``, TRL's
``old_per_token_logps = per_token_logps.detach()``). The ratio is then exactly 1 in value, its gradient
is the policy gradient, and the result is bit-for-bit the recompute path's whenever the recompute runs the
same micro-batches (tests/trainer/test_update.py); otherwise verl's recompute is kept.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields, replace

import torch

from mtprl.algorithms import aggregate_loss, count_normalisers, kl_loss, policy_loss
from mtprl.config.schema import MtprlConfig
from mtprl.distributed.balance import partition_by_tokens
from mtprl.model import TokenScoring, mtp_loss_from_scores, mtp_valid_counts
from mtprl.trainer.batching import shared_prompt_tokens, split_by_tokens, split_fixed, trim_padding
from mtprl.trainer.optim import clip_and_check
from mtprl.trainer.policy import compute_autocast


@dataclass
class TrainBatch:
    """The samples of one RL step as tensors. N samples, T = longest prompt + response.

    input_ids [N,T]: prompt then response tokens, right-padded.
    attention_mask [N,T]: 1 = real token.  response_mask [N,T]: 1 = a generated token the loss is taken on.
    group_ids [N]: same id = same prompt.  scores [N]: final reward of each sample.
    rollout_logprobs [N,T]: the rollout engine's trunk log-probs of the response tokens (0 elsewhere).
    old_logprobs / ref_logprobs / advantages [N,T]: filled in by the loop before the update; old_logprobs None =
    on-policy, the update takes its own log-probs, detached (see :func:`reuses_current_logprobs`).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    group_ids: torch.Tensor
    scores: torch.Tensor
    rollout_logprobs: torch.Tensor
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    advantages: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: list[int] | torch.Tensor) -> "TrainBatch":
        idx = torch.as_tensor(rows, dtype=torch.long)
        return replace(self, **{f.name: getattr(self, f.name)[idx] for f in fields(self)
                                if getattr(self, f.name) is not None})

    def to(self, device: torch.device) -> "TrainBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if getattr(self, f.name) is not None})


def reuses_current_logprobs(cfg: MtprlConfig, num_samples: int) -> bool:
    """True when the update takes one optimizer step on the whole batch of ``num_samples`` samples (one PPO
    epoch, one mini-batch), so the policy it starts from is the old policy: no old-log-prob forward is needed
    unless something reads the old log-probs before the update (KL in the reward, or the rollout's log-probs
    asked for instead)."""
    actor = cfg.actor_rollout_ref.actor
    mini = actor.ppo_mini_batch_size * cfg.actor_rollout_ref.rollout.n
    return (actor.ppo_epochs == 1 and num_samples <= mini and not actor.use_rollout_log_probs
            and not cfg.algorithm.use_kl_in_reward)


def micro_batches(batch: TrainBatch, cfg: MtprlConfig, role: str = "actor") -> list[list[int]]:
    """Row groups for the forwards of ``role``: "actor" (the update), "rollout" (old log-probs) or "ref"
    (reference log-probs); the latter two use their ``log_prob_*`` settings, falling back to the actor's."""
    actor = cfg.actor_rollout_ref.actor
    dynamic, max_tokens, micro = actor.use_dynamic_bsz, actor.ppo_max_token_len_per_gpu, actor.ppo_micro_batch_size_per_gpu
    if role != "actor":
        own = getattr(cfg.actor_rollout_ref, role)
        if own.log_prob_use_dynamic_bsz:
            dynamic, max_tokens = True, own.log_prob_max_token_len_per_gpu
        elif own.log_prob_micro_batch_size_per_gpu is not None:
            dynamic, micro = False, own.log_prob_micro_batch_size_per_gpu
    if dynamic:
        return split_by_tokens(batch.attention_mask.sum(-1).tolist(), max_tokens)
    return split_fixed(len(batch), micro)


def _inputs(mb: TrainBatch, cfg: MtprlConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, response_mask) of a micro-batch, [B,T'] with all-padding columns dropped
    (``use_remove_padding``)."""
    ids, attn, resp = mb.input_ids, mb.attention_mask, mb.response_mask
    if cfg.actor_rollout_ref.model.use_remove_padding:
        ids, attn, resp = trim_padding(ids, attn, resp, attention_mask=attn)
    return ids, attn, resp


def _forward(model, mb: TrainBatch, cfg: MtprlConfig, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *,
             compute_mtp: bool, scoring: TokenScoring):
    """The model on ``inputs`` (``_inputs(mb)``), returning the token scores ``scoring`` asks for: the output head
    runs on chunks of the scored positions inside the model's call, never on the micro-batch's [B,T,V] logits
    (``mtprl.model.head``)."""
    ids, attn, resp = inputs
    mtp = cfg.actor_rollout_ref.model.mtp
    shared = (shared_prompt_tokens(ids, attn, resp, mb.group_ids) if cfg.actor_rollout_ref.actor.use_prefix_grouper
              else None)  # each group's prompt through the trunk once, padding never
    with _autocast(model, cfg, ids.device):  # bf16 mixed precision: the matmuls in bf16, the log-softmax in fp32
        return model(ids, attention_mask=attn, compute_mtp=compute_mtp, mtp_detach_encoder=mtp.detach_encoder,
                     mtp_detach_head=mtp.detach_lm_head, mtp_recursive_steps=mtp.recursive_steps, unique_tokens=shared,
                     scoring=scoring)


def _autocast(model, cfg: MtprlConfig, device: torch.device):
    """bf16 autocast for ``model.dtype=bfloat16`` on one process; an FSDP-sharded model already computes in
    that dtype through its MixedPrecisionPolicy (and fp32 needs nothing)."""
    from mtprl.distributed.parallelize import is_sharded

    if is_sharded(model):
        return contextlib.nullcontext()
    return compute_autocast(cfg.actor_rollout_ref.model, device)


def _rank_rows(batch: TrainBatch, dp) -> list[list[int]]:
    """Rows of ``batch`` per data-parallel rank, balanced by token count ([all rows] on one process)."""
    if dp is None or not dp.distributed:
        return [list(range(len(batch)))]
    return partition_by_tokens(batch.attention_mask.sum(-1).tolist(), dp.world_size)


def _rank_micro_batches(batch: TrainBatch, cfg: MtprlConfig, dp, role: str) -> tuple[list[int], list[list[int] | None]]:
    """(this rank's rows, its micro-batches as indices into ``batch``) padded with ``None`` (a dummy
    forward) up to the largest count of any rank: FSDP's per-layer all-gathers are collectives, so every
    rank must run the same number of forwards and backwards. Every rank computes every rank's split
    from the global batch it holds, so no collective is needed to agree on the count."""
    parts = _rank_rows(batch, dp)
    splits = [[[part[i] for i in g] for g in micro_batches(batch.select(part), cfg, role)] if part else []
              for part in parts]
    mine = splits[dp.rank if dp is not None and dp.distributed else 0]
    return parts[dp.rank if dp is not None and dp.distributed else 0], mine + [None] * (max(map(len, splits)) - len(mine))


@torch.no_grad()
def compute_logprobs(model, batch: TrainBatch, cfg: MtprlConfig, role: str = "rollout", dp=None) -> torch.Tensor:
    """[N,T] log-probs of every token under ``model`` at the rollout temperature; ``role`` "rollout" (old
    policy) or "ref" picks the micro-batch settings. With data parallelism (``dp``) each rank scores its
    share of the global batch and the rows are summed over ranks, so every rank returns the whole [N,T]."""
    temperature = cfg.actor_rollout_ref.rollout.temperature or 1.0
    out = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=batch.input_ids.device)
    _, groups = _rank_micro_batches(batch, cfg, dp, role)
    for rows in groups:
        mb = batch.select(rows if rows is not None else [0])
        ids, attn, resp = _inputs(mb, cfg)
        res = _forward(model, mb, cfg, (ids, attn, resp), compute_mtp=False,
                       scoring=TokenScoring(attn, temperature=temperature))  # every real token
        if rows is not None:
            out[torch.as_tensor(rows), : ids.shape[1]] = res.token_logprobs
    if dp is not None and dp.distributed:  # each row is non-zero on exactly one rank: the sum is exact
        torch.distributed.all_reduce(out)
    return out * batch.attention_mask


def _micro_loss(model, mb: TrainBatch, cfg: MtprlConfig, norms: tuple[int, int], mtp_counts: list[int] | None):
    """Loss of one micro-batch (normalised by the mini-batch counts ``norms``, and its MTP loss by the
    mini-batch's per-depth counts ``mtp_counts``; None: no MTP training) and its metrics."""
    train_mtp = mtp_counts is not None
    actor, mtp_cfg = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.model.mtp
    temperature = cfg.actor_rollout_ref.rollout.temperature or 1.0
    ids, attn, resp = _inputs(mb, cfg)
    # the response tokens' log-probs and entropies (a metric without a graph unless it is a bonus), and the MTP
    # losses at their positions: every value the losses below read (they mask everything else out)
    scoring = TokenScoring(resp, temperature=temperature, entropy="grad" if actor.entropy_coeff else "detached",
                           mtp_loss_mask=resp if train_mtp else None, mtp_loss_type=mtp_cfg.loss_type,
                           attention_mask=attn)
    out = _forward(model, mb, cfg, (ids, attn, resp), compute_mtp=train_mtp, scoring=scoring)
    width = ids.shape[1]
    logp, entropy = out.token_logprobs, out.token_entropy
    old = logp.detach() if mb.old_logprobs is None else mb.old_logprobs[:, :width]  # None: on-policy, see above
    adv = mb.advantages[:, :width]
    # seq-mean-token-sum-norm divides by a constant T: verl's mask width is max_response_length (responses are
    # padded to it), and one constant for every micro-batch keeps the split exact.
    scale = (actor.loss_scale_factor or cfg.data.max_response_length) if actor.loss_agg_mode == "seq-mean-token-sum-norm" else None
    agg = dict(loss_scale_factor=scale, global_num_tokens=norms[0], global_num_seqs=norms[1])
    pg, pg_metrics = policy_loss(old, logp, adv, resp, actor.clip_ratio_low, actor.clip_ratio_high,
                                 actor.clip_ratio_c, actor.loss_agg_mode, **agg)
    share = float(resp.sum()) / max(norms[0], 1)  # this micro-batch's share of the mini-batch tokens
    ent = aggregate_loss(entropy, resp, actor.loss_agg_mode, **agg)
    loss = pg - actor.entropy_coeff * ent
    metrics = {"actor/pg_loss": float(pg.detach()), "actor/entropy": float(ent.detach())}
    metrics.update({f"actor/{k}": float(v) * share for k, v in pg_metrics.items()})
    if actor.use_kl_loss:
        kl = kl_loss(logp, mb.ref_logprobs[:, :width], resp, actor.kl_loss_type, actor.loss_agg_mode, **agg)
        loss = loss + actor.kl_loss_coef * kl
        metrics["actor/kl_loss"] = float(kl.detach())
        metrics["actor/kl_coef"] = actor.kl_loss_coef * share
    if train_mtp:
        # num_valid: the mini-batch's counts, so this is already this micro-batch's part of the mini-batch's loss
        m_loss, m_metrics = mtp_loss_from_scores(out.mtp_token_losses, out.mtp_token_correct, resp,
                                                 scaling_factor=mtp_cfg.mtp_loss_scaling_factor, attention_mask=attn,
                                                 num_valid=mtp_counts)
        loss = loss + m_loss
        metrics.update(m_metrics)
    return loss, metrics


def actor_update(model, optimizer, batch: TrainBatch, cfg: MtprlConfig, generator: torch.Generator,
                 dp=None) -> tuple[dict, int]:
    """ppo_epochs x mini-batches of optimizer steps on ``batch``. Returns (metrics averaged over optimizer
    steps, number of skipped steps: a non-finite loss or gradient norm skips that optimizer step).

    With data parallelism (``dp``, an FSDP-sharded ``model``) every rank holds the same global ``batch``
    and draws the same mini-batch order; each mini-batch is split over ranks by token count, each rank's
    loss is normalised by the global mini-batch counts and FSDP sums the gradients, so N ranks take the
    optimizer steps one process would take on the same batch."""
    actor, rollout = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout
    mtp = cfg.actor_rollout_ref.model.mtp
    train_mtp = mtp.enable and mtp.enable_train and model.config.num_mtp_layers > 0
    mini_size = actor.ppo_mini_batch_size * rollout.n
    totals: dict[str, float] = {}
    num_steps, skipped = 0, 0
    model.train()
    for _ in range(actor.ppo_epochs):
        order = torch.randperm(len(batch), generator=generator) if actor.shuffle else torch.arange(len(batch))
        for start in range(0, len(batch), mini_size):
            mini = batch.select(order[start:start + mini_size])
            norms = count_normalisers(mini.response_mask)  # global: every rank holds the whole mini-batch
            mtp_counts = (mtp_valid_counts(mini.response_mask, model.num_mtp_depths(mtp.recursive_steps),
                                           mini.attention_mask) if train_mtp else None)
            step_metrics: dict[str, float] = {}
            _, groups = _rank_micro_batches(mini, cfg, dp, "actor")
            for rows in groups:
                if rows is None:  # dummy: keeps this rank in step with the others' collectives, adds nothing
                    mb = mini.select([0])
                    mb.response_mask = torch.zeros_like(mb.response_mask)
                else:
                    mb = mini.select(rows)
                loss, m = _micro_loss(model, mb, cfg, norms, mtp_counts)
                if rows is None:
                    loss, m = loss * 0.0, {}
                if not math.isfinite(float(loss.detach())):
                    step_metrics["actor/nonfinite_loss"] = 1.0
                loss.backward()
                for k, v in m.items():
                    step_metrics[k] = step_metrics.get(k, 0.0) + v
            step_metrics = _reduce_step_metrics(step_metrics, dp)
            grad_norm, finite = clip_and_check(model, actor.optim.clip_grad)
            if finite and "actor/nonfinite_loss" not in step_metrics:
                optimizer.step()
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
            step_metrics["actor/grad_norm"] = grad_norm
            num_steps += 1
            for k, v in step_metrics.items():
                totals[k] = totals.get(k, 0.0) + v
    model.eval()
    metrics = {k: v / num_steps for k, v in totals.items() if k != "actor/nonfinite_loss"}
    return metrics, skipped


def _reduce_step_metrics(step_metrics: dict[str, float], dp) -> dict[str, float]:
    """Sum the micro-batch metrics over ranks: each is already weighted by its share of the global
    mini-batch (and a non-finite loss on any rank flags the step on every rank)."""
    if dp is None or not dp.distributed:
        return step_metrics
    keys = sorted(set().union(*dp.all_gather_object(sorted(step_metrics))))
    summed = dp.all_reduce([step_metrics.get(k, 0.0) for k in keys])
    return {k: v for k, v in zip(keys, summed) if k != "actor/nonfinite_loss" or v > 0}
