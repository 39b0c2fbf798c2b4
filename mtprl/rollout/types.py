"""Typed records the rollout engine takes and returns (SamplingParams, SpeculativeConfig, Completion,
RolloutMetrics). Every field is documented once, here.

Logprob convention (decided for the RL trainer, see docs/rollout.md):
  * `Completion.logprobs[i]` = log q(token_i), q the PROCESSED sampling distribution the token was drawn
    from: softmax(logits / temperature) restricted by top-k then top-p and renormalised (SPEC §3: "under the
    sampling distribution"; verl's vLLM rollout returns the same kind of value). Greedy (temperature 0): q is
    the one-hot of the argmax, so every logprob is 0.0.
  * `Completion.trunk_logprobs[i]` = log_softmax(logits / T)[token_i] with T = temperature (T = 1 when
    temperature is 0), WITHOUT top-k / top-p truncation: exactly what the trainer's forward computes
    (`log_softmax(logits / temperature)`), so `old_logprobs` can be taken from the rollout when the weights
    are the same. At temperature 1 this is the raw model logprob.
Both are computed from the TRUNK's logits (also under speculative decoding, where they come from the
verification forward), never from the draft.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """How to sample continuations.

    temperature: 0 = greedy (argmax); > 0 divides the logits.
    top_p: nucleus sampling, keep the smallest set of most likely tokens whose probability sums to >= top_p
        (1.0 = off). Applied after top_k.
    top_k: keep the k most likely tokens (0 = off; tokens tied with the k-th are kept too).
    max_new_tokens: generation stops with finish_reason "length" after this many new tokens (or when the
        sequence reaches the engine's max_seq_len).
    stop_token_ids: generation stops with finish_reason "stop" right after emitting one of these (the stop
        token is included in Completion.token_ids). Usually the tokenizer's eos id(s).
    n: number of independent samples per prompt (GRPO group size).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            raise ValueError(f"n (samples per prompt) must be >= 1, got {self.n}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding with the model's own MTP layers as drafter (config keys of SPEC §2.1 in brackets).

    num_steps [speculative_num_steps]: draft depth K (tokens drafted along one path). Depths 1..D use MTP
        layers 1..D; deeper steps reuse the last MTP layer recursively (EAGLE style).
    eagle_topk [speculative_eagle_topk]: children per tree node; 1 = a chain of K drafts.
    num_draft_tokens [speculative_num_draft_tokens]: tokens verified by one trunk forward, the last committed
        token included (the tree's root), so the tree has num_draft_tokens - 1 draft nodes. None = 1 + K for a
        chain, 1 + K * eagle_topk for a tree. A chain needs exactly 1 + K.
    adaptive: pick the draft depth (0..num_steps, 0 = plain decoding) for every decode step from the running
        per-depth acceptance and step costs predicted from the model's shapes (see adaptive.AdaptiveDepth: the
        choices never read a clock, so the same seed gives the same samples on every run).
    draft_temperature [speculative_draft_temperature]: the temperature drafts are drawn at (top-k / top-p as the
        sampling's); None = the sampling temperature. Exact at any value: acceptance uses the distribution each
        draft was drawn from, so only the acceptance rate changes, never what is sampled. Below the sampling
        temperature the drafts keep to the draft's likeliest tokens, which helps where the draft is a flatter
        copy of the target (and can hurt where it is already sharp). Greedy decoding ignores it.
    """

    num_steps: int = 2
    eagle_topk: int = 1
    num_draft_tokens: int | None = None
    adaptive: bool = False
    draft_temperature: float | None = None

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"speculative num_steps must be >= 1, got {self.num_steps}")
        if self.eagle_topk < 1:
            raise ValueError(f"eagle_topk must be >= 1, got {self.eagle_topk}")
        if self.draft_temperature is not None and not self.draft_temperature > 0:
            raise ValueError(f"draft_temperature must be > 0 (or None for the sampling temperature), got "
                             f"{self.draft_temperature}")
        if self.num_draft_tokens is None:
            default = 1 + self.num_steps * self.eagle_topk
            object.__setattr__(self, "num_draft_tokens", default)
        n = self.num_draft_tokens
        if self.eagle_topk == 1 and n != 1 + self.num_steps:
            raise ValueError(f"a chain (eagle_topk=1) verifies 1 + num_steps = {1 + self.num_steps} tokens; "
                             f"got num_draft_tokens={n} (leave it None or use eagle_topk > 1 for a tree)")
        max_nodes = sum(self.eagle_topk ** d for d in range(1, self.num_steps + 1))
        if not 2 <= n <= 1 + max_nodes:
            raise ValueError(f"num_draft_tokens must be in [2, {1 + max_nodes}] for num_steps={self.num_steps}, "
                             f"eagle_topk={self.eagle_topk} (root + at most {max_nodes} draft nodes), got {n}")


@dataclass
class Completion:
    """One generated continuation.

    token_ids: generated token ids (prompt excluded; a stop token, if hit, is the last one).
    logprobs: [len(token_ids)] log-probability of each token under the processed sampling distribution
        (see module docstring; 0.0 everywhere for greedy).
    trunk_logprobs: [len(token_ids)] log_softmax(logits / T)[token] without top-k/top-p (trainer's view).
    finish_reason: "stop" (a stop token was emitted) or "length" (max_new_tokens or max_seq_len reached).
    prompt_index: index of the prompt in the generate() call's list.
    sample_index: 0..n-1 among the samples of that prompt.
    """

    token_ids: list[int]
    logprobs: list[float]
    trunk_logprobs: list[float]
    finish_reason: str
    prompt_index: int
    sample_index: int = 0


@dataclass
class RolloutMetrics:
    """What one generate() call did.

    num_sequences: completions returned; num_prompt_tokens / num_generated_tokens: totals.
    elapsed_s: wall time of the call; tokens_per_s: num_generated_tokens / elapsed_s.
    num_trunk_forwards: trunk forward_step calls (prefill chunks + decode / verification steps).
    num_decode_steps: decode or verification steps (one trunk forward each, over all live rows).
    num_draft_forwards: mtp_step calls (drafting and MTP-cache commits).
    mean_accept_length: generated tokens per row per decode step = 1 + mean accepted drafts (1.0 when not
        speculating); the "accept length" of SGLang / the seed's `rollout/spec_accept_length`.
    accept_rate_per_depth: [K] for depth j: P(draft j accepted | drafts 1..j-1 accepted), over all rows and
        steps that drafted that deep (`rollout/spec_accept_rate_{j}`); empty without speculation.
    mean_draft_depth: mean drafted depth per decode step (differs from num_steps only in adaptive mode).
    num_row_steps: live rows summed over decode steps (the weight of mean_accept_length).
    num_drafts_reached / num_drafts_accepted: [K] per depth j, the row-steps whose drafts 1..j-1 were all
        accepted, and of those the ones whose draft j was accepted (accept_rate_per_depth = their ratio).
    """

    num_sequences: int = 0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    elapsed_s: float = 0.0
    tokens_per_s: float = 0.0
    num_trunk_forwards: int = 0
    num_decode_steps: int = 0
    num_draft_forwards: int = 0
    mean_accept_length: float = 1.0
    accept_rate_per_depth: list[float] = field(default_factory=list)
    mean_draft_depth: float = 0.0
    num_row_steps: int = 0
    num_drafts_reached: list[int] = field(default_factory=list)
    num_drafts_accepted: list[int] = field(default_factory=list)

    @classmethod
    def merge(cls, parts: list[RolloutMetrics]) -> RolloutMetrics:
        """The metrics of several generate() calls as if they were one: counts and times summed, rates and
        means re-derived from the summed counts (tokens_per_s = tokens / time, accept_length weighted by
        row-steps, accept_rate_j = accepted_j / reached_j, draft depth weighted by decode steps)."""
        if not parts:
            raise ValueError("RolloutMetrics.merge needs at least one part")
        total = {k: sum(getattr(p, k) for p in parts) for k in (
            "num_sequences", "num_prompt_tokens", "num_generated_tokens", "elapsed_s", "num_trunk_forwards",
            "num_decode_steps", "num_draft_forwards", "num_row_steps")}
        depth = max(len(p.num_drafts_reached) for p in parts)
        reached = [sum(p.num_drafts_reached[j] for p in parts if j < len(p.num_drafts_reached)) for j in range(depth)]
        accepted = [sum(p.num_drafts_accepted[j] for p in parts if j < len(p.num_drafts_accepted)) for j in range(depth)]
        emitted = sum(p.mean_accept_length * p.num_row_steps for p in parts)
        depth_sum = sum(p.mean_draft_depth * p.num_decode_steps for p in parts)
        return cls(**total, tokens_per_s=total["num_generated_tokens"] / max(total["elapsed_s"], 1e-9),
                   mean_accept_length=emitted / total["num_row_steps"] if total["num_row_steps"] else 1.0,
                   accept_rate_per_depth=[a / r if r else 0.0 for a, r in zip(accepted, reached)],
                   mean_draft_depth=depth_sum / max(total["num_decode_steps"], 1),
                   num_drafts_reached=reached, num_drafts_accepted=accepted)

    @classmethod
    def merge_ranks(cls, parts: list[RolloutMetrics]) -> RolloutMetrics:
        """The metrics of generate() calls that ran at the same time on data-parallel ranks: as
        :meth:`merge`, but the elapsed time is the slowest rank's, and tokens_per_s the whole job's
        (all ranks' tokens over that time)."""
        merged = cls.merge(parts)
        elapsed = max(p.elapsed_s for p in parts)
        return dataclasses.replace(merged, elapsed_s=elapsed,
                                   tokens_per_s=merged.num_generated_tokens / max(elapsed, 1e-9))

    def as_dict(self, prefix: str = "rollout/") -> dict[str, float]:
        """Flat scalar metrics with the names the trainer logs (spec_accept_rate_{j} is 1-based)."""
        out = {f"{prefix}{k}": float(getattr(self, k)) for k in (
            "num_sequences", "num_generated_tokens", "elapsed_s", "tokens_per_s", "num_trunk_forwards",
            "num_decode_steps", "num_draft_forwards", "mean_draft_depth")}
        out[f"{prefix}spec_accept_length"] = float(self.mean_accept_length)
        for j, rate in enumerate(self.accept_rate_per_depth, start=1):
            out[f"{prefix}spec_accept_rate_{j}"] = float(rate)
        return out


@dataclass
class GenerateOutput:
    """Return value of Engine.generate_with_metrics: completions in prompt-major order
    (prompt 0 samples 0..n-1, prompt 1 ...) and the call's metrics."""

    completions: list[Completion]
    metrics: RolloutMetrics
