"""Adaptive draft depth: the decision rule on hand-set costs, the cost table by hand and against live op counts,
choices that never read a clock, the state a resumed run continues, and the engine's lazy MTP catch-up after
plain steps (MTP state equals a fresh full forward's whenever drafting starts)."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mtprl.rollout.engine as engine_mod
from mtprl.model import ModelConfig
from mtprl.rollout import Engine, SamplingParams, SpeculativeConfig
from mtprl.rollout.adaptive import DEVICE_RATES, OP_COUNTS, AdaptiveDepth, DeviceRates, StepCost
from mtprl.rollout.tree import build_tree
from tests.rollout.mtp_state import watch_mtp_state


class TableCost:
    """A StepCost with hand-set seconds: plain[rows] and spec[depth] (the same at every row count unless given
    as a dict rows -> seconds); catch_up seconds per row."""

    def __init__(self, plain, spec, catch_up=0.0):
        self._plain, self._spec, self._catch_up = plain, spec, catch_up

    @staticmethod
    def _at(value, rows):
        return value[rows] if isinstance(value, dict) else value

    def plain(self, rows, context=0.0):
        return self._at(self._plain, rows)

    def speculative(self, depth, rows, context=0.0):
        return self._at(self._spec[depth], rows)

    def catch_up(self, rows):
        return self._catch_up * rows


def _feed(ad: AdaptiveDepth, depth: int, alpha: float, n: int = 1) -> None:
    for _ in range(n):
        reached = [100] * depth  # row-steps that tested each depth
        ad.observe(depth, reached, [round(alpha * r) for r in reached])


def _past_warmup(ad: AdaptiveDepth, alpha: float, n: int = 200) -> AdaptiveDepth:
    """Acceptance alpha at every depth, measured by n deepest steps (the prior of 2/2 forgotten)."""
    for _ in range(ad.warmup_steps):
        assert ad.choose(1) == ad.max_depth
    _feed(ad, ad.max_depth, alpha, n)
    return ad


def test_warmup_runs_the_deepest_first():
    ad = AdaptiveDepth(max_depth=3, cost=TableCost(0.005, {1: 0.1, 2: 0.1, 3: 0.1}), warmup_steps=3)
    assert [ad.choose(1) for _ in range(3)] == [3, 3, 3]
    assert ad.choose(1) == 0  # then the costs decide: speculation at 20x a plain step never pays


def test_picks_the_depth_with_the_most_tokens_per_predicted_second():
    ad = _past_warmup(AdaptiveDepth(max_depth=3, cost=TableCost(0.005, {1: 0.006, 2: 0.008, 3: 0.010}),
                                    probe_every=1000, warmup_steps=1), alpha=0.9)
    # E(d) = 1 + .9 + .81 + .729: 1/5 = 0.200, 1.9/6 = 0.317, 2.71/8 = 0.339, 3.439/10 = 0.344 tokens per ms
    assert ad.expected_tokens(3) == pytest.approx(1 + 0.9 + 0.81 + 0.729, abs=1e-3)
    assert ad.rates(4) == pytest.approx([200, 1.9 / 0.006, 2.71 / 0.008, 3.439 / 0.010], rel=1e-3)
    assert ad.choose(4) == 3
    ad = _past_warmup(AdaptiveDepth(max_depth=3, cost=TableCost(0.005, {1: 0.006, 2: 0.008, 3: 0.012}),
                                    probe_every=1000, warmup_steps=1), alpha=0.9)
    assert ad.choose(4) == 2  # 3.439 / 12 = 0.287 < 2.71 / 8 = 0.339 tokens per ms


def test_low_acceptance_or_expensive_verification_picks_plain_and_the_rows_decide():
    # 1 row: a depth-1 step costs 1.2 plain steps; 64 rows: 2 plain steps
    cost = TableCost({1: 0.005, 64: 0.010}, {1: {1: 0.006, 64: 0.020}})
    ad = _past_warmup(AdaptiveDepth(max_depth=1, cost=cost, probe_every=1000, warmup_steps=1), alpha=0.6)
    assert ad.choose(1) == 1 and ad.choose(64) == 0  # 1.6 / 1.2 = 1.33 > 1 > 1.6 / 2 = 0.8 plain steps' worth
    ad = _past_warmup(AdaptiveDepth(max_depth=1, cost=cost, probe_every=1000, warmup_steps=1), alpha=0.1)
    assert ad.choose(1) == 0  # 1.1 tokens for 1.2 plain steps


def test_plain_steps_are_charged_the_deferred_mtp_catch_up():
    """64 rows: plain 6.5 ms against a depth-1 step of 11 ms emitting 1.6 tokens (154 vs 145 tokens/s: plain wins
    uncharged); a plain step defers 64 row-positions of MTP catch-up (20 us each: +1.28 ms), and then loses
    (1 token in 7.78 ms = 128.5 tokens/s)."""
    uncharged = TableCost({64: 0.0065}, {1: 0.011})
    ad = _past_warmup(AdaptiveDepth(max_depth=1, cost=uncharged, probe_every=1000, warmup_steps=1), alpha=0.6)
    assert ad.choose(64) == 0
    charged = TableCost({64: 0.0065}, {1: 0.011}, catch_up=20e-6)
    ad = _past_warmup(AdaptiveDepth(max_depth=1, cost=charged, probe_every=1000, warmup_steps=1), alpha=0.6)
    assert ad.rates(64)[0] == pytest.approx(1 / 0.00778)
    assert ad.choose(64) == 1


def test_probes_and_no_probe_when_even_perfect_acceptance_cannot_pay():
    # plain: 1 token in 10 ms beats E(1) = 1.5 tokens in 16 ms, but 2 tokens (perfect acceptance) would not
    cost = TableCost(0.010, {d: 0.010 + 0.006 * d for d in range(1, 5)})
    ad = _past_warmup(AdaptiveDepth(max_depth=4, cost=cost, probe_every=4, warmup_steps=1), alpha=0.5)
    choices = [ad.choose(8) for _ in range(8)]
    assert choices == [0, 0, 0, 0, 1, 0, 0, 0]  # the choice made at step 2, its first probe 4 steps later
    cost = TableCost(0.010, {d: 0.010 + 0.0125 * d for d in range(1, 5)})  # t(1) = 22.5 ms: 2 tokens lose
    ad = _past_warmup(AdaptiveDepth(max_depth=4, cost=cost, probe_every=2, warmup_steps=1), alpha=0.5)
    assert [ad.choose(8) for _ in range(10)] == [0] * 10


def test_probes_back_off_while_the_choice_stays():
    """Plain wins but a perfect depth-1 step could win: probes come probe_every steps after the choice is made,
    then at doubling gaps (each probe from plain steps costs an MTP catch-up), capped at max_probe_gap."""
    cost = TableCost(0.010, {d: 0.010 + 0.006 * d for d in range(1, 5)})
    ad = _past_warmup(AdaptiveDepth(max_depth=4, cost=cost, probe_every=4, warmup_steps=1, max_probe_gap=32),
                      alpha=0.5)
    start = ad.steps
    probes = []
    for _ in range(150):
        depth = ad.choose(8)
        if depth == 1:
            probes.append(ad.steps - start)
            _feed(ad, 1, alpha=0.5)  # the probe confirms alpha_1: the choice stays plain
    assert probes[:5] == [5, 13, 29, 61, 93]  # the choice made at start + 1, then gaps 4, 8, 16, 32, 32
    assert all(b - a == 32 for a, b in zip(probes[3:], probes[4:]))


def test_state_dict_continues_the_same_choices():
    cost = TableCost({1: 0.005, 64: 0.010}, {1: {1: 0.006, 64: 0.020}, 2: {1: 0.007, 64: 0.030}})

    def run(ad, rows_seq, first=0):
        out = []
        for i, rows in enumerate(rows_seq, first):
            d = ad.choose(rows)
            out.append(d)
            _feed(ad, d, alpha=0.3 + 0.5 * ((i * 7919) % 13) / 13)
        return out

    rows_seq = [64, 64, 1, 1, 64, 1] * 20
    reference = AdaptiveDepth(max_depth=2, cost=cost, probe_every=3, warmup_steps=2)
    expected = run(reference, rows_seq)
    first = AdaptiveDepth(max_depth=2, cost=cost, probe_every=3, warmup_steps=2)
    head = run(first, rows_seq[:50])
    state = first.state_dict()
    resumed = AdaptiveDepth(max_depth=2, cost=cost, probe_every=3, warmup_steps=2)
    resumed.load_state_dict(state)
    assert head + run(resumed, rows_seq[50:], first=50) == expected
    assert len(set(expected)) == 3  # every depth chosen somewhere: the state matters
    with pytest.raises(ValueError, match="for 3 draft depths, this engine drafts 2"):
        AdaptiveDepth(max_depth=2, cost=cost).load_state_dict(state | {"acc": [1.0] * 3, "reach": [1.0] * 3})


def test_step_cost_by_hand():
    """StepCost's arithmetic on a tiny config, one term at a time (the other rates made free)."""
    cfg = ModelConfig(model_type="mimo", vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, num_mtp_layers=1)
    chain = build_tree(3, 1, 4)
    cost = StepCost(cfg, chain, torch.float32, "cpu", threads=1)
    # block: q, o 8x8 each, k, v 8x4 each (head_dim 4) = 192; gate, up, down 3 x 8 x 16 = 384 -> 576; MTP + 2 x 8 x 8
    assert (cost.block_params, cost.mtp_params, cost.head_params) == (576, 704, 800)
    # elements a token passes through a block: 4 x 8 (stream, norms, RoPE) + 4 x (2 + 2 + 1 + 1) (q, o, k, v)
    # + 3 x 16 (gate, up, product) = 104; K and V per cached position: 2 x 1 head x 4 = 8
    assert (cost.block_elements, cost.kv_elements) == (104, 8)
    free = 1e30
    cost.rates = DeviceRates(op_seconds=1.0, flops_per_s=free, element_seconds=0.0, bytes_per_s=free)  # ops
    ops = OP_COUNTS
    assert cost.plain(1) == pytest.approx(2 * ops["block"] + ops["plain"], rel=1e-6)
    assert cost.speculative(3, 1) == pytest.approx(2 * ops["block"] + ops["spec_chain"] + 2 * ops["level_chain"],
                                                    rel=1e-6)
    cost.rates = DeviceRates(op_seconds=0.0, flops_per_s=1.0, element_seconds=0.0, bytes_per_s=free)  # flops
    assert cost.plain(5) == 2 * 5 * (576 * 2 + 800)
    # depth 2 over 5 rows: 3 verified nodes, MTP over 1 drafted node + the 3-token commit, heads over 3 verified
    # nodes + 2 draft distributions + the commit's
    assert cost.speculative(2, 5) == 2 * 5 * (576 * 2 * 3 + 704 * 4 + 800 * 6)
    assert cost.catch_up(5) == 2 * 5 * 704
    cost.rates = DeviceRates(op_seconds=0.0, flops_per_s=free, element_seconds=1.0, bytes_per_s=free)  # elements
    # plain, 5 rows of mean length 10: 104 x 2 blocks + 4 passes x 100 vocabulary + 10 positions x 8 x 2 layers
    assert cost.plain(5, context=10) == pytest.approx(5 * (104 * 2 + 4 * 100 + 10 * 8 * 2))
    # depth 2: 104 x (2 blocks x 3 nodes + 4 MTP tokens) + 4 x 100 x 6 scored + 10 x 8 x (2 layers + 2 MTP forwards)
    assert cost.speculative(2, 5, context=10) == pytest.approx(5 * (104 * 10 + 4 * 100 * 6 + 10 * 8 * 4))
    cost.rates = DeviceRates(op_seconds=0.0, flops_per_s=free, element_seconds=0.0, bytes_per_s=1.0)  # weights
    assert cost.plain(1) == pytest.approx(4 * (576 * 2 + 800))
    assert cost.speculative(2, 1) == pytest.approx(4 * (576 * 2 + 704 * 2 + 800 * 3))  # 2 MTP forwards, 3 heads
    tree = build_tree(2, 2, 5)  # root, 2 children, 2 grandchildren under the first
    tcost = StepCost(cfg, tree, torch.float32, "cpu", threads=1)
    tcost.rates = DeviceRates(op_seconds=1.0, flops_per_s=free, element_seconds=0.0, bytes_per_s=free)
    assert tcost.speculative(2, 1) == pytest.approx(2 * ops["block"] + ops["spec_tree"] + ops["level_tree"])
    assert StepCost(cfg, chain, torch.bfloat16, "cuda").rates == DEVICE_RATES["cuda"]
    four = StepCost(cfg, chain, torch.float32, "cpu", threads=4).rates  # CPU rates are per thread
    assert (four.flops_per_s, four.element_seconds) == (4 * DEVICE_RATES["cpu"].flops_per_s,
                                                        DEVICE_RATES["cpu"].element_seconds / 4)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layers", [2, 6])
@pytest.mark.parametrize("topk", [1, 2])
def test_op_counts_match_live_steps(draftable_model, monkeypatch, layers, topk):
    """OP_COUNTS (the cost table's per-op term) within 20% of the ops a packed decode step really dispatches, for
    plain steps and each speculative depth: a change to the decode path that moves them fails here."""
    from mtprl.model import CausalLM, ModelConfig as Cfg

    torch.manual_seed(0)
    cfg = Cfg(model_type="mimo", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, attention_bias=True,
              num_mtp_layers=1)
    model = CausalLM(cfg).eval()
    counts = {}
    original_plain, original_spec = Engine._plain_step, Engine._spec_step

    def plain(self, run, b):
        with _CountOps() as c:
            out = original_plain(self, run, b)
        counts.setdefault(0, []).append(c.n)
        return out

    def spec(self, run, b, depth):
        with _CountOps() as c:
            out = original_spec(self, run, b, depth)
        counts.setdefault(depth, []).append(c.n)
        return out

    monkeypatch.setattr(Engine, "_plain_step", plain)
    monkeypatch.setattr(Engine, "_spec_step", spec)
    eng = Engine(model, max_num_seqs=8, max_seq_len=128, packed=True)
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=10, stop_token_ids=[])
    eng.generate([list(range(1, 12))], params, generator=torch.Generator().manual_seed(0))
    tree = build_tree(3, topk, 1 + 3 * topk)
    for depth in (1, 2, 3):
        eng.generate([list(range(1, 12))], params, SpeculativeConfig(num_steps=depth, eagle_topk=topk),
                     torch.Generator().manual_seed(0))
    cost = StepCost(cfg, tree, torch.float32, "cpu", threads=1)
    cost.rates = DeviceRates(op_seconds=1.0, flops_per_s=1e30, element_seconds=0.0, bytes_per_s=1e30)  # the op count
    for depth in (0, 1, 2, 3):
        live = sorted(counts[depth])[len(counts[depth]) // 2]
        assert cost.step(depth, 4) == pytest.approx(live, rel=0.2), (depth, live)


def test_depth_choices_do_not_depend_on_the_clock(draftable_model, monkeypatch):
    """The same generate call twice, the second under a clock that jumps at random: the same depths, the same
    tokens (the choice reads predicted costs only; a rule fed step timings gave different samples here)."""
    import random
    import time as time_mod

    model = draftable_model(num_mtp_layers=1, vocab=32, noise=0.5)
    spec = SpeculativeConfig(num_steps=3, adaptive=True)
    params = SamplingParams(n=6, temperature=1.0, max_new_tokens=40)
    prompts = [[1, 2, 3], [4, 5, 6, 7]]

    def run():
        eng = Engine(model, max_num_seqs=12, max_seq_len=64)
        depths = []
        original = AdaptiveDepth.choose
        monkeypatch.setattr(AdaptiveDepth, "choose",
                            lambda self, rows, context=0.0: depths.append(original(self, rows, context)) or depths[-1])
        outs = [eng.generate(prompts, params, spec, torch.Generator().manual_seed(k)) for k in range(3)]
        monkeypatch.setattr(AdaptiveDepth, "choose", original)
        return [c.token_ids for o in outs for c in o], depths

    tokens, depths = run()
    jitter = random.Random(0)
    real = time_mod.perf_counter
    monkeypatch.setattr(time_mod, "perf_counter", lambda: real() + jitter.random())
    again, depths_again = run()
    assert again == tokens and depths_again == depths
    assert len(set(depths)) > 1  # the rule did choose between depths


def test_engine_state_dict_resumes_adaptive_speculation(draftable_model):
    """A fresh engine given state_dict() after call 1 makes call 2 exactly as the engine that ran both."""
    model = draftable_model(num_mtp_layers=1, vocab=32, noise=0.5)
    spec = SpeculativeConfig(num_steps=3, adaptive=True)
    params = SamplingParams(n=6, temperature=1.0, max_new_tokens=40)
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    first = Engine(model, max_num_seqs=12, max_seq_len=64)
    first.generate(prompts, params, spec, torch.Generator().manual_seed(0))
    state = first.state_dict()
    expected = first.generate_with_metrics(prompts, params, spec, torch.Generator().manual_seed(1))
    resumed = Engine(model, max_num_seqs=12, max_seq_len=64)
    resumed.load_state_dict(state)
    out = resumed.generate_with_metrics(prompts, params, spec, torch.Generator().manual_seed(1))
    assert [c.token_ids for c in out.completions] == [c.token_ids for c in expected.completions]
    assert out.metrics.mean_draft_depth == expected.metrics.mean_draft_depth
    fresh = Engine(model, max_num_seqs=12, max_seq_len=64).generate_with_metrics(
        prompts, params, spec, torch.Generator().manual_seed(1))
    assert fresh.metrics.mean_draft_depth != expected.metrics.mean_draft_depth  # (the state is what made it equal)
    assert resumed.state_dict() == first.state_dict()
    json.dumps(state)  # plain numbers


@pytest.mark.parametrize("hist_len,batched_tokens", [(64, 4096), (8, 4096), (64, 4)])
def test_catch_up_after_plain_steps_restores_mtp_state(draftable_model, monkeypatch, hist_len, batched_tokens):
    """Force a schedule with runs of plain steps; before every draft the MTP state (q_root, stored hidden) must
    equal the full forward's, i.e. the lagging positions (the prompt too: short prompts are committed lazily)
    were committed from the trunk's hidden states. A small ring (hist_len 8) also exercises eager prompt commits
    (prompts longer than the ring allows) and the speculative steps forced to keep the lag inside the ring;
    max_num_batched_tokens 4 splits each catch-up of 2 rows into calls of 2 positions."""
    monkeypatch.setattr(engine_mod, "HIST_LEN", hist_len)
    commits = []
    original_commit = engine_mod.commit_mtp
    monkeypatch.setattr(engine_mod, "commit_mtp", lambda *a, **k: commits.append(a[4].numel()) or original_commit(*a, **k))
    model = draftable_model(num_mtp_layers=2, vocab=32, noise=1.0)
    schedule = iter([3, 0, 0, 0, 2, 0, 1, 0, 0, 0, 0, 0, 3, 3, 0, 2] * 10)
    monkeypatch.setattr(AdaptiveDepth, "choose", lambda self, rows, context=0.0: next(schedule))
    checks = watch_mtp_state(monkeypatch, model, num_mtp=2)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17, 18, 19]]
    params = SamplingParams(temperature=0.0, max_new_tokens=30)
    eng = Engine(model, max_num_seqs=2, max_seq_len=64, max_num_batched_tokens=batched_tokens)
    plain = eng.generate(prompts, params)
    out = eng.generate_with_metrics(prompts, params, speculative=SpeculativeConfig(num_steps=3, adaptive=True))
    if batched_tokens == 4:
        assert max(commits) <= 4 * 3  # catch-ups in chunks (a spec step's commit: 2 rows x at most 4 tokens)
    assert [c.token_ids for c in out.completions] == [c.token_ids for c in plain]
    assert checks["rows"] > 10
    assert 0.5 < out.metrics.mean_draft_depth < 2.5


def test_adaptive_state_is_kept_across_generate_calls(draftable_model, monkeypatch):
    """The exploration is paid once per engine and setting: a second call with the same speculative and sampling
    settings continues the same AdaptiveDepth (its measurements and step count); another temperature gets its
    own state."""
    model = draftable_model(num_mtp_layers=1, vocab=32, noise=0.1)
    eng = Engine(model, max_num_seqs=2, max_seq_len=64)
    spec = SpeculativeConfig(num_steps=3, adaptive=True)
    params = SamplingParams(temperature=1.0, max_new_tokens=20)
    eng.generate([[1, 2, 3], [4, 5]], params, speculative=spec, generator=torch.Generator().manual_seed(0))
    (state,) = eng._adaptive.values()
    steps = state.steps
    assert steps > 5 and state.reach != [2.0] * 3  # acceptance measured
    chosen = []
    original = AdaptiveDepth.choose

    def record(self, rows, context=0.0):
        chosen.append(original(self, rows, context))
        return chosen[-1]

    monkeypatch.setattr(AdaptiveDepth, "choose", record)
    eng.generate([[1, 2, 3], [4, 5]], params, speculative=spec, generator=torch.Generator().manual_seed(1))
    assert list(eng._adaptive.values()) == [state] and state.steps == steps + len(chosen)
    eng.generate([[1, 2, 3]], SamplingParams(temperature=0.5, max_new_tokens=8), speculative=spec)
    assert len(eng._adaptive) == 2


def test_adaptive_plain_steps_do_no_mtp_work_and_packing_is_skipped_when_weights_did_not_change(draftable_model,
                                                                                                monkeypatch):
    """When adaptive speculation runs only plain steps, no MTP forward runs at all (short prompts are committed
    lazily); and the engine re-packs its weight copy only after the weights changed."""
    from mtprl.model.packed import PackedModel

    model = draftable_model(num_mtp_layers=1, vocab=32, noise=0.1)
    monkeypatch.setattr(AdaptiveDepth, "choose", lambda self, rows, context=0.0: 0)
    packs = []
    original_pack = PackedModel.pack
    monkeypatch.setattr(PackedModel, "pack", lambda self: packs.append(1) or original_pack(self))
    eng = Engine(model, max_num_seqs=4, max_seq_len=64)
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    spec = SpeculativeConfig(num_steps=3, adaptive=True)
    out = eng.generate_with_metrics([[1, 2, 3], [4, 5]], params, speculative=spec)
    assert out.metrics.num_draft_forwards == 0 and out.metrics.num_decode_steps > 5
    eng.generate([[1, 2, 3]], params)
    assert len(packs) == 1  # built once, not rebuilt: nothing changed
    with torch.no_grad():
        next(model.parameters()).mul_(1.01)  # in place, as an optimizer step
    eng.generate([[1, 2, 3]], params)
    assert len(packs) == 2
    with torch.no_grad():
        p = next(model.parameters())
        p.data = p.data.clone()  # replaced storage
    eng.generate([[1, 2, 3]], params)
    assert len(packs) == 3


def test_long_plain_runs_need_no_catch_up_and_the_plan_counts_the_history(draftable_model, monkeypatch):
    """With the whole row of hidden-state history (HIST_LEN None, the default) a long run of plain steps never
    forces a speculative step or any MTP work; the memory plan adds one hidden state per slot to the bound."""
    from mtprl.rollout.kv_cache import kv_bytes_per_slot

    model = draftable_model(num_mtp_layers=1, vocab=32, noise=0.1)
    monkeypatch.setattr(AdaptiveDepth, "choose", lambda self, rows, context=0.0: 0)
    eng = Engine(model, max_num_seqs=2, max_seq_len=160)
    spec = SpeculativeConfig(num_steps=3, adaptive=True)
    out = eng.generate_with_metrics([[1, 2, 3], [4, 5]], SamplingParams(temperature=1.0, max_new_tokens=150),
                                    speculative=spec)
    assert out.metrics.num_decode_steps >= 149 and out.metrics.num_draft_forwards == 0
    assert out.metrics.mean_draft_depth == 0.0
    cfg = model.config
    kv = 2 * (cfg.num_hidden_layers + 1) * cfg.num_key_value_heads * cfg.resolved_head_dim * 4
    assert kv_bytes_per_slot(cfg, torch.float32, True) == kv
    assert eng.cache_plan(spec).bytes_per_slot == kv + cfg.hidden_size * 4
    assert eng.cache_plan(SpeculativeConfig(num_steps=3)).bytes_per_slot == kv
    assert eng._spec_rows[1].hist.shape[1] == eng._trunk_cache.max_seq_len  # the whole row
