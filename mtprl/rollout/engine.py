"""The rollout engine: batched generation with a static KV cache, continuous batching and optional exact
speculative decoding with the model's MTP layers.

Plain decoding (gpt-fast / nanochat engine): prefill the admitted prompts (right-padded, one forward), sample
the first token from the last prompt position, then one trunk forward per step over all live rows, each row
at its own position (slot = position, the default mask hides stale slots past a row's length). Samples of
one prompt (SamplingParams.n) share its prefill: the prompt is run once and its cache row copied.
Continuous batching (Orca, Yu et al. 2022; vLLM): finished rows are retired after every step, the live rows
compacted to a prefix, and waiting sequences admitted FIFO while rows and the KV-token budget allow
(kv_cache.py). Speculative steps are in speculative.py; the reference path to test against is decode.py.

Where we differ from vLLM/SGLang: no paging and no chunked prefill mixed into decode steps (prefills are their
own forwards); a prompt is prefilled in one piece (it must fit max_seq_len). The static cache reserves
max_seq_len slots per row, so a memory bound (kv_cache_bytes) buys rows, not tokens: rows = what fits.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from mtprl.rollout.kv_cache import (DecodeRows, KVBudget, KVCachePlan, cache_slots, compaction_moves, move_rows,
                                    plan_cache, plan_engine_cache, rows_view)
from mtprl.rollout.sampling import processed_logprobs, sample_from_probs, temperature_logprobs
from mtprl.rollout.adaptive import AdaptiveDepth, AdaptiveStates, StepCost
from mtprl.rollout.speculative import (SpecRows, StepCounters, commit_mtp, draft_tree,
                                       verify_and_accept)
from mtprl.rollout.tree import build_tree
from mtprl.rollout.types import Completion, GenerateOutput, RolloutMetrics, SamplingParams, SpeculativeConfig

# Adaptive mode keeps the trunk's last hidden state of every position (position p at p % W) until the MTP layers have
# seen it: W = HIST_LEN, or the whole row (None; the memory plan counts it). With the whole row, plain steps never
# have to run MTP work: the catch-up runs only before a speculative step, for the rows live then. A shorter ring
# forces a speculative step whenever a row's MTP lag would outgrow it (tests use one).
HIST_LEN: int | None = None


@dataclass
class _Seq:
    prompt_index: int
    sample_index: int
    prompt: list[int]
    limit: int  # max total length (prompt + generated)


@dataclass
class _Run:
    """State of one generate() call."""

    params: SamplingParams
    spec: SpeculativeConfig | None
    generator: torch.Generator | None
    seqs: list[_Seq]
    waiting: deque
    rows: DecodeRows
    spec_rows: SpecRows | None
    budget: KVBudget
    stop_ids: torch.Tensor
    num_rows: int  # R, cache rows (<= max_num_seqs)
    done: torch.Tensor  # [R] bool, valid for live rows
    live: int = 0
    results: list = field(default_factory=list)
    counters: StepCounters = field(default_factory=StepCounters)
    decode_steps: int = 0
    row_steps: int = 0
    tokens_emitted: int = 0  # sum of accepted + 1 per row-step (before stop/length truncation), plain steps
    emitted: torch.Tensor | int = 0  # the same for speculative steps, accumulated on the device
    depth_sum: int = 0
    reached: torch.Tensor | None = None
    accepted: torch.Tensor | None = None
    trees: list = field(default_factory=list)  # trees[d] = (DraftTree, TreeTensors) truncated to depth d
    adaptive: AdaptiveDepth | None = None
    draft_params: SamplingParams | None = None  # what drafts are drawn with (params at the draft temperature)
    hist_len: int = 1  # adaptive mode: W, slots of the hidden-state history per row (HIST_LEN)
    # host-side shadows of rows.lengths and spec_rows.mtp_lengths for the live rows: kv_len, slot ranges and
    # compaction read these, never the device (the one device read of a decode step is its done/emitted copy)
    host_lengths: list = field(default_factory=list)
    host_mtp_lengths: list = field(default_factory=list)
    host_seq_ids: list = field(default_factory=list)  # rows.seq_ids


class Engine:
    """Generation engine bound to one model.

    max_num_seqs: cache rows = maximum live sequences per step (fewer when kv_cache_bytes allows fewer).
    max_seq_len: longest prompt + completion (the cache holds max_seq_len plus a few speculative slots).
    kv_cache_bytes: bound on the trunk (+ MTP) KV cache: rows = min(max_num_seqs, what fits; see cache_plan);
        None = max_num_seqs rows. Fewer rows lower the concurrency, never the results (waiting sequences are
        admitted as rows free up); a ValueError when not even one row of max_seq_len fits.
    kv_token_budget: sum over live sequences of (prompt_len + max_new_tokens, capped at max_seq_len);
        default max_num_seqs * max_seq_len (no extra limit).
    max_num_batched_tokens: padded prompt tokens per prefill forward (a longer single prompt still runs alone).
    dtype / device: of the caches and, on the packed path, of its weight copy and compute; default the model's
        (build_engine gives a CUDA engine the compute dtype, bf16, for an fp32 policy).
    kv_budget: called for the bound (kv_cache_bytes) whenever the caches are allocated from nothing - the first
        generate call and the first after release() - instead of the figure given at construction.
    catch_up_tokens: row-positions per MTP catch-up commit in adaptive mode (default max_num_batched_tokens).
    packed: run the trunk and MTP steps through mtprl.model.packed.PackedModel (fused weights, fewer ops per
        layer; the same maths and cache layout), re-packed at the start of a generate call whenever a parameter
        changed (version counter or storage), so in-place weight updates are always seen. Costs one copy of the
        attention/MLP weights. Replacing a submodule of the model needs a new Engine. False runs the model's own
        forward_step / mtp_step.
    """

    def __init__(self, model: torch.nn.Module, *, max_num_seqs: int = 64, max_seq_len: int = 2048,
                 kv_token_budget: int | None = None, max_num_batched_tokens: int = 8192,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 packed: bool = True, kv_cache_bytes: int | None = None,
                 kv_budget: Callable[[], int] | None = None, catch_up_tokens: int | None = None) -> None:
        if max_num_seqs < 1 or max_seq_len < 2 or max_num_batched_tokens < 1:
            raise ValueError(f"need max_num_seqs >= 1, max_seq_len >= 2, max_num_batched_tokens >= 1; got "
                             f"{max_num_seqs}, {max_seq_len}, {max_num_batched_tokens}")
        if kv_cache_bytes is not None and kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be > 0 (or None for no bound), got {kv_cache_bytes}")
        ref = next(model.parameters())
        self.model = model
        self.max_num_seqs = max_num_seqs
        self.max_seq_len = max_seq_len
        self.kv_token_budget = kv_token_budget or max_num_seqs * max_seq_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.kv_cache_bytes = kv_cache_bytes
        self.kv_budget = kv_budget
        self.catch_up_tokens = catch_up_tokens or max_num_batched_tokens
        self.dtype = dtype or ref.dtype
        if self.dtype != ref.dtype and not packed:
            raise ValueError(f"an engine dtype ({self.dtype}) other than the model's ({ref.dtype}) needs the packed "
                             "path (packed=True), which keeps its weight copy in that dtype")
        self.device = torch.device(device) if device is not None else ref.device
        self._trunk_cache = None
        self._mtp_cache = None
        self._with_history = False  # the cache plan counts adaptive speculation's hidden-state history (_ensure_caches)
        self._scored = 1  # positions a step scores per row, for the plan's per-row temporaries (_ensure_caches)
        self.packed = packed
        self._stepper = None  # what runs forward_step / mtp_step: the model or its PackedModel
        self._packed_signature = None  # packed.weights_signature of the model when last packed
        self._params = list(model.parameters())  # (walking the module tree costs ~1 ms a call)
        self._spec_rows = None  # (shape, SpecRows) reused across calls
        self._aranges = None  # see _rows_index
        self._trees: dict[tuple, list] = {}  # draft shape -> [(DraftTree, TreeTensors) per depth]
        self._adaptive = AdaptiveStates()  # adaptive speculation state per setting (_adaptive_state)

    # ----- public API -----------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams, speculative: SpeculativeConfig | None = None,
                 generator: torch.Generator | None = None) -> list[Completion]:
        """Completions in prompt-major order: prompt 0 samples 0..n-1, prompt 1, ... (see generate_with_metrics)."""
        return self.generate_with_metrics(prompts, params, speculative, generator).completions

    def generate_with_metrics(self, prompts: list[list[int]], params: SamplingParams,
                              speculative: SpeculativeConfig | None = None,
                              generator: torch.Generator | None = None) -> GenerateOutput:
        """Generate params.n continuations per prompt. generator seeds every random draw (same seed, same
        inputs, same engine settings -> same output; None uses torch's global RNG)."""
        start = time.perf_counter()
        with torch.inference_mode():
            run = self._start(prompts, params, speculative, generator)
            self._stepper = self._packed_model() if self.packed else self.model
            while run.waiting or run.live:
                if self._admit(run):  # a first sampled token may already end a row
                    self._retire(run, run.done[:run.live].tolist())
                if run.live:
                    self._retire(run, self._decode_step(run))
        return GenerateOutput(completions=run.results, metrics=self._metrics(run, time.perf_counter() - start))

    def cache_plan(self, speculative: SpeculativeConfig | None = None) -> KVCachePlan:
        """The cache a generate call with this speculative setting allocates (computed, nothing allocated)."""
        return plan_engine_cache(self.model.config, speculative, self.max_seq_len, max_num_seqs=self.max_num_seqs,
                                 dtype=self.dtype, limit_bytes=self.kv_cache_bytes)

    def release(self) -> None:
        """Free the KV caches and the packed weight copy (``rollout.free_cache_engine`` during the update); the
        next generate call rebuilds both."""
        self._trunk_cache = self._mtp_cache = None
        self._stepper = self._packed_signature = None
        self._spec_rows = None
        self._with_history = False
        self._scored = 1

    def current_stepper(self):
        """What the next generate call decodes with (the model, or its PackedModel re-packed to the model's
        current weights): for checks that the engine holds the trainer's weights."""
        with torch.inference_mode():
            self._stepper = self._packed_model() if self.packed else self.model
        return self._stepper

    # ----- setup ----------------------------------------------------------------------------------------------
    def _plan(self, num_slots: int, with_mtp: bool, with_history: bool = False, scored: int = 1) -> KVCachePlan:
        return plan_cache(self.model.config, max_num_seqs=self.max_num_seqs, num_slots=num_slots, dtype=self.dtype,
                          with_mtp=with_mtp, limit_bytes=self.kv_cache_bytes, with_history=with_history,
                          scored=scored)

    def _packed_model(self):
        from mtprl.model.packed import PackedModel, weights_signature

        signature = weights_signature(self._params)
        if self._stepper is None or self._stepper is self.model:
            stepper = PackedModel(self.model, dtype=self.dtype)
        else:
            stepper = self._stepper
            if signature != self._packed_signature:  # the policy changed since the last call (optimizer step, load)
                stepper.pack()
        self._packed_signature = signature
        return stepper

    def _start(self, prompts, params, spec, generator) -> _Run:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        vocab = self.model.config.vocab_size
        seqs = []
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
            if len(prompt) >= self.max_seq_len:
                raise ValueError(f"prompt {i} has {len(prompt)} tokens, max_seq_len={self.max_seq_len} leaves no room "
                                 "to generate; truncate the prompt or raise max_seq_len")
            if min(prompt) < 0 or max(prompt) >= vocab:
                raise ValueError(f"prompt {i} has token ids outside [0, {vocab})")
            limit = min(len(prompt) + params.max_new_tokens, self.max_seq_len)
            if limit > self.kv_token_budget:
                raise ValueError(f"prompt {i} reserves {limit} KV tokens > kv_token_budget={self.kv_token_budget}")
            seqs.extend(_Seq(i, j, list(prompt), limit) for j in range(params.n))
        if spec is not None and self.model.config.num_mtp_layers == 0:
            raise ValueError("speculative decoding needs MTP layers; this model has num_mtp_layers=0")
        tree = None if spec is None else build_tree(spec.num_steps, spec.eagle_topk, spec.num_draft_tokens)
        self._ensure_caches(cache_slots(self.max_seq_len, spec), with_mtp=spec is not None,
                            with_history=spec is not None and spec.adaptive,
                            scored=1 if tree is None else tree.num_nodes)
        num_rows, num_slots = self._trunk_cache.num_rows, self._trunk_cache.max_seq_len
        rows = DecodeRows.empty(num_rows, num_slots, self.device)
        spec_rows = None
        if spec is not None:  # reused across calls: every field is written at admission or commit before a read
            cfg = self.model.config
            shape = (num_rows, cfg.vocab_size, cfg.num_mtp_layers, cfg.hidden_size,
                     (HIST_LEN or num_slots) if spec.adaptive else 1, self.dtype, self.device)
            if self._spec_rows is None or self._spec_rows[0] != shape:
                self._spec_rows = (shape, SpecRows.empty(*shape))
            spec_rows = self._spec_rows[1]
        run = _Run(params=params, spec=spec, generator=generator, seqs=seqs, waiting=deque(range(len(seqs))),
                   rows=rows, spec_rows=spec_rows, budget=KVBudget(self.kv_token_budget),
                   stop_ids=torch.tensor(params.stop_token_ids, dtype=torch.long, device=self.device),
                   num_rows=num_rows, done=torch.zeros(num_rows, dtype=torch.bool, device=self.device),
                   results=[None] * len(seqs), hist_len=1 if spec_rows is None else spec_rows.hist.shape[1])
        if tree is not None:
            key = (spec.num_steps, spec.eagle_topk, spec.num_draft_tokens)
            if key not in self._trees:  # (read-only index tensors: built once per draft shape)
                self._trees[key] = [(t, t.tensors(self.device)) for t in (tree.truncate(d)
                                                                          for d in range(tree.max_depth + 1))]
            run.trees = self._trees[key]
            run.reached = torch.zeros(tree.max_depth, dtype=torch.long, device=self.device)
            run.accepted = torch.zeros_like(run.reached)
            run.adaptive = self._adaptive_state(spec, params, tree) if spec.adaptive else None
            run.draft_params = params
            if spec.draft_temperature is not None and not params.greedy:
                run.draft_params = dataclasses.replace(params, temperature=spec.draft_temperature)
        return run

    def _adaptive_state(self, spec: SpeculativeConfig, params: SamplingParams, tree) -> AdaptiveDepth:
        """The AdaptiveDepth for this draft shape and sampling setting (adaptive.AdaptiveStates), its costs
        predicted from the model's shapes (adaptive.StepCost), so its choices never depend on timings."""
        key = (spec.num_steps, spec.eagle_topk, spec.num_draft_tokens, spec.draft_temperature, params.greedy,
               params.temperature, params.top_k, params.top_p)
        return self._adaptive.get(key, lambda: AdaptiveDepth(tree.max_depth, StepCost(self.model.config, tree,
                                                                                      self.dtype, self.device)))

    def state_dict(self) -> dict:
        """What a resumed run needs for its rollouts to continue the uninterrupted run's: the adaptive
        speculation state of every setting used (acceptance counts, step counts; plain numbers)."""
        return self._adaptive.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (applied when each setting is next used)."""
        self._adaptive.load_state_dict(state)

    def _ensure_caches(self, num_slots: int, with_mtp: bool, with_history: bool = False, scored: int = 1) -> None:
        """Allocate (once, or re-allocate for more slots or the MTP layers' share of the bound) the trunk cache
        and, when speculating, the MTP cache, with the rows the plan gives (kept once there is an MTP cache).
        With a kv_budget, the bound is measured again whenever the caches are allocated from nothing (the first
        call, and the first after release(): what the update left free, not what was free at construction)."""
        cache = self._trunk_cache
        if cache is None and self.kv_budget is not None:
            self.kv_cache_bytes = self.kv_budget()
        with_mtp = with_mtp or self._mtp_cache is not None
        self._with_history = with_history = with_history or self._with_history  # (kept, as the MTP cache's share)
        self._scored = scored = max(scored, self._scored)
        plan = self._plan(max(num_slots, 0 if cache is None else cache.max_seq_len), with_mtp, with_history, scored)
        if cache is None or cache.max_seq_len < plan.slots or cache.num_rows != plan.rows:
            self._trunk_cache = self._mtp_cache = cache = None  # (freed before the new ones are allocated)
            self._trunk_cache = self.model.new_kv_cache(plan.rows, plan.slots, self.dtype, self.device)
        if with_mtp and self._mtp_cache is None:
            self._mtp_cache = self.model.new_mtp_kv_cache(plan.rows, plan.slots, self.dtype, self.device)

    # ----- sampling -------------------------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, run: _Run) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """logits [b,V] -> tokens [b], logprobs [b] (processed), trunk_logprobs [b] (log_softmax(logits/T))."""
        p = run.params
        if p.greedy:
            tokens = logits.argmax(-1)
            trunk = logits.float().gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(logits.float(), -1)
            return tokens, torch.zeros_like(trunk), trunk
        lp = processed_logprobs(logits, p)
        tokens = sample_from_probs(lp.exp(), run.generator)
        chosen = lp.gather(-1, tokens[:, None]).squeeze(-1)
        if p.top_k == 0 and p.top_p == 1.0:
            return tokens, chosen, chosen
        trunk = temperature_logprobs(logits, p.temperature).gather(-1, tokens[:, None]).squeeze(-1)
        return tokens, chosen, trunk

    def _is_stop(self, tokens: torch.Tensor, run: _Run) -> torch.Tensor:
        if run.stop_ids.numel() == 0:
            return torch.zeros_like(tokens, dtype=torch.bool)
        return torch.isin(tokens, run.stop_ids)

    # ----- admission / prefill ---------------------------------------------------------------------------------
    def _take_waiting(self, run: _Run) -> list[int]:
        """FIFO admission bounded by free rows, the KV budget and max_num_batched_tokens of prefill."""
        taken: list[int] = []
        prompts: list[int] = []
        max_len = 0
        while run.waiting and run.live + len(taken) < run.num_rows:
            seq = run.seqs[run.waiting[0]]
            new_prompt = not prompts or prompts[-1] != seq.prompt_index
            width = max(max_len, len(seq.prompt))
            if taken and new_prompt and (len(prompts) + 1) * width > self.max_num_batched_tokens:
                break
            if not run.budget.fits(seq.limit):
                break
            run.budget.reserve(seq.limit)
            taken.append(run.waiting.popleft())
            if new_prompt:
                prompts.append(seq.prompt_index)
            max_len = width
        return taken

    def _admit(self, run: _Run) -> bool:
        """Prefill the sequences that fit; whether any was admitted."""
        taken = self._take_waiting(run)
        if not taken:
            return False
        seqs = [run.seqs[i] for i in taken]
        groups, unique = [], []  # samples of one prompt are adjacent: prefill each prompt once
        for s in seqs:
            if not unique or unique[-1].prompt_index != s.prompt_index:
                unique.append(s)
            groups.append(len(unique) - 1)
        n, u, b0 = len(seqs), len(unique), run.live
        width = max(len(s.prompt) for s in unique)
        dev = self.device
        inp = torch.zeros(u, width, dtype=torch.long, device=dev)
        for i, s in enumerate(unique):
            inp[i, :len(s.prompt)] = torch.tensor(s.prompt, device=dev)
        pos = torch.arange(width, device=dev)[None].expand(u, width)
        last_pos = torch.tensor([[len(s.prompt) - 1] for s in unique], device=dev)  # logits only where sampled
        logits, hidden = self._stepper.forward_step(inp, pos, pos, rows_view(self._trunk_cache, b0, b0 + u),
                                                    kv_len=width, logit_index=last_pos, prefill=True)
        run.counters.trunk_forwards += 1
        group = torch.tensor(groups, device=dev)
        if n > u:
            move_rows(self._trunk_cache, b0 + group, b0 + torch.arange(n, device=dev), width)
        prompt_lens = torch.tensor([len(s.prompt) for s in seqs], device=dev)
        last = logits[group, 0]  # [n,V]
        tokens, lp, tlp = self._sample(last, run)
        r = run.rows
        sl = slice(b0, b0 + n)
        r.tokens[sl, :width] = inp[group]
        r.tokens[sl].scatter_(1, prompt_lens[:, None], tokens[:, None])
        r.logprobs[sl].scatter_(1, prompt_lens[:, None], lp[:, None])
        r.trunk_logprobs[sl].scatter_(1, prompt_lens[:, None], tlp[:, None])
        r.lengths[sl] = prompt_lens + 1
        r.prompt_lens[sl] = prompt_lens
        r.limits[sl] = torch.tensor([s.limit for s in seqs], device=dev)
        r.seq_ids[sl] = torch.tensor(taken, device=dev)
        run.done[sl] = self._is_stop(tokens, run) | (prompt_lens + 1 >= r.limits[sl])
        run.host_lengths[b0:] = run.host_mtp_lengths[b0:] = [len(s.prompt) + 1 for s in seqs]
        run.host_seq_ids[b0:] = taken
        if run.spec_rows is not None:  # MTP prefill = a commit of the prompt from committed length 1
            sr = run.spec_rows
            sr.stored_h[sl] = 0
            if run.adaptive is not None and width <= run.hist_len - 3:
                # lazily: the prompt's trunk hidden states wait in the ring, and the catch-up before the first
                # speculative step commits them (if adaptive keeps choosing plain steps, the MTP work never runs)
                sr.hist[sl, :width] = hidden[group].to(sr.hist.dtype)
                sr.mtp_lengths[sl] = 1
                run.host_mtp_lengths[b0:] = [1] * n
            else:  # the prompt's positions once per prompt, then each sample's first token on its own row
                if width > 1:
                    u_lens = torch.tensor([len(s.prompt) for s in unique], device=dev)
                    commit_mtp(self._stepper, rows_view(self._mtp_cache, b0, b0 + u),
                               torch.ones(u, dtype=torch.long, device=dev), hidden[:, :width - 1], inp[:, 1:],
                               u_lens - 1, _RowsView(sr, b0, b0 + u), u, run.counters,
                               may_be_empty=min(len(s.prompt) for s in unique) == 1, l_range=(1, 1), prefill=True)
                if n > u:
                    rows = b0 + torch.arange(n, device=dev)
                    move_rows(self._mtp_cache, b0 + group, rows, width)
                    sr.move(b0 + group, rows)
                last_hidden = hidden[group[:, None], prompt_lens[:, None] - 1]  # [n,1,H] the trunk at position L-1
                commit_mtp(self._stepper, rows_view(self._mtp_cache, b0, b0 + n), prompt_lens, last_hidden,
                           tokens[:, None], torch.ones(n, dtype=torch.long, device=dev), _RowsView(sr, b0, b0 + n), n,
                           run.counters, l_range=(min(len(s.prompt) for s in seqs), width))
                sr.mtp_lengths[sl] = prompt_lens + 1
        run.live += n
        return True

    # ----- decode steps ---------------------------------------------------------------------------------------
    def _decode_step(self, run: _Run) -> list[bool]:
        """One decode step over the live rows; returns which rows are done (read from the device once)."""
        b = run.live
        depth = 0
        if run.spec is not None:
            depth = run.trees[-1][0].max_depth
            if run.adaptive is not None:
                depth = run.adaptive.choose(b, sum(run.host_lengths[:b]) / b)
                if depth == 0 and self._mtp_lag(run, b) >= run.hist_len - 2:
                    depth = 1  # keep the MTP lag inside the hidden-state ring (the step catches up first)
        if depth > 0 and run.adaptive is not None:
            self._catch_up_mtp(run, b)
        if depth == 0:
            done = self._plain_step(run, b)
        else:
            done = self._spec_step(run, b, depth)
        run.decode_steps += 1
        run.row_steps += b
        run.depth_sum += depth
        return done

    @staticmethod
    def _mtp_lag(run: _Run, b: int) -> int:
        """The widest MTP lag (committed length - MTP-synced length) over the live rows, from the host shadows."""
        return max(h - m for h, m in zip(run.host_lengths[:b], run.host_mtp_lengths[:b]))

    def _plain_step(self, run: _Run, b: int) -> list[bool]:
        r = run.rows
        lengths = r.lengths[:b].clone()
        pos = (lengths - 1)[:, None]
        last = r.tokens[:b].gather(1, pos)
        logits, hidden = self._stepper.forward_step(last, pos, pos, rows_view(self._trunk_cache, 0, b),
                                                 kv_len=max(run.host_lengths[:b]))
        run.counters.trunk_forwards += 1
        tokens, lp, tlp = self._sample(logits[:, 0], run)
        r.tokens[:b].scatter_(1, lengths[:, None], tokens[:, None])
        r.logprobs[:b].scatter_(1, lengths[:, None], lp[:, None])
        r.trunk_logprobs[:b].scatter_(1, lengths[:, None], tlp[:, None])
        if run.adaptive is not None:  # remember h^0 for the MTP catch-up
            sr = run.spec_rows
            sr.hist.index_put_((self._rows_index(b), pos[:, 0] % run.hist_len), hidden[:, 0].to(sr.hist.dtype))
        r.lengths[:b] = lengths + 1
        run.done[:b] = self._is_stop(tokens, run) | (lengths + 1 >= r.limits[:b])
        run.tokens_emitted += b
        run.host_lengths[:b] = [n + 1 for n in run.host_lengths[:b]]
        return run.done[:b].tolist()  # the step's one device read

    def _rows_index(self, b: int) -> torch.Tensor:
        """arange(b) on the engine's device, kept (one op fewer per use on the decode path)."""
        if self._aranges is None or self._aranges.shape[0] < b:
            self._aranges = torch.arange(max(b, self.max_num_seqs), device=self.device)
        return self._aranges[:b]

    def _catch_up_mtp(self, run: _Run, b: int) -> None:
        """Adaptive mode: run the MTP commit over positions decoded by plain steps since the last sync, in chunks of
        at most catch_up_tokens row-positions (a long lag over a full batch would otherwise be one call over
        b x lag positions, with masks and activations to match)."""
        sr, r = run.spec_rows, run.rows
        width = self._mtp_lag(run, b)
        if width == 0:
            return
        l_start = sr.mtp_lengths[:b].clone()
        lag = r.lengths[:b] - l_start
        low, high = min(run.host_mtp_lengths[:b]), max(run.host_mtp_lengths[:b])
        chunk = max(1, self.catch_up_tokens // b)
        rows = self._rows_index(b)[:, None]
        for first in range(0, width, chunk):
            t = min(chunk, width - first)
            offsets = torch.arange(first, first + t, device=self.device)[None]
            hidden = sr.hist[rows, (l_start[:, None] - 1 + offsets) % run.hist_len]
            new_tokens = r.tokens[:b].gather(1, (l_start[:, None] + offsets).clamp(max=r.tokens.shape[1] - 1))
            commit_mtp(self._stepper, rows_view(self._mtp_cache, 0, b), l_start + first, hidden, new_tokens,
                       (lag - first).clamp(0, t), sr, b, run.counters, may_be_empty=True,
                       l_range=(low + first, high + first))
        sr.mtp_lengths[:b] = r.lengths[:b]
        run.host_mtp_lengths[:b] = run.host_lengths[:b]

    def _spec_step(self, run: _Run, b: int, depth: int) -> list[bool]:
        tree, tt = run.trees[depth]
        r, sr = run.rows, run.spec_rows
        lengths = r.lengths[:b].clone()
        len_range = (min(run.host_lengths[:b]), max(run.host_lengths[:b]))
        trunk, mtp = rows_view(self._trunk_cache, 0, b), rows_view(self._mtp_cache, 0, b)
        root = r.tokens[:b].gather(1, (lengths - 1)[:, None]).squeeze(1)
        draft = draft_tree(self._stepper, tree, tt, mtp, lengths, root, sr, b, run.draft_params, run.generator,
                           run.counters, len_range)
        out, path, hidden = verify_and_accept(self._stepper, tree, tt, trunk, lengths, draft, run.params, run.generator,
                                              run.counters, len_range[1])
        path_hidden = hidden[self._rows_index(b)[:, None], path]  # [b,M+1,H] trunk hidden along the accepted path
        commit_mtp(self._stepper, mtp, lengths, path_hidden, out.tokens, out.num_new, sr, b, run.counters,
                   l_range=len_range)
        # emit: truncate at the first stop token and at the length limit. Every value is written; those past the
        # new length are garbage that is never read (buffers are read below `lengths` only).
        m1 = out.tokens.shape[1]
        idx = torch.arange(m1, device=self.device)[None]
        emit = torch.minimum(out.num_new, r.limits[:b] - lengths)
        if run.stop_ids.numel():
            stop_at = torch.where(self._is_stop(out.tokens, run), idx, m1).min(1).values  # first stop (or m1)
            emit = torch.minimum(emit, stop_at + 1)
            stopped = stop_at < emit
        cols = lengths[:, None] + idx
        for buf, val in ((r.tokens, out.tokens), (r.logprobs, out.logprobs), (r.trunk_logprobs, out.trunk_logprobs)):
            buf[:b].scatter_(1, cols, val.to(buf.dtype))
        r.lengths[:b] = lengths + emit
        sr.mtp_lengths[:b] = r.lengths[:b]
        run.done[:b] = lengths + emit >= r.limits[:b]
        if run.stop_ids.numel():
            run.done[:b] |= stopped
        run.emitted += out.num_new.sum()
        reached, accepted = out.reached, out.accepted
        run.reached[:reached.shape[0]] += reached
        run.accepted[:accepted.shape[0]] += accepted
        # the step's one device read: done flags, tokens emitted per row, and the adaptive rule's acceptance counts
        parts = [run.done[:b].long(), emit] + ([reached, accepted] if run.adaptive is not None else [])
        host = torch.cat(parts).tolist()
        done, emitted = [bool(x) for x in host[:b]], host[b:2 * b]
        run.host_lengths[:b] = [n + e for n, e in zip(run.host_lengths[:b], emitted)]
        run.host_mtp_lengths[:b] = run.host_lengths[:b]
        if run.adaptive is not None:
            m = reached.shape[0]
            run.adaptive.observe(depth, host[2 * b:2 * b + m], host[2 * b + m:])
        return done

    # ----- retirement -----------------------------------------------------------------------------------------
    def _retire(self, run: _Run, finished: list[bool]) -> None:
        """Hand finished rows (finished[i] for live row i, read on the host by the caller) to the results and
        compact the live rows to a prefix."""
        b = run.live
        if not any(finished):
            return
        r = run.rows
        fin = [i for i in range(b) if finished[i]]
        lens = [run.host_lengths[i] for i in fin]
        sids = [run.host_seq_ids[i] for i in fin]
        fin_t = torch.tensor(fin, device=self.device)
        width = max(lens)
        # one read: token ids (exact in float64) and both logprob rows of the finished rows
        rows = torch.stack([r.tokens[fin_t, :width].double(), r.logprobs[fin_t, :width].double(),
                            r.trunk_logprobs[fin_t, :width].double()]).tolist()
        stops = set(run.params.stop_token_ids)
        for j in range(len(fin)):
            seq = run.seqs[sids[j]]
            start, end = len(seq.prompt), lens[j]
            gen = [int(t) for t in rows[0][j][start:end]]
            run.results[sids[j]] = Completion(
                token_ids=gen, logprobs=rows[1][j][start:end], trunk_logprobs=rows[2][j][start:end],
                finish_reason="stop" if gen and gen[-1] in stops else "length",
                prompt_index=seq.prompt_index, sample_index=seq.sample_index)
            run.budget.release(seq.limit)
        src, dst, new_b = compaction_moves(finished)
        if src:
            src_t, dst_t = torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device)
            move_rows(self._trunk_cache, src_t, dst_t, max(run.host_lengths[i] for i in src))
            if run.spec is not None:  # MTP layer k holds slots < mtp_length - k (none yet for a lazy prompt)
                mtp_slots = max(run.host_mtp_lengths[i] for i in src) - 1
                if mtp_slots > 0:
                    move_rows(self._mtp_cache, src_t, dst_t, mtp_slots)
            r.move(src_t, dst_t)
            if run.spec_rows is not None:
                run.spec_rows.move(src_t, dst_t)
            run.done[dst_t] = run.done[src_t]
            for shadow in (run.host_lengths, run.host_mtp_lengths, run.host_seq_ids):
                for i, j in zip(src, dst):
                    shadow[j] = shadow[i]
        for shadow in (run.host_lengths, run.host_mtp_lengths, run.host_seq_ids):
            del shadow[new_b:]
        run.live = new_b

    # ----- metrics --------------------------------------------------------------------------------------------
    def _metrics(self, run: _Run, elapsed: float) -> RolloutMetrics:
        generated = sum(len(c.token_ids) for c in run.results)
        rates, reached, accepted = [], [], []
        if run.reached is not None:
            reached, accepted = run.reached.tolist(), run.accepted.tolist()
            rates = [a / r if r else 0.0 for a, r in zip(accepted, reached)]
        steps = max(run.decode_steps, 1)
        return RolloutMetrics(
            num_sequences=len(run.results), num_prompt_tokens=sum(len(s.prompt) for s in run.seqs),
            num_generated_tokens=generated, elapsed_s=elapsed, tokens_per_s=generated / max(elapsed, 1e-9),
            num_trunk_forwards=run.counters.trunk_forwards, num_decode_steps=run.decode_steps,
            num_draft_forwards=run.counters.mtp_forwards,
            mean_accept_length=(run.tokens_emitted + int(run.emitted)) / max(run.row_steps, 1),
            accept_rate_per_depth=rates,
            mean_draft_depth=run.depth_sum / steps, num_row_steps=run.row_steps,
            num_drafts_reached=reached, num_drafts_accepted=accepted)


class _RowsView:
    """SpecRows restricted to rows [start, end), for commit_mtp during a prefill (it indexes rows [0, b))."""

    def __init__(self, rows: SpecRows, start: int, end: int) -> None:
        self.q_root_logits = rows.q_root_logits[start:end]
        self.stored_h = rows.stored_h[start:end]
