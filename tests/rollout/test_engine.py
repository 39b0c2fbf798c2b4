"""Plain decoding of the engine against the reference path (decode.py: full recompute, one sequence at a time)."""

from __future__ import annotations

import pytest
import torch

from mtprl.model import CausalLM, tiny_config
from mtprl.rollout import Engine, SamplingParams
from mtprl.rollout.decode import reference_generate
from mtprl.rollout.sampling import processed_logprobs, temperature_logprobs

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17], [3], [20, 21, 22]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CausalLM(tiny_config()).eval()


def _same_tokens(a, b):
    return [x.token_ids for x in a] == [y.token_ids for y in b]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "module"])
def test_greedy_continuous_batching_matches_reference(model, packed):
    """5 prompts of different lengths through 2 rows: rows finish (one by a stop token), get refilled. Both step
    paths: the packed fast path (default) and the model's own forward_step / mtp_step."""
    ref = reference_generate(model, PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=10))
    stop = ref[1].token_ids[3]  # make some sequence stop early
    params = SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=(stop,))
    ref = reference_generate(model, PROMPTS, params)
    assert any(c.finish_reason == "stop" for c in ref) and any(c.finish_reason == "length" for c in ref)
    out = Engine(model, max_num_seqs=2, max_seq_len=64, packed=packed).generate(PROMPTS, params)
    assert _same_tokens(out, ref)
    assert [c.finish_reason for c in out] == [c.finish_reason for c in ref]
    assert [c.prompt_index for c in out] == list(range(len(PROMPTS)))
    for c, r in zip(out, ref):
        assert c.logprobs == [0.0] * len(c.token_ids)
        assert c.trunk_logprobs == pytest.approx(r.trunk_logprobs, abs=1e-5)


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, max_new_tokens=8, n=2),
                                    SamplingParams(temperature=0.7, top_p=0.9, top_k=50, max_new_tokens=8, n=2)])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "module"])
def test_sampling_one_row_is_token_identical_to_reference(model, params, packed):
    """With one cache row the engine draws the same random numbers in the same order as the reference."""
    ref = reference_generate(model, PROMPTS, params, generator=torch.Generator().manual_seed(7))
    out = Engine(model, max_num_seqs=1, max_seq_len=64, packed=packed).generate(
        PROMPTS, params, generator=torch.Generator().manual_seed(7))
    assert _same_tokens(out, ref)
    for c, r in zip(out, ref):
        assert c.logprobs == pytest.approx(r.logprobs, abs=1e-5)
        assert c.trunk_logprobs == pytest.approx(r.trunk_logprobs, abs=1e-5)
    assert [(c.prompt_index, c.sample_index) for c in out] == [(i, j) for i in range(len(PROMPTS)) for j in range(2)]


def test_logprobs_match_full_forward(model):
    params = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=12, n=3)
    out = Engine(model, max_num_seqs=4, max_seq_len=64).generate(PROMPTS, params, generator=torch.Generator().manual_seed(1))
    for c in out:
        prompt = PROMPTS[c.prompt_index]
        seq = torch.tensor([prompt + c.token_ids])
        with torch.no_grad():
            logits = model(seq, compute_mtp=False).logits[0, len(prompt) - 1:-1]  # predicts each generated token
        tok = torch.tensor(c.token_ids)[:, None]
        want = processed_logprobs(logits, params).gather(1, tok).squeeze(1)
        want_trunk = temperature_logprobs(logits, params.temperature).gather(1, tok).squeeze(1)
        torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(c.trunk_logprobs), want_trunk, atol=1e-5, rtol=0)


def test_same_seed_same_output_and_batch_shapes(model):
    params = SamplingParams(temperature=1.0, max_new_tokens=10, n=4)
    eng = Engine(model, max_num_seqs=6, max_seq_len=64)
    a = eng.generate(PROMPTS, params, generator=torch.Generator().manual_seed(3))
    b = eng.generate(PROMPTS, params, generator=torch.Generator().manual_seed(3))
    c = eng.generate(PROMPTS, params, generator=torch.Generator().manual_seed(4))
    assert _same_tokens(a, b) and not _same_tokens(a, c)
    assert len(a) == len(PROMPTS) * 4 and all(len(x.token_ids) == 10 for x in a)


def test_weight_updates_between_calls_are_seen():
    """The packed copies are rebuilt every call: after an in-place update (what the optimizer does) the engine
    samples from the new weights, exactly as the reference does."""
    torch.manual_seed(0)
    model = CausalLM(tiny_config()).eval()
    eng = Engine(model, max_num_seqs=2, max_seq_len=32)
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    before = eng.generate(PROMPTS, params)
    with torch.no_grad():
        for p in model.layers.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
    after = eng.generate(PROMPTS, params)
    assert _same_tokens(after, reference_generate(model, PROMPTS, params))
    assert not _same_tokens(after, before)


def test_max_seq_len_caps_generation(model):
    out = Engine(model, max_num_seqs=3, max_seq_len=8).generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_new_tokens=50))
    assert [len(c.token_ids) for c in out] == [3, 6]
    assert all(c.finish_reason == "length" for c in out)


def test_kv_budget_limits_concurrency_but_not_results(model):
    """A budget that fits one sequence at a time gives the same greedy results as a roomy one."""
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    roomy = Engine(model, max_num_seqs=8, max_seq_len=32).generate_with_metrics(PROMPTS, params)
    tight = Engine(model, max_num_seqs=8, max_seq_len=32, kv_token_budget=15).generate_with_metrics(PROMPTS, params)
    assert _same_tokens(roomy.completions, tight.completions)
    # one live sequence at a time: every decode step serves one row
    assert tight.metrics.num_decode_steps == sum(len(c.token_ids) - 1 for c in tight.completions)
    assert roomy.metrics.num_decode_steps < tight.metrics.num_decode_steps
    assert roomy.metrics.num_generated_tokens == 30 and roomy.metrics.tokens_per_s > 0


def test_max_new_tokens_one_and_immediate_stop(model):
    ref = reference_generate(model, PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=1))
    out = Engine(model, max_num_seqs=2, max_seq_len=32).generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=1))
    assert _same_tokens(out, ref)
    first = ref[0].token_ids[0]
    out = Engine(model, max_num_seqs=2, max_seq_len=32).generate(
        PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=5, stop_token_ids=(first,)))
    assert out[0].token_ids == [first] and out[0].finish_reason == "stop"


def test_bad_inputs(model):
    eng = Engine(model, max_num_seqs=2, max_seq_len=16)
    with pytest.raises(ValueError, match="empty"):
        eng.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="max_seq_len"):
        eng.generate([list(range(16))], SamplingParams())
    with pytest.raises(ValueError, match="outside"):
        eng.generate([[100000]], SamplingParams())
    with pytest.raises(ValueError, match="kv_token_budget"):
        Engine(model, max_num_seqs=2, max_seq_len=16, kv_token_budget=4).generate([[1, 2]], SamplingParams(max_new_tokens=8))
    with pytest.raises(ValueError, match="SamplingParams"):
        eng.generate([[1]], {"temperature": 1.0})
    with pytest.raises(ValueError):
        Engine(model, max_num_seqs=0)


def test_kv_cache_bytes_bounds_the_rows_not_the_results(draftable_model):
    """kv_cache_bytes for 3 plain rows of max_num_seqs 8: K+V per slot = 2 x 2 layers x 2 heads x 8 x 4 bytes = 256 B
    (2 x (2 + 2 MTP) layers x 2 x 8 x 4 = 512 B when speculating), 32 + 2 slots a plain row, 32 + 3 + 3 a chain-of-2
    row; beside its slots a row costs 16 B a slot (token ids, logprobs) and 16 B per vocabulary entry of each
    scored position (its logits and three fp32 rows): 34 x 16 + 32 x 16 = 1056 B plain, and speculating 38 x 16 +
    the draft logits and 2 MTP hidden states (32 + 2 x 32) x 4 + 3 nodes x 32 x 16 = 2528 B. All
    5 prompts x 2 samples come out as with an unbounded engine; a speculative call re-plans to the 1 row that
    fits with the MTP cache, and keeps it for later plain calls."""
    from mtprl.rollout import SpeculativeConfig

    model = draftable_model(num_mtp_layers=2, vocab=32)
    bound = 3 * (34 * 256 + 1056) + 100
    eng = Engine(model, max_num_seqs=8, max_seq_len=32, kv_cache_bytes=bound)
    spec = SpeculativeConfig(num_steps=2)
    plain_plan, spec_plan = eng.cache_plan(), eng.cache_plan(spec)
    assert (plain_plan.rows, plain_plan.slots, plain_plan.bytes_per_slot) == (3, 34, 256)
    assert (spec_plan.rows, spec_plan.slots, spec_plan.bytes_per_slot) == (1, 38, 512)  # 29380 // (19456 + 2528)
    assert (plain_plan.row_bytes, spec_plan.row_bytes) == (1056, 2528)
    params = SamplingParams(temperature=0.0, max_new_tokens=8, n=2)
    want = Engine(model, max_num_seqs=8, max_seq_len=32).generate(PROMPTS, params)
    got = eng.generate_with_metrics(PROMPTS, params)
    assert eng._trunk_cache.num_rows == 3 and got.metrics.num_sequences == 10
    assert _same_tokens(got.completions, want)
    assert _same_tokens(eng.generate(PROMPTS, params, speculative=spec), want)
    assert eng._trunk_cache.num_rows == eng._mtp_cache.num_rows == 1
    assert _same_tokens(eng.generate(PROMPTS, params), want) and eng._trunk_cache.num_rows == 1
    with pytest.raises(ValueError, match=r"kv_cache_bytes: one KV cache row of 34 slots"):
        Engine(model, max_num_seqs=8, max_seq_len=32, kv_cache_bytes=34 * 256 + 1056 - 1).generate(PROMPTS, params)
    with pytest.raises(ValueError, match="kv_cache_bytes must be > 0"):
        Engine(model, kv_cache_bytes=0)


def test_kv_budget_is_measured_again_when_the_cache_is_allocated_from_nothing(model):
    """An engine with kv_budget (build_engine's on CUDA) asks it for the bound at its first allocation and at the
    first after release(): 3 rows fit, then - with more memory free after the update - 5."""
    from mtprl.rollout.kv_cache import engine_row_bytes, kv_bytes_per_slot

    slots = 24 + 2
    row = slots * kv_bytes_per_slot(model.config, torch.float32, False) + engine_row_bytes(model.config, torch.float32,
                                                                                          slots, False)
    budgets = iter([3 * row + 1, 5 * row + 1])
    eng = Engine(model, max_num_seqs=8, max_seq_len=24, kv_budget=lambda: next(budgets))
    params = SamplingParams(temperature=0.0, max_new_tokens=4)
    eng.generate([[1, 2, 3]], params)
    assert eng._trunk_cache.num_rows == 3
    eng.generate([[1, 2, 3]], params)  # the cache is kept: no new measurement
    assert eng._trunk_cache.num_rows == 3
    eng.release()
    eng.generate([[1, 2, 3]], params)
    assert eng._trunk_cache.num_rows == 5


def test_admission_tells_the_step_it_is_a_prefill(draftable_model, monkeypatch):
    """The prompt's trunk forward and its first MTP commit say prefill=True (on CUDA the step cannot check its slots
    without a host sync, and only then takes SDPA's maskless causal path); on the CPU the step checks the claim."""
    from mtprl.model.packed import PackedModel
    from mtprl.rollout import SpeculativeConfig

    seen = []
    for name in ("forward_step", "mtp_step"):
        original = getattr(PackedModel, name)

        def record(self, *args, _name=name, _original=original, **kwargs):
            seen.append((_name, kwargs.get("prefill", False)))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(PackedModel, name, record)
    eng = Engine(draftable_model(num_mtp_layers=2, vocab=32), max_num_seqs=4, max_seq_len=32)
    eng.generate([[1, 2, 3, 4], [5, 6]], SamplingParams(temperature=0.0, max_new_tokens=3, n=2),
                 speculative=SpeculativeConfig(num_steps=2))
    # the prompts' forward, then the commit of their positions (layer 1 a prefill, layer 2 from the scratch slot)
    assert seen[:3] == [("forward_step", True), ("mtp_step", True), ("mtp_step", False)]
    assert not any(p for _, p in seen[3:])


def test_an_engine_in_bf16_over_an_fp32_policy_decodes_as_the_bf16_policy(model):
    """Engine(dtype=bf16) over fp32 weights (build_engine's choice on CUDA): its packed copy and caches are bf16 and
    it generates what an engine over a bf16 copy of the policy generates; the module path refuses the mix."""
    import copy

    eng = Engine(model, max_num_seqs=4, max_seq_len=32, dtype=torch.bfloat16)
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=2)
    got = eng.generate(PROMPTS[:3], params, generator=torch.Generator().manual_seed(0))
    want = Engine(copy.deepcopy(model).to(torch.bfloat16), max_num_seqs=4, max_seq_len=32).generate(
        PROMPTS[:3], params, generator=torch.Generator().manual_seed(0))
    assert _same_tokens(got, want)
    assert [c.logprobs for c in got] == [c.logprobs for c in want]
    assert eng.current_stepper().head.dtype == eng._trunk_cache.k.dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="needs the packed path"):
        Engine(model, dtype=torch.bfloat16, packed=False)
