"""Speculative decoding with MTP drafts: token-identical to plain greedy decoding (chain, tree, K > D recursion,
adaptive), trunk logprobs, and consistency of the MTP caches with a fresh full-sequence forward."""

from __future__ import annotations

import pytest
import torch

from mtprl.rollout import Engine, SamplingParams, SpeculativeConfig
from mtprl.rollout.sampling import processed_logprobs, temperature_logprobs
from mtprl.rollout.speculative import SpecRows, StepCounters, commit_mtp, draft_tree, verify_and_accept
from mtprl.rollout.tree import build_tree
from tests.rollout.mtp_state import watch_mtp_state

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13], [14, 15, 0, 1, 2], [3, 3, 3, 3]]

SPECS = {
    "chain1": SpeculativeConfig(num_steps=1),
    "chain3": SpeculativeConfig(num_steps=3),
    "tree": SpeculativeConfig(num_steps=3, eagle_topk=2, num_draft_tokens=6),
    "wide_tree": SpeculativeConfig(num_steps=2, eagle_topk=3, num_draft_tokens=7),
}


@pytest.mark.parametrize("num_mtp", [1, 2])
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_greedy_speculative_is_token_identical_to_plain(draftable_model, num_mtp, spec_name):
    model = draftable_model(num_mtp_layers=num_mtp, seed=num_mtp, noise=1.0)
    eng = Engine(model, max_num_seqs=4, max_seq_len=64)  # 6 prompts through 4 rows: continuous batching
    plain = eng.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=20))
    stop = plain[0].token_ids[7]
    params = SamplingParams(temperature=0.0, max_new_tokens=20, stop_token_ids=(stop,))
    plain = eng.generate(PROMPTS, params)
    out = eng.generate_with_metrics(PROMPTS, params, speculative=SPECS[spec_name])
    assert [c.token_ids for c in out.completions] == [c.token_ids for c in plain]
    assert [c.finish_reason for c in out.completions] == [c.finish_reason for c in plain]
    for c, p in zip(out.completions, plain):
        assert c.trunk_logprobs == pytest.approx(p.trunk_logprobs, abs=1e-4)
    m = out.metrics
    # ragged: drafts are accepted sometimes, not always
    assert m.accept_rate_per_depth[0] > 0.0 and min(m.accept_rate_per_depth) < 1.0
    assert 1.0 < m.mean_accept_length < 1 + SPECS[spec_name].num_steps
    assert m.num_trunk_forwards < eng.generate_with_metrics(PROMPTS, params).metrics.num_trunk_forwards


@pytest.mark.parametrize("spec_name", ["chain3", "tree"])
@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, max_new_tokens=16, n=2),
                                    SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=16, n=2)])
def test_sampled_speculative_logprobs_match_full_forward(draftable_model, spec_name, params):
    model = draftable_model(num_mtp_layers=2)
    eng = Engine(model, max_num_seqs=5, max_seq_len=64)
    out = eng.generate_with_metrics(PROMPTS, params, speculative=SPECS[spec_name], generator=torch.Generator().manual_seed(0))
    again = eng.generate(PROMPTS, params, speculative=SPECS[spec_name], generator=torch.Generator().manual_seed(0))
    assert [c.token_ids for c in again] == [c.token_ids for c in out.completions]  # same seed, same output
    assert 0.0 < out.metrics.accept_rate_per_depth[0] < 1.0
    for c in out.completions:
        prompt = PROMPTS[c.prompt_index]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + c.token_ids]), compute_mtp=False).logits[0, len(prompt) - 1:-1]
        tok = torch.tensor(c.token_ids)[:, None]
        torch.testing.assert_close(torch.tensor(c.logprobs), processed_logprobs(logits, params).gather(1, tok)[:, 0],
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(c.trunk_logprobs),
                                   temperature_logprobs(logits, params.temperature).gather(1, tok)[:, 0], atol=1e-5, rtol=0)


def test_adaptive_greedy_is_token_identical_and_uses_several_depths(draftable_model):
    model = draftable_model(num_mtp_layers=1)
    eng = Engine(model, max_num_seqs=6, max_seq_len=96)
    params = SamplingParams(temperature=0.0, max_new_tokens=60)
    plain = eng.generate(PROMPTS, params)
    out = eng.generate_with_metrics(PROMPTS, params, speculative=SpeculativeConfig(num_steps=3, adaptive=True))
    assert [c.token_ids for c in out.completions] == [c.token_ids for c in plain]
    assert 0.0 < out.metrics.mean_draft_depth <= 3.0


def _run_spec_steps(model, prompts, tree, params, steps, seed, check):
    """Drive the speculative building blocks by hand (as Engine._spec_step does) and call
    check(tokens, lengths, spec_rows, draft) before each verification."""
    b, vocab, num_mtp, h = len(prompts), model.config.vocab_size, model.config.num_mtp_layers, model.config.hidden_size
    slots = 64
    trunk, mtp = model.new_kv_cache(b, slots), model.new_mtp_kv_cache(b, slots)
    gen = torch.Generator().manual_seed(seed)
    plen = torch.tensor([len(p) for p in prompts])
    width = int(plen.max())
    tokens = torch.zeros(b, slots, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p)
    pos = torch.arange(width)[None].expand(b, width)
    counters = StepCounters()
    with torch.inference_mode():
        logits, hidden = model.forward_step(tokens[:, :width], pos, pos, trunk)
        tokens[torch.arange(b), plen] = logits[torch.arange(b), plen - 1].argmax(-1)
        rows = SpecRows.empty(b, vocab, num_mtp, h, 1, torch.float32, torch.device("cpu"))
        commit_mtp(model, mtp, torch.ones(b, dtype=torch.long), hidden, tokens[:, 1:width + 1], plen, rows, b, counters)
        lengths = plen + 1
        tt = tree.tensors(torch.device("cpu"))
        for _ in range(steps):
            root = tokens[torch.arange(b), lengths - 1]
            draft = draft_tree(model, tree, tt, mtp, lengths, root, rows, b, params, gen, counters)
            check(tokens, lengths, rows, draft)
            out, path, hid = verify_and_accept(model, tree, tt, trunk, lengths, draft, params, gen, counters)
            commit_mtp(model, mtp, lengths, hid[torch.arange(b)[:, None], path], out.tokens, out.num_new, rows, b, counters)
            for i in range(b):
                n = int(out.num_new[i])
                tokens[i, lengths[i]:lengths[i] + n] = out.tokens[i, :n]
            lengths = lengths + out.num_new


@pytest.mark.parametrize("topk,num_draft_tokens", [(1, 4), (2, 7)])
def test_mtp_caches_match_full_forward_after_steps(draftable_model, topk, num_draft_tokens):
    """After every step: q_root == mtp_logits[0] at L-2, stored hidden states == h^k at L-1-k of a fresh full
    forward over the committed sequence; and each depth-1 node's draft logits (layer 2 under the tree mask)
    == the full forward's depth-2 MTP logits with that node appended."""
    model = draftable_model(num_mtp_layers=2, vocab=32, noise=1.0)
    tree = build_tree(3, topk, num_draft_tokens)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10, 11]]
    seen = {"steps": 0}

    def check(tokens, lengths, rows, draft):
        for i in range(len(prompts)):
            L = int(lengths[i])
            seq = tokens[i, :L][None]
            out = model(seq)
            torch.testing.assert_close(rows.q_root_logits[i], out.mtp_logits[0][0, L - 2], atol=1e-4, rtol=1e-4)
            for k in (1, 2):
                if L - 1 - k >= 0:
                    torch.testing.assert_close(rows.stored_h[i, k - 1], out.mtp_hidden_states[k - 1][0, L - 1 - k],
                                               atol=1e-4, rtol=1e-4)
            for n in range(tree.level_ranges[1][0], tree.level_ranges[1][1]):
                ext = torch.cat([seq, draft.node_tokens[i, n].view(1, 1)], dim=1)
                torch.testing.assert_close(draft.logits[i, n], model(ext).mtp_logits[1][0, L - 2], atol=1e-4, rtol=1e-4)
        seen["steps"] += 1

    _run_spec_steps(model, prompts, tree, SamplingParams(temperature=1.0), steps=6, seed=0, check=check)
    assert seen["steps"] == 6


@pytest.mark.parametrize("num_mtp", [1, 2])
def test_recursive_drafts_match_the_training_forward(draftable_model, num_mtp):
    """Depths D+1..K drafted by reusing the last MTP layer equal the full-sequence forward with
    mtp_recursive_steps=K (what mtp.recursive_steps trains): the draft logits at chain node n (depth n+1)
    == model(committed + drafted tokens 1..n).mtp_logits[n] at the anchor L-2, at every step."""
    model = draftable_model(num_mtp_layers=num_mtp, vocab=32, noise=1.0)
    k = 4
    chain = build_tree(k, 1, k + 1)
    seen = {"checks": 0}

    def check(tokens, lengths, rows, draft):
        for i in range(len(PROMPTS[:3])):
            L = int(lengths[i])
            for n in range(num_mtp, k):  # nodes whose children are drafted by the recursion
                ext = torch.cat([tokens[i, :L], draft.node_tokens[i, 1:n + 1]])[None]
                out = model(ext, mtp_recursive_steps=k)
                assert len(out.mtp_logits) == k
                torch.testing.assert_close(draft.logits[i, n], out.mtp_logits[n][0, L - 2], atol=1e-4, rtol=1e-4)
                seen["checks"] += 1

    _run_spec_steps(model, PROMPTS[:3], chain, SamplingParams(temperature=1.0), steps=5, seed=0, check=check)
    assert seen["checks"] == 5 * 3 * (k - num_mtp)


def test_tree_rank0_path_drafts_like_the_chain(draftable_model):
    """Greedy: the rank-0 path of a tree is the chain's draft, so their draft logits agree at every depth,
    including depths > D drafted by the recursive last layer under the tree mask."""
    model = draftable_model(num_mtp_layers=1, vocab=32, noise=1.0)
    chain, tree = build_tree(3, 1, 4), build_tree(3, 2, 8)
    rank0 = [0]
    for _ in range(3):
        rank0.append(tree.children[rank0[-1]][0])
    logs = {"chain": [], "tree": []}
    greedy = SamplingParams(temperature=0.0)
    _run_spec_steps(model, [[1, 2, 3], [4, 5]], chain, greedy, 4, 0, lambda t, l, r, d: logs["chain"].append(d.logits[:, :3]))
    _run_spec_steps(model, [[1, 2, 3], [4, 5]], tree, greedy, 4, 0, lambda t, l, r, d: logs["tree"].append(d.logits[:, rank0[:3]]))
    # both runs commit the same greedy tokens, so the states match step by step
    for a, b in zip(logs["chain"], logs["tree"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spec", [SpeculativeConfig(num_steps=3), SpeculativeConfig(num_steps=3, eagle_topk=2, num_draft_tokens=6),
                                  SpeculativeConfig(num_steps=3, adaptive=True)], ids=["chain", "tree", "adaptive"])
def test_prompts_shorter_than_the_mtp_depth(draftable_model, spec):
    """D = 3 MTP layers: the prefill commit of a 1-token prompt has only negative MTP input positions in layers 2
    and 3 (a 2-token prompt in layer 3), so every slot of that forward is the scratch slot (it used to be slot
    max_slot + 1 <= 0 and kv_len 0: a ValueError). Alone and batched with a longer prompt: greedy == plain;
    sampled: the logprobs are the trunk's of a full forward (finite, no garbage from the scratch slot)."""
    model = draftable_model(num_mtp_layers=3, seed=3, noise=1.0)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=14)
    for prompts in ([[5]], [[6, 7]], [[5], [6, 7], [1, 2, 3, 4]]):
        eng = Engine(model, max_num_seqs=3, max_seq_len=40)  # (fresh: adaptive explores at depth 3 first)
        plain = eng.generate(prompts, greedy)
        out = eng.generate_with_metrics(prompts, greedy, speculative=spec)
        assert [c.token_ids for c in out.completions] == [c.token_ids for c in plain]
        assert out.metrics.mean_draft_depth > 0 and out.metrics.accept_rate_per_depth[0] > 0  # speculative steps ran
    sampled = SamplingParams(temperature=1.0, max_new_tokens=10, n=3)
    out = eng.generate([[5], [6, 7]], sampled, speculative=spec, generator=torch.Generator().manual_seed(0))
    for c in out:
        prompt = [[5], [6, 7]][c.prompt_index]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + c.token_ids]), compute_mtp=False).logits[0, len(prompt) - 1:-1]
        want = temperature_logprobs(logits, 1.0).gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.trunk_logprobs), want, atol=1e-5, rtol=0)


def test_metrics_of_two_calls_merge_like_one_call(draftable_model):
    # greedy drafts and acceptance of a row do not depend on its batch-mates: the per-row counts of two calls
    # (prompts split in two) add up to those of one call over all prompts, and so do the derived rates
    from mtprl.rollout.types import RolloutMetrics

    eng = Engine(draftable_model(num_mtp_layers=2, seed=2, noise=1.0), max_num_seqs=8, max_seq_len=64)
    params, spec = SamplingParams(temperature=0.0, max_new_tokens=12), SpeculativeConfig(num_steps=2)
    whole = eng.generate_with_metrics(PROMPTS, params, speculative=spec).metrics
    parts = [eng.generate_with_metrics(p, params, speculative=spec).metrics for p in (PROMPTS[:2], PROMPTS[2:])]
    merged = RolloutMetrics.merge(parts)
    assert whole.accept_rate_per_depth == [a / r for a, r in zip(whole.num_drafts_accepted, whole.num_drafts_reached)]
    assert merged.num_drafts_reached == whole.num_drafts_reached and merged.num_row_steps == whole.num_row_steps
    assert merged.num_sequences == 6 and merged.num_generated_tokens == whole.num_generated_tokens
    assert merged.mean_accept_length == pytest.approx(whole.mean_accept_length)
    assert merged.accept_rate_per_depth == pytest.approx(whole.accept_rate_per_depth)
    assert merged.num_decode_steps == parts[0].num_decode_steps + parts[1].num_decode_steps
    assert RolloutMetrics.merge([whole]).as_dict() == pytest.approx(whole.as_dict())


def test_draft_temperature_draws_drafts_at_that_temperature(draftable_model, monkeypatch):
    """speculative draft_temperature: drafts come from softmax(draft logits / tau) (what acceptance divides by),
    the sampling itself stays at the sampling temperature (exactness: test_spec_distribution.py); greedy ignores
    it. (Whether a colder draft is accepted more depends on the model: only where the draft is a flatter copy of
    the target - measured on the demo policy: docs/rollout.md.)"""
    import mtprl.rollout.engine as engine_mod

    model = draftable_model(num_mtp_layers=1, vocab=32, noise=0.3)
    seen = []
    original = engine_mod.draft_tree

    def spy(model_, tree, tt, mtp, lengths, root, spec_rows, b, params, *rest):
        draft = original(model_, tree, tt, mtp, lengths, root, spec_rows, b, params, *rest)
        seen.append((params, draft))
        return draft

    monkeypatch.setattr(engine_mod, "draft_tree", spy)
    params = SamplingParams(temperature=1.0, max_new_tokens=12, n=4)
    eng = Engine(model, max_num_seqs=8, max_seq_len=32)
    prompts = [[1, 2, 3], [4, 5]]
    for tau in (None, 0.25):
        seen.clear()
        res = eng.generate_with_metrics(prompts, params, speculative=SpeculativeConfig(num_steps=3, draft_temperature=tau),
                                        generator=torch.Generator().manual_seed(0))
        assert res.metrics.num_drafts_reached[0] > 0
        draft_params, draft = seen[0]
        assert draft_params.temperature == (1.0 if tau is None else tau)
        expect = processed_logprobs(draft.logits[:, :3], draft_params).exp()  # children of nodes 0..2
        torch.testing.assert_close(draft.probs[:, :3], expect)
    seen.clear()
    eng.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=4),
                 speculative=SpeculativeConfig(num_steps=3, draft_temperature=0.25))
    assert seen[0][0].greedy
    with pytest.raises(ValueError, match="draft_temperature"):
        SpeculativeConfig(num_steps=3, draft_temperature=0.0)


def test_draft_temperature_config_key_reaches_the_engine():
    from mtprl.config import ConfigError, load_config
    from mtprl.trainer.samples import speculative_config

    cfg = load_config("tiny_cpu", ["actor_rollout_ref.model.mtp.speculative_draft_temperature=0.7"])
    assert speculative_config(cfg).draft_temperature == 0.7
    off = load_config("tiny_cpu", ["actor_rollout_ref.model.mtp.speculative_draft_temperature=null"])
    assert speculative_config(off).draft_temperature is None
    with pytest.raises(ConfigError, match="speculative_draft_temperature=0"):
        load_config(None, ["actor_rollout_ref.model.mtp.speculative_draft_temperature=0"])


@pytest.mark.parametrize("num_mtp", [1, 2])
def test_prefill_commits_each_prompt_once_and_every_sample_row_matches_the_full_forward(draftable_model, monkeypatch,
                                                                                        num_mtp):
    """Admission of n samples per prompt: the MTP commit of the prompt's positions runs once per prompt (u rows,
    not n), each sample's first sampled token is committed on its own row, and before every draft each row's MTP
    state (q_root, stored hidden states) equals a fresh full forward over its sequence."""
    import mtprl.rollout.engine as engine_mod

    model = draftable_model(num_mtp_layers=num_mtp, vocab=32, noise=1.0)
    prompts = [[1, 2, 3, 4, 5, 6], [7], [8, 9, 10]]  # a 1-token prompt: nothing of it to commit before its sample
    n = 4
    commit_rows = []
    original_commit = engine_mod.commit_mtp
    monkeypatch.setattr(engine_mod, "commit_mtp", lambda model_, mtp, l_old, hidden, new_tokens, *a, **k:
                        commit_rows.append(tuple(new_tokens.shape)) or original_commit(model_, mtp, l_old, hidden,
                                                                                      new_tokens, *a, **k))
    checks = watch_mtp_state(monkeypatch, model, num_mtp)
    eng = Engine(model, max_num_seqs=12, max_seq_len=64)
    params = SamplingParams(n=n, temperature=1.0, max_new_tokens=6)
    out = eng.generate(prompts, params, SpeculativeConfig(num_steps=2), torch.Generator().manual_seed(0))
    assert len(out) == 3 * n and checks["rows"] >= 3 * n
    # admission: the prompts' positions once per prompt (3 rows, 5 = the longest prompt's positions before its
    # last), then one position on each of the 12 sample rows
    assert commit_rows[:2] == [(3, 5), (3 * n, 1)]
