"""Adaptive speculation: the draft depth of every decode step (AdaptiveDepth), from predicted step costs (StepCost).

AdaptiveDepth picks the depth that maximises expected tokens per second. Its seconds are predicted here, not
read from a clock: a rule fed measured step times makes the depth - and with it how the random stream is
consumed, so every sample - depend on the machine's load, and two runs of one command differ (the tiny_cpu preset
did, from its third step on). Predicted costs depend only on the model's shapes, the draft tree, the dtype, the
device type and the thread count; acceptance comes from counts. So the same command gives the same depths, the
same draws and the same run, and a run resumed from a checkpoint (which keeps the acceptance counts, see
Engine.state_dict) the uninterrupted one.

A step is priced as a roofline of the whole step plus a per-op charge::

    seconds = ops * op_seconds + max(flops / flops_per_s, weight bytes / bytes_per_s) + elements * element_seconds

ops: aten ops the step dispatches on the packed decode path, counted per step kind (OP_COUNTS: a decoder block,
the fixed part of a plain step, of a speculative step and of each further draft level; tests/rollout/
test_adaptive.py recounts them on live steps and fails when the code drifts from the table). At small batches
this term is the cost: on a CPU each op costs microseconds of dispatch whatever its size, on a GPU without CUDA
graphs each op is a kernel launch. flops: 2 x the weights each token passes through (trunk blocks for verified
tokens, the MTP block for drafted and committed ones, the vocabulary head for every scored row); weight bytes:
every forward streams its weights once (what bounds batch-1 decoding of a large model). elements: activation
elements through the elementwise work (per token and block: residual stream, norms, RoPE, q/k/v, the MLP's
intermediate tensors; per scored row, the sampling's passes over the vocabulary), and attention's reads of the
KV cache - once per row, layer and forward whatever the row's verified nodes (the rows' mean length comes from
the engine), which is what speculation amortises at long contexts.

The device rates are nominal, per device type (DEVICE_RATES): a wrong rate makes a depth choice slower, never a
sample wrong, and never makes a run irreproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from mtprl.model.config import ModelConfig
from mtprl.rollout.tree import DraftTree


@dataclass(frozen=True)
class DeviceRates:
    """op_seconds: host cost of one dispatched op (CPU: dispatch + a tiny kernel; CUDA: a launch); flops_per_s:
    sustained matmul throughput; element_seconds: cost of one activation element through a step's elementwise
    work (norms, RoPE, residuals, activations, attention's softmax, the sampling's passes over the vocabulary):
    what dominates a narrow model's step on a CPU; bytes_per_s: memory bandwidth for weight streaming. CPU rates
    are for the thread count given (flops and elements scale with it)."""

    op_seconds: float
    flops_per_s: float
    element_seconds: float
    bytes_per_s: float


# CPU: fitted (per thread) to step times of the packed decode path on this project's 2-core machines at 2 threads:
# plain and 1-3 draft chain steps at 1-128 live rows of ~50 positions, three shapes (the demo's 64 x 16, 256 x 8
# and a 97M 768 x 8 model): the predictions are within ~25% (RMS of the log ratio 0.22; docs/rollout.md "Adaptive
# depth"). CUDA: nominal, an H100-class card without CUDA graphs (~10 us a launch from Python, ~40% of bf16 peak,
# elementwise work and weights at ~75% of HBM bandwidth).
DEVICE_RATES = {
    "cpu": DeviceRates(op_seconds=3e-6, flops_per_s=1e11, element_seconds=2e-9, bytes_per_s=1.35e10),
    "cuda": DeviceRates(op_seconds=1e-5, flops_per_s=4e14, element_seconds=2e-12, bytes_per_s=2.5e12),
}

# aten ops per step on the packed path (counted with a TorchDispatchMode; tests/rollout/test_adaptive.py):
# one decoder block; a plain step's head, sampling and bookkeeping; a speculative step's first draft level with
# the verification, acceptance and MTP commit around it (chain / tree); each further draft level (chain / tree).
OP_COUNTS = {"block": 26, "plain": 84, "spec_chain": 291, "spec_tree": 413, "level_chain": 90, "level_tree": 236}
# passes over a [rows, vocab] fp32 tensor per scored row (log-softmax, exp, cumulative sum / acceptance ratios)
VOCAB_PASSES = 4


@dataclass(frozen=True)
class StepWork:
    """What one step does: aten ops dispatched, matmul flops, activation elements, weight bytes streamed."""

    ops: float
    flops: float
    elements: float
    weight_bytes: float


class StepCost:
    """Predicted seconds of a plain step and of a speculative step at each depth of `tree`, for any live row
    count (module docstring). Pure arithmetic on shapes: the same inputs always give the same table."""

    def __init__(self, config: ModelConfig, tree: DraftTree, dtype: torch.dtype, device: torch.device | str,
                 threads: int | None = None, rates: DeviceRates | None = None) -> None:
        device_type = torch.device(device).type
        if rates is None:
            rates = DEVICE_RATES.get(device_type, DEVICE_RATES["cuda"])
            if device_type == "cpu":
                n = max(threads if threads is not None else torch.get_num_threads(), 1)
                rates = DeviceRates(rates.op_seconds, rates.flops_per_s * n, rates.element_seconds / n,
                                    rates.bytes_per_s)
        self.rates = rates
        self.tree = tree
        h, dh, inter = config.hidden_size, config.resolved_head_dim, config.intermediate_size
        attn = h * dh * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)  # q, o, k, v
        block = attn + 3 * h * inter  # gate, up, down
        self.block_params = block
        self.layers = config.num_hidden_layers
        self.mtp_params = block + 2 * h * h  # its block and the input projection of [h, embedding]
        self.head_params = h * config.vocab_size
        self.vocab = config.vocab_size
        # activation elements a token passes through a block's elementwise work: the residual stream, norms and
        # RoPE (~4 x hidden), q/k/v and attention output, the MLP's gate, up and product (~3 x intermediate)
        self.block_elements = 4 * h + dh * (2 * config.num_attention_heads + 2 * config.num_key_value_heads) \
            + 3 * inter
        # K and V elements a row's query reads per cached position, per layer (shared by the row's verified nodes)
        self.kv_elements = 2 * config.num_key_value_heads * dh
        self.weight_bytes = torch.empty((), dtype=dtype).element_size()
        self.chain = tree.is_chain
        self.levels = [end - start for start, end in tree.level_ranges]  # nodes per depth, the root's level first

    def seconds(self, work: StepWork) -> float:
        r = self.rates
        matmul = max(work.flops / r.flops_per_s, work.weight_bytes / r.bytes_per_s)
        return work.ops * r.op_seconds + matmul + work.elements * r.element_seconds

    def work(self, depth: int, rows: int, context: float = 0.0) -> StepWork:
        """A plain step (depth 0) or a speculative step drafting `depth` levels of the tree (its first depth+1
        levels verified): MTP forwards over draft levels 1..depth-1, the trunk over every node, the MTP commit over
        the accepted path (at most depth+1 tokens a row), the head over every verified node, every draft
        distribution and the commit's last position. context: the rows' mean length, for attention's reads of
        the KV cache (once a layer per row and forward, whatever the row's nodes: what speculation amortises)."""
        if depth == 0:
            nodes, tokens_mtp, scored, forwards_mtp = 1, 0, 1, 0
            ops = OP_COUNTS["block"] * self.layers + OP_COUNTS["plain"]
        else:
            nodes = sum(self.levels[:depth + 1])
            tokens_mtp = sum(self.levels[1:depth]) + depth + 1  # draft forwards and the commit
            scored = nodes + sum(self.levels[:depth]) + 1
            forwards_mtp = depth  # depth - 1 draft forwards and the commit
            fixed, level = ("spec_chain", "level_chain") if self.chain else ("spec_tree", "level_tree")
            ops = OP_COUNTS["block"] * self.layers + OP_COUNTS[fixed] + OP_COUNTS[level] * (depth - 1)
        flops = 2 * rows * (self.block_params * self.layers * nodes + self.mtp_params * tokens_mtp
                            + self.head_params * scored)
        attention = context * self.kv_elements * (self.layers + forwards_mtp)
        elements = rows * (self.block_elements * (self.layers * nodes + tokens_mtp)
                           + VOCAB_PASSES * self.vocab * scored + attention)
        weights = self.weight_bytes * (self.block_params * self.layers + self.mtp_params * forwards_mtp
                                       + self.head_params * (1 + forwards_mtp))
        return StepWork(ops=ops, flops=flops, elements=elements, weight_bytes=weights)

    def plain(self, rows: int, context: float = 0.0) -> float:
        """One plain decode step of `rows` live rows of mean length `context`."""
        return self.seconds(self.work(0, rows, context))

    def speculative(self, depth: int, rows: int, context: float = 0.0) -> float:
        """One speculative step of `rows` rows at `depth` (work())."""
        return self.seconds(self.work(depth, rows, context))

    def catch_up(self, rows: int) -> float:
        """The share of the MTP catch-up that a plain step defers (its MTP work for `rows` rows, done in bulk by
        the next speculative step: its throughput part only, the ops are paid once per switch)."""
        r = self.rates
        return rows * (2 * self.mtp_params / r.flops_per_s + self.block_elements * r.element_seconds)

    def step(self, depth: int, rows: int, context: float = 0.0) -> float:
        return self.seconds(self.work(depth, rows, context))


class AdaptiveDepth:
    """Chooses the draft depth d in 0..max_depth (0 = a plain decode step) before every decode step.

    A step at depth d emits E(d) = 1 + sum_{j<=d} prod_{i<=j} alpha_i tokens per row, alpha_i = running estimate of
    P(accept at depth i | depth i-1 accepted) from acceptance counts (an optimistic prior of 2 accepted out of 2,
    slow forgetting), and takes cost.step(d, rows) seconds (StepCost: predicted from shapes). The choice is
    argmax_d E(d) / t(d), where a plain step is also charged its deferred MTP work: every live row's MTP state
    falls one position behind and the next speculative step catches it up (StepCost.catch_up).
    Exploration, for the acceptance estimates only (costs need none): the first `warmup_steps` steps run max_depth
    (they measure every alpha); afterwards, while the best depth is < max_depth, one step runs at best + 1
    (refreshing alpha_{best+1}) `probe_every` steps after the choice last changed for that row bucket (live rows
    by powers of two), then at gaps that double after every probe that leaves the choice as it was (up to
    `max_probe_gap`) - and never when even perfect acceptance at best + 1 could not beat best.
    Every input is a count (steps, rows, accepted and reached drafts) or the cost table, so the choices - and the
    samples, which depend on them through the random stream - are the same on every run of one command; the
    state (state_dict) is saved with a checkpoint so that a resumed run continues them.
    """

    def __init__(self, max_depth: int, cost: StepCost, probe_every: int = 32, warmup_steps: int = 4,
                 accept_forget: float = 0.995, max_probe_gap: int = 1024) -> None:
        self.max_depth = max_depth
        self.cost = cost
        self.probe_every = probe_every
        self.max_probe_gap = max(max_probe_gap, probe_every)
        self.warmup_steps = warmup_steps
        self.accept_forget = accept_forget
        self.acc = [2.0] * max_depth  # optimistic prior: 2 of 2 accepted (data dominates after ~20 row-steps)
        self.reach = [2.0] * max_depth
        self.probes: dict[int, list[int]] = {}  # bucket -> [best depth, gap, step of the next probe]
        self.steps = 0

    def alphas(self) -> list[float]:
        return [a / r for a, r in zip(self.acc, self.reach)]

    def expected_tokens(self, depth: int) -> float:
        total, prod = 1.0, 1.0
        for a in self.alphas()[:depth]:
            prod *= a
            total += prod
        return total

    def rates(self, num_rows: int, context: float = 0.0) -> list[float]:
        """Expected tokens per predicted second of each depth 0..max_depth at `num_rows` live rows of mean length
        `context` (a plain step charged its deferred MTP catch-up)."""
        tokens = [self.expected_tokens(d) for d in range(self.max_depth + 1)]
        times = [self.cost.plain(num_rows, context) + self.cost.catch_up(num_rows)]
        times += [self.cost.speculative(d, num_rows, context) for d in range(1, self.max_depth + 1)]
        return [t / s for t, s in zip(tokens, times)]

    def _best(self, rates: list[float]) -> int:
        return max(range(self.max_depth + 1), key=lambda d: (rates[d], -d))

    def choose(self, num_rows: int, context: float = 0.0) -> int:
        """The depth of the next step of `num_rows` live rows whose mean length is `context`."""
        num_rows = max(num_rows, 1)
        self.steps += 1
        if self.steps <= self.warmup_steps:
            return self.max_depth  # first steps: measure every alpha
        rates = self.rates(num_rows, context)
        best = self._best(rates)
        bucket = num_rows.bit_length()
        probe = self.probes.get(bucket)
        if probe is None or probe[0] != best:  # the choice changed: probe again soon
            probe = self.probes[bucket] = [best, self.probe_every, self.steps + self.probe_every]
        if best < self.max_depth and self.steps >= probe[2]:
            probe[1] = min(2 * probe[1], self.max_probe_gap)
            probe[2] = self.steps + probe[1]
            if self._probe_can_win(best, num_rows, context, rates):
                return best + 1
        return best

    def _probe_can_win(self, best: int, num_rows: int, context: float, rates: list[float]) -> bool:
        """Whether depth best+1 could beat best if its acceptance were perfect (alpha_{best+1} = 1): if not, a
        probe cannot change the choice (the step costs are what rule it out) and is skipped."""
        prod = 1.0
        for a in self.alphas()[:best]:
            prod *= a
        return (self.expected_tokens(best) + prod) / self.cost.speculative(best + 1, num_rows, context) > rates[best]

    def observe(self, depth: int, reached: list[int], accepted: list[int]) -> None:
        """A step at `depth`: per draft depth, the rows that tested a draft there and those that accepted it."""
        for j in range(min(depth, len(reached))):
            self.acc[j] = self.accept_forget * self.acc[j] + accepted[j]
            self.reach[j] = self.accept_forget * self.reach[j] + reached[j]

    def state_dict(self) -> dict:
        """Plain numbers (JSON- and weights_only-safe): acceptance counts, the step count and the probe schedule."""
        return {"acc": list(self.acc), "reach": list(self.reach), "steps": self.steps,
                "probes": [[k, *v] for k, v in sorted(self.probes.items())]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["acc"]) != self.max_depth or len(state["reach"]) != self.max_depth:
            raise ValueError(f"adaptive speculation state for {len(state['acc'])} draft depths, this engine drafts "
                             f"{self.max_depth}")
        self.acc, self.reach = [float(a) for a in state["acc"]], [float(r) for r in state["reach"]]
        self.steps = int(state["steps"])
        self.probes = {int(k): [int(b), int(g), int(n)] for k, b, g, n in state["probes"]}


class AdaptiveStates:
    """An engine's AdaptiveDepth per draft shape and sampling setting, kept across generate calls (an RL loop
    calls generate every step with the same settings: acceptance rates carry over, and forget old steps, so a
    policy that changes between calls is tracked), with the state a checkpoint keeps (plain numbers)."""

    def __init__(self) -> None:
        self._states: dict[tuple, AdaptiveDepth] = {}
        self._pending: dict[tuple, dict] = {}  # restored states of settings not used since (load_state_dict)

    def get(self, key: tuple, make: Callable[[], AdaptiveDepth]) -> AdaptiveDepth:
        """The state of setting `key` (plain values), made by `make` (and given its restored state) on first use."""
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = make()
            pending = self._pending.pop(key, None)
            if pending is not None:
                state.load_state_dict(pending)
        return state

    def __len__(self) -> int:
        return len(self._states)

    def values(self):
        return self._states.values()

    def state_dict(self) -> dict:
        states = {**self._pending, **{k: a.state_dict() for k, a in self._states.items()}}
        return {"adaptive": [[list(k), v] for k, v in states.items()]}

    def load_state_dict(self, state: dict) -> None:
        """Restore state_dict()'s output, applied to each setting when it is next used."""
        self._states.clear()
        self._pending = {tuple(k): v for k, v in state.get("adaptive", [])}
