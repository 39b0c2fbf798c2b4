"""Adaptive draft depth: the decision rule on hand-made measurements, and the engine's lazy MTP catch-up after
plain steps (MTP state equals a fresh full forward's whenever drafting starts)."""

from __future__ import annotations

import pytest
import torch

import mtprl.rollout.engine as engine_mod
from mtprl.rollout import Engine, SamplingParams, SpeculativeConfig
from mtprl.rollout.speculative import AdaptiveDepth


def _feed(ad: AdaptiveDepth, depth: int, rows: int, seconds: float, alpha: float, n: int = 1) -> None:
    for _ in range(n):
        reached = [100] * depth  # row-steps that tested each depth
        ad.observe(depth, rows, seconds, reached, [round(alpha * r) for r in reached])


def test_warmup_runs_the_deepest_first():
    ad = AdaptiveDepth(max_depth=3, warmup_steps=3)
    for _ in range(3):
        assert ad.choose(1) == 3
        _feed(ad, 3, 1, 0.010, alpha=0.5)
    assert ad.choose(1) == 0  # then one plain step to measure t(0)


def test_explores_deepest_then_plain_then_exploits():
    ad = AdaptiveDepth(max_depth=3, probe_every=1000, warmup_steps=1)
    assert ad.choose(4) == 3
    _feed(ad, 3, 4, 0.010, alpha=0.9, n=20)
    assert ad.choose(4) == 0
    _feed(ad, 0, 4, 0.005, alpha=0.0)
    # E(3) = 1 + .9 + .81 + .729 = 3.44 tokens in 10 ms beats 1 token in 5 ms
    assert ad.expected_tokens(3) == pytest.approx(1 + 0.9 + 0.81 + 0.729, abs=0.03)
    assert ad.choose(4) == 3


def test_low_acceptance_or_expensive_verification_picks_plain():
    ad = AdaptiveDepth(max_depth=3, probe_every=1000, warmup_steps=1)
    ad.choose(64)
    _feed(ad, 3, 64, 0.030, alpha=0.2, n=50)  # E(3) ~ 1.25 tokens for 6x the time
    ad.choose(64)
    _feed(ad, 0, 64, 0.005, alpha=0.0)
    assert ad.choose(64) == 0
    # a new batch-size bucket measures its own plain step first instead of exploring the deepest draft again
    assert ad.choose(40) == 0 and ad.choose(33) == 0
    _feed(ad, 0, 40, 0.004, alpha=0.0)
    assert ad.choose(40) == 0  # speculation predicted relative to it: 6x a plain step for 1.25 tokens


def test_new_bucket_learns_its_own_costs():
    ad = AdaptiveDepth(max_depth=3, probe_every=1000, warmup_steps=1)
    ad.choose(64)
    _feed(ad, 3, 64, 0.030, alpha=0.9, n=10)
    ad.choose(64)
    _feed(ad, 0, 64, 0.005, alpha=0.0, n=10)
    assert ad.choose(64) == 0  # E(3) = 3.44 tokens in 30 ms < 1 token in 5 ms
    assert ad.choose(2) == 0  # its own plain step first
    _feed(ad, 0, 2, 0.002, alpha=0.0)
    assert ad.choose(2) == 0  # predicted from 64 rows' ratio: 6x a plain step
    _feed(ad, 3, 2, 0.005, alpha=0.9, n=40)  # measured at 2 rows (e.g. probes): 2.5 plain steps for 3.44 tokens
    assert ad.choose(2) == 3


def test_new_bucket_predicts_relative_to_its_plain_step_and_probes_the_deepest():
    """A bucket without speculative measurements scales the nearest bucket's costs by the ratio of plain steps
    (absolute times of a big batch would rule speculation out for the tail for good), and probes the deepest
    draft once, even where the borrowed costs say no probe could win: those costs are only a guess."""
    ad = AdaptiveDepth(max_depth=3, probe_every=4, warmup_steps=1)
    ad.choose(64)
    _feed(ad, 3, 64, 0.060, alpha=0.9, n=10)  # 6x a plain step at 64 rows: E(3) = 3.44 tokens lose
    ad.choose(64)
    _feed(ad, 0, 64, 0.010, alpha=0.0, n=10)
    assert ad.choose(1) == 0  # first step at 1 row: its own plain step
    bucket = (1).bit_length()
    assert ad.predicted_time(0, bucket) is None and ad.predicted_time(3, bucket) is None  # nothing lent from 64
    _feed(ad, 0, 1, 0.001, alpha=0.0, n=10)  # plain is 10x cheaper with 1 row
    t0 = ad.predicted_time(0, bucket)
    assert t0 == pytest.approx(0.001)
    assert ad.predicted_time(3, bucket) == pytest.approx(t0 * 0.060 / 0.010)
    choices = [ad.choose(1) for _ in range(5)]
    assert choices.count(3) == 1 and choices.count(0) == 4  # the probe (E(1) = 2 tokens could not beat 6x either)
    _feed(ad, 3, 1, 0.002, alpha=0.9, n=5)  # measured: at 1 row a depth-3 step costs 2 plain steps
    assert ad.choose(1) == 3 and ad.choose(64) == 0


def test_a_new_bucket_never_keeps_another_buckets_plain_time():
    """The demo's RL batch thins out from 128 rows: a bucket first seen where speculation looks cheap relative to
    the big batch's plain step must still measure its own plain step (an earlier rule lent it the 64-row time,
    chose the deepest draft at once and never ran a plain step there to correct it)."""
    ad = AdaptiveDepth(max_depth=3, probe_every=1000, warmup_steps=1)
    ad.choose(64)
    _feed(ad, 3, 64, 0.030, alpha=0.8, n=10)
    ad.choose(64)
    _feed(ad, 0, 64, 0.020, alpha=0.0, n=10)  # 64 rows: E(3) = 2.95 tokens in 1.5 plain steps wins
    assert ad.choose(64) == 3
    assert ad.choose(4) == 0  # 4 rows: its own plain step first, whatever 64 rows suggest
    _feed(ad, 0, 4, 0.004, alpha=0.0)
    assert ad.choose(4) == 3  # predicted relative to it (1.5 plain steps): speculate, then measure
    _feed(ad, 3, 4, 0.014, alpha=0.8, n=10)  # measured: 3.5 plain steps at 4 rows for 2.95 tokens
    assert ad.choose(4) == 0


def test_interpolates_unmeasured_depths_and_probes():
    ad = AdaptiveDepth(max_depth=4, probe_every=4, warmup_steps=1)
    ad.choose(8)
    _feed(ad, 4, 8, 0.034, alpha=0.5, n=40)  # deep drafts rarely accepted
    ad.choose(8)
    _feed(ad, 0, 8, 0.010, alpha=0.0)
    # one depth measured: interpolated between plain and it, t(d) = t0 + (t(4) - t0) d / 4
    assert ad.predicted_time(2, (8).bit_length()) == pytest.approx(0.010 + 0.024 * 2 / 4)
    # plain: 1 token in 10 ms beats E(1) = 1.5 tokens in 16 ms, but 2 tokens (perfect acceptance) would not
    choices = [ad.choose(8) for _ in range(8)]
    assert choices.count(0) >= 6 and 1 in choices  # every probe_every steps one probe at best + 1


def test_no_probe_when_even_perfect_acceptance_cannot_pay():
    ad = AdaptiveDepth(max_depth=4, probe_every=2, warmup_steps=1)
    ad.choose(8)
    _feed(ad, 4, 8, 0.060, alpha=0.5, n=40)
    ad.choose(8)
    _feed(ad, 0, 8, 0.010, alpha=0.0)
    # t(1) = 22.5 ms: even 2 tokens per step lose to 1 token in 10 ms, so probing depth 1 is wasted work
    assert [ad.choose(8) for _ in range(10)] == [0] * 10


def test_unmeasured_depth_interpolates_between_measured_ones_and_extrapolates_above():
    ad = AdaptiveDepth(max_depth=4, probe_every=1000, warmup_steps=1)
    ad.choose(1)
    for d, t in ((4, 0.009), (2, 0.007), (4, 0.009), (2, 0.007)):
        _feed(ad, d, 1, t, alpha=0.9)
    _feed(ad, 0, 1, 0.004, alpha=0.0)
    assert ad.predicted_time(3, 1) == pytest.approx(0.008)  # between the measured depths 2 and 4, not from t(0)
    assert ad.predicted_time(1, 1) == pytest.approx(0.0055)  # between plain (4 ms) and depth 2 (7 ms)
    assert ad.predicted_time(0, 1) == pytest.approx(0.004)
    ad = AdaptiveDepth(max_depth=4, probe_every=1000, warmup_steps=1)
    _feed(ad, 1, 1, 0.006, alpha=0.9)
    _feed(ad, 2, 1, 0.007, alpha=0.9)
    _feed(ad, 0, 1, 0.004, alpha=0.0)
    assert ad.predicted_time(4, 1) == pytest.approx(0.009)  # along depths 1 -> 2
    _feed(ad, 3, 1, 0.0065, alpha=0.9)
    assert ad.predicted_time(4, 1) == pytest.approx(0.0065)  # a falling last segment extrapolates flat


def _charged_setup(small_bucket_speculates: bool) -> AdaptiveDepth:
    """64 rows: plain 6.5 ms against a depth-1 step of 11 ms emitting 1.6 tokens (145 vs 154 tokens/s: plain wins
    uncharged); 4 rows: a depth-1 step of 2.5 ms against plain 2.0 ms (speculation wins) or 3.5 ms (it loses)."""
    ad = AdaptiveDepth(max_depth=1, probe_every=1000, warmup_steps=1)
    _feed(ad, 1, 64, 0.011, alpha=0.6, n=10)
    _feed(ad, 0, 64, 0.0065, alpha=0.0, n=10)
    _feed(ad, 1, 4, 0.0025 if small_bucket_speculates else 0.0035, alpha=0.6, n=10)
    _feed(ad, 0, 4, 0.002, alpha=0.0, n=10)
    ad.steps = 10  # past the warm-up
    return ad


def test_plain_steps_are_charged_the_deferred_mtp_catch_up():
    """A plain step at 64 rows defers 64 row-positions of MTP catch-up (20 us each here: +1.28 ms on 6.5 ms), so
    plain's 1 token in 7.78 ms loses to depth 1's 1.6 tokens in 11 ms - once a catch-up was measured, and only
    while a smaller bucket speculates (where the batch will pay the catch-up when it thins out)."""
    ad = _charged_setup(small_bucket_speculates=True)
    assert ad.choose(64) == 0 and ad.choose(4) == 1  # no catch-up measured yet
    ad.observe_catch_up(64 * 10, 64 * 10 * 20e-6)
    assert ad.catch_up_seconds() == pytest.approx(20e-6)
    assert ad.choose(64) == 1
    ad = _charged_setup(small_bucket_speculates=False)
    ad.observe_catch_up(64 * 10, 64 * 10 * 20e-6)
    assert ad.choose(4) == 0 and ad.choose(64) == 0  # nothing speculates below: no catch-up would ever run
    ad = _charged_setup(small_bucket_speculates=True)
    ad.observe_catch_up(64 * 10, 64 * 10 * 5e-6)  # +0.32 ms: plain (1 token in 6.82 ms) still wins
    assert ad.choose(64) == 0


def test_engine_measures_its_catch_ups(draftable_model, monkeypatch):
    """Each catch-up reports b x the widest lag row-positions and its time to AdaptiveDepth.observe_catch_up."""
    model = draftable_model(num_mtp_layers=1, vocab=32, noise=0.1)
    schedule = iter([0, 0, 0, 0, 1] + [0] * 100)
    monkeypatch.setattr(AdaptiveDepth, "choose", lambda self, rows: next(schedule))
    seen = []
    monkeypatch.setattr(AdaptiveDepth, "observe_catch_up", lambda self, n, seconds: seen.append((n, seconds)))
    eng = Engine(model, max_num_seqs=2, max_seq_len=64)
    eng.generate([[1, 2, 3], [4, 5, 6]], SamplingParams(temperature=0.0, max_new_tokens=12),
                 speculative=SpeculativeConfig(num_steps=1, adaptive=True))
    # prompts of 3 committed lazily (MTP synced to length 1); the prefill's token and 4 plain ones make length 8
    assert len(seen) == 1 and seen[0][0] == 2 * 7 and seen[0][1] > 0


@pytest.mark.parametrize("hist_len", [64, 8])
def test_catch_up_after_plain_steps_restores_mtp_state(draftable_model, monkeypatch, hist_len):
    """Force a schedule with runs of plain steps; before every draft the MTP state (q_root, stored hidden) must
    equal the full forward's, i.e. the lagging positions (the prompt too: short prompts are committed lazily)
    were committed from the trunk's hidden states. A small ring (hist_len 8) also exercises eager prompt commits
    (prompts longer than the ring allows) and the speculative steps forced to keep the lag inside the ring."""
    monkeypatch.setattr(engine_mod, "HIST_LEN", hist_len)
    model = draftable_model(num_mtp_layers=2, vocab=32, noise=1.0)
    schedule = iter([3, 0, 0, 0, 2, 0, 1, 0, 0, 0, 0, 0, 3, 3, 0, 2] * 10)
    monkeypatch.setattr(AdaptiveDepth, "choose", lambda self, rows: next(schedule))
    captured = {"checks": 0}
    original_spec_step = Engine._spec_step
    original_draft = engine_mod.draft_tree

    def spec_step(self, run, b, depth):
        captured["run"] = run
        return original_spec_step(self, run, b, depth)

    def draft(model_, tree, tt, mtp, lengths, root, spec_rows, b, *args):
        rows = captured["run"].rows
        for i in range(b):
            L = int(lengths[i])
            out = model(rows.tokens[i, :L][None])
            torch.testing.assert_close(spec_rows.q_root_logits[i], out.mtp_logits[0][0, L - 2], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(spec_rows.stored_h[i, 1], out.mtp_hidden_states[1][0, L - 3], atol=1e-4, rtol=1e-4)
            captured["checks"] += 1
        return original_draft(model_, tree, tt, mtp, lengths, root, spec_rows, b, *args)

    monkeypatch.setattr(Engine, "_spec_step", spec_step)
    monkeypatch.setattr(engine_mod, "draft_tree", draft)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17, 18, 19]]
    params = SamplingParams(temperature=0.0, max_new_tokens=30)
    eng = Engine(model, max_num_seqs=2, max_seq_len=64)
    plain = eng.generate(prompts, params)
    out = eng.generate_with_metrics(prompts, params, speculative=SpeculativeConfig(num_steps=3, adaptive=True))
    assert [c.token_ids for c in out.completions] == [c.token_ids for c in plain]
    assert captured["checks"] > 10
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
    assert steps > 5 and state.plain and state.spec  # warm-up done: both kinds of step measured
    chosen = []
    original = AdaptiveDepth.choose

    def record(self, rows):
        chosen.append(original(self, rows))
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
    monkeypatch.setattr(AdaptiveDepth, "choose", lambda self, rows: 0)
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


def test_probes_back_off_while_the_choice_stays():
    """Plain wins but a perfect depth-1 step could win: probes come probe_every steps after the choice is made,
    then at doubling gaps (each probe from plain steps costs an MTP catch-up), capped at max_probe_gap."""
    ad = AdaptiveDepth(max_depth=4, probe_every=4, warmup_steps=1, max_probe_gap=32)
    ad.choose(8)
    _feed(ad, 4, 8, 0.034, alpha=0.5, n=40)
    ad.choose(8)
    _feed(ad, 0, 8, 0.010, alpha=0.0)
    start = ad.steps
    probes = [ad.steps - start for _ in range(150) if ad.choose(8) == 1]
    assert probes[:5] == [5, 13, 29, 61, 93]  # the choice made at step 1, then gaps 4, 8, 16, 32, 32
    assert all(b - a == 32 for a, b in zip(probes[3:], probes[4:]))


def test_long_plain_runs_need_no_catch_up_and_the_plan_counts_the_history(draftable_model, monkeypatch):
    """With the whole row of hidden-state history (HIST_LEN None, the default) a long run of plain steps never
    forces a speculative step or any MTP work; the memory plan adds one hidden state per slot to the bound."""
    from mtprl.rollout.kv_cache import kv_bytes_per_slot

    model = draftable_model(num_mtp_layers=1, vocab=32, noise=0.1)
    monkeypatch.setattr(AdaptiveDepth, "choose", lambda self, rows: 0)
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
