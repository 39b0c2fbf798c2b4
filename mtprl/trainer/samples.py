"""Generation -> reward -> dynamic sampling: the samples of one RL step, and their tensors.

A :class:`Sample` is one sampled response with everything the later stages need; the loop turns a
list of them into a :class:`~mtprl.trainer.update.TrainBatch`.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterator, Sequence

import torch

from mtprl.algorithms import DynamicSamplingAccumulator
from mtprl.config.schema import MtprlConfig
from mtprl.reward.registry import RewardInput, RewardManager
from mtprl.rollout.types import RolloutMetrics, SamplingParams, SpeculativeConfig
from mtprl.trainer.batching import pad_right
from mtprl.trainer.policy import eos_token_ids
from mtprl.trainer.update import TrainBatch


class Status(Enum):
    COMPLETED = "completed"  # ended with a stop token
    TRUNCATED = "truncated"  # hit max_response_length


@dataclass
class Sample:
    """One sampled response.

    group_id: same id = same prompt draw in this step.  prompt: the data-set item (TokenizedPrompt).
    response_ids: generated ids (stop token included when hit).  rollout_logprobs: the trunk's
    log-probs of those ids at the sampling temperature, one per id.  score: final reward (overlong
    shaping included); raw_score: the scorer's score before the shaping; acc: correctness;
    reward_extra: the scorer's other fields (pred, ...).
    """

    group_id: int
    prompt: Any
    response_ids: list[int]
    rollout_logprobs: list[float]
    status: Status
    response_text: str = ""
    score: float = 0.0
    raw_score: float = 0.0
    acc: float = 0.0
    reward_extra: dict[str, Any] = field(default_factory=dict)


def sampling_params(cfg: MtprlConfig, tokenizer, *, validation: bool = False) -> SamplingParams:
    r = cfg.actor_rollout_ref.rollout
    src = r.val_kwargs if validation else r
    greedy = not src.do_sample or src.temperature == 0
    return SamplingParams(temperature=0.0 if greedy else src.temperature, top_p=src.top_p,
                          top_k=max(src.top_k, 0), max_new_tokens=cfg.data.max_response_length,
                          stop_token_ids=eos_token_ids(cfg.actor_rollout_ref.model.path, tokenizer), n=src.n)


def speculative_config(cfg: MtprlConfig) -> SpeculativeConfig | None:
    mtp = cfg.actor_rollout_ref.model.mtp
    if not (mtp.enable and mtp.enable_rollout):
        return None
    return SpeculativeConfig(num_steps=mtp.speculative_num_steps, eagle_topk=mtp.speculative_eagle_topk,
                             num_draft_tokens=mtp.speculative_num_draft_tokens if mtp.speculative_eagle_topk > 1 else None,
                             adaptive=mtp.adaptive, draft_temperature=mtp.speculative_draft_temperature)


def generate_samples(engine, prompts: Sequence[Any], params: SamplingParams, spec, generator, tokenizer,
                     group_ids: Iterator[int]) -> tuple[list[Sample], RolloutMetrics]:
    """Generate ``params.n`` responses per prompt; one group id per prompt."""
    out = engine.generate_with_metrics([p.prompt_ids for p in prompts], params, speculative=spec, generator=generator)
    gids = [next(group_ids) for _ in prompts]
    samples = [
        Sample(group_id=gids[c.prompt_index], prompt=prompts[c.prompt_index], response_ids=list(c.token_ids),
               rollout_logprobs=list(c.trunk_logprobs),
               status=Status.COMPLETED if c.finish_reason == "stop" else Status.TRUNCATED,
               response_text=tokenizer.decode(c.token_ids, skip_special_tokens=True))
        for c in out.completions
    ]
    return samples, out.metrics


def score_samples(manager: RewardManager, samples: list[Sample]) -> dict[str, float]:
    """Fill score / acc / reward_extra in place; returns the reward metrics."""
    inputs = [RewardInput(response=s.response_text, ground_truth=s.prompt.record.ground_truth,
                          data_source=s.prompt.record.data_source, response_length=len(s.response_ids),
                          extra_info=dict(s.prompt.record.extra_info or {})) for s in samples]
    out = manager(inputs)
    for i, s in enumerate(samples):
        s.score, s.raw_score = out.scores[i], out.raw_scores[i]
        s.acc = float(out.extra["acc"][i])
        s.reward_extra = {k: v[i] for k, v in out.extra.items() if k != "acc"}
    return out.metrics


SeqFinalRewards = Callable[[list[Sample]], list[float]]  # samples -> sum of their token rewards after KL-in-reward


def filter_metric_values(samples: Sequence[Sample], metric: str,
                         seq_final_rewards: SeqFinalRewards | None = None) -> list[float]:
    """The per-sample value dynamic sampling groups on (``algorithm.filter_groups.metric``), as verl's
    ``RayDAPOTrainer``: ``acc``; ``score`` = the scorer's own score (``reward_extra_info["score"]``,
    before the overlong shaping); ``seq_reward`` = Σ_t token-level scores = the shaped score (it sits on
    the last token); ``seq_final_reward`` = Σ_t token-level rewards after the KL-in-reward penalty:
    ``seq_final_rewards(samples)`` when KL is in the reward, else the shaped score again."""
    if metric == "acc":
        return [float(s.acc) for s in samples]
    if metric == "score":
        return [s.raw_score for s in samples]
    if metric == "seq_final_reward" and seq_final_rewards is not None:
        return list(seq_final_rewards(list(samples)))
    if metric in ("seq_reward", "seq_final_reward"):
        return [s.score for s in samples]
    raise ValueError(f"algorithm.filter_groups.metric={metric!r}: expected acc, score, seq_reward or seq_final_reward")


def merge_reward_metrics(parts: Sequence[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """The reward metrics of several scored batches, each (number of samples, metrics), as one batch's:
    the ``*/mean`` entries averaged over all samples, the others (``reward/num_*`` counts) summed."""
    total = sum(n for n, _ in parts)
    out: dict[str, float] = {}
    for n, metrics in parts:
        for k, v in metrics.items():
            out[k] = out.get(k, 0.0) + (v * n / max(total, 1) if k.endswith("/mean") else v)
    return out


def collect_step_samples(cfg: MtprlConfig, engine, manager, next_prompts, generator, tokenizer,
                         group_ids: Iterator[int], seq_final_rewards: SeqFinalRewards | None = None,
                         dist=None) -> tuple[list[Sample], dict[str, float]]:
    """Generate + score batches of ``data.gen_batch_size`` prompts until the step has its samples:
    one batch without dynamic sampling; with it, batches until ``train_batch_size`` groups whose
    metric varies (or that hold one sample) are kept (``max_num_gen_batches`` bounds the tries).
    The rollout and reward metrics cover every generation batch of the step (summed counts, means
    over all of them); ``seq_final_rewards``: see :func:`filter_metric_values`. With data parallelism
    (``dist``) each rank generates its share of every batch and dynamic sampling counts the groups kept
    on all ranks, so every rank stops after the same batch; the samples stay local (see
    :func:`gather_step_samples`)."""
    params, spec = sampling_params(cfg, tokenizer), speculative_config(cfg)
    fg = cfg.algorithm.filter_groups
    count = None
    if dist is not None and dist.distributed:
        def count(n: int) -> int:
            return int(dist.all_reduce([float(n)])[0])
    acc = DynamicSamplingAccumulator(target_num_groups=cfg.data.train_batch_size, count_kept=count,
                                     max_num_gen_batches=fg.max_num_gen_batches) if fg.enable else None
    timing = {"timing_s/gen": 0.0, "timing_s/reward": 0.0}
    rollout: list[RolloutMetrics] = []
    rewards: list[tuple[int, dict[str, float]]] = []
    while True:
        prompts = next_prompts()  # data.gen_batch_size prompts
        t0 = time.perf_counter()
        samples, r_metrics = generate_samples(engine, prompts, params, spec, generator, tokenizer, group_ids)
        t1 = time.perf_counter()
        rewards.append((len(samples), score_samples(manager, samples)))
        timing["timing_s/gen"] += t1 - t0
        timing["timing_s/reward"] += time.perf_counter() - t1
        rollout.append(r_metrics)
        if acc is None:
            break
        acc.add(samples, filter_metric_values(samples, fg.metric, seq_final_rewards), [s.group_id for s in samples])
        if acc.done:
            samples = acc.samples()
            break
    merged = RolloutMetrics.merge(rollout)
    if dist is not None and dist.distributed:  # exact over ranks (counts summed, rates from the summed counts)
        merged = RolloutMetrics.merge_ranks(dist.all_gather_object(merged))
    metrics = {**merge_reward_metrics(rewards), **merged.as_dict(), **timing}
    if acc is not None:
        metrics.update(acc.metrics())
    return samples, metrics


def gather_step_samples(dist, samples: list[Sample], metrics: dict[str, float], num_groups: int | None
                        ) -> tuple[list[Sample], dict[str, float]]:
    """Every rank's samples of the step (rank 0's first; the first ``num_groups`` groups when dynamic
    sampling kept more over all ranks) and the step's metrics reduced over ranks; the identity on one
    process."""
    from mtprl.distributed.gather import gather_groups, reduce_metrics

    if dist is None or not dist.distributed:
        return samples, metrics
    rollout = {k: v for k, v in metrics.items() if k.startswith("rollout/")}  # already over all ranks
    metrics = {**reduce_metrics(dist, {k: v for k, v in metrics.items() if k not in rollout},
                                weight=float(len(samples))), **rollout}
    samples = gather_groups(dist, samples)
    if num_groups is not None:
        keep: set[int] = set()
        for s in samples:
            if s.group_id not in keep and len(keep) < num_groups:
                keep.add(s.group_id)
        samples = [s for s in samples if s.group_id in keep]
    return samples, metrics


def to_train_batch(samples: Sequence[Sample], pad_id: int) -> TrainBatch:
    """Tensors of the step: ``[prompt][response][pad]`` rows, the score on every sample."""
    seqs = [list(s.prompt.prompt_ids) + s.response_ids for s in samples]
    attn = pad_right([[1] * len(x) for x in seqs], 0)
    resp = pad_right([[0] * len(s.prompt.prompt_ids) + [1] * len(s.response_ids) for s in samples], 0)
    logprobs = torch.zeros(attn.shape)
    for i, s in enumerate(samples):
        start = len(s.prompt.prompt_ids)
        logprobs[i, start:start + len(s.rollout_logprobs)] = torch.tensor(s.rollout_logprobs)
    return TrainBatch(input_ids=pad_right(seqs, pad_id), attention_mask=attn, response_mask=resp,
                      group_ids=torch.tensor([s.group_id for s in samples]),
                      scores=torch.tensor([s.score for s in samples], dtype=torch.float32),
                      rollout_logprobs=logprobs)


def sample_metrics(samples: Sequence[Sample], max_response_length: int) -> dict[str, float]:
    """verl's data metrics of the step's kept samples."""
    scores = torch.tensor([s.score for s in samples])
    resp = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.float32)
    prompt = torch.tensor([len(s.prompt.prompt_ids) for s in samples], dtype=torch.float32)
    return {
        "critic/score/mean": scores.mean().item(), "critic/score/max": scores.max().item(),
        "critic/score/min": scores.min().item(),
        "critic/acc/mean": sum(s.acc for s in samples) / len(samples),
        "response_length/mean": resp.mean().item(), "response_length/max": resp.max().item(),
        "response_length/min": resp.min().item(),
        "response_length/clip_ratio": (resp >= max_response_length).float().mean().item(),
        "prompt_length/mean": prompt.mean().item(),
    }


def counter(start: int) -> Iterator[int]:
    return itertools.count(start)
