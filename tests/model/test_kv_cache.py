"""Incremental forward with a static KV cache == full forward (trunk and MTP layers)."""

import pytest
import torch

from mtprl.model import CausalLM, ModelConfig

TOL = dict(atol=1e-5, rtol=1e-5)

CONFIGS = {
    "mimo": ModelConfig.tiny(),
    "qwen3_tied": ModelConfig.tiny(model_type="qwen3", attention_bias=False, qk_norm=True, tie_word_embeddings=True,
                                   head_dim=16, num_mtp_layers=1),
    "llama3_mha": ModelConfig.tiny(model_type="llama", attention_bias=False, num_key_value_heads=4,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
}


def _model(name: str, seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(CONFIGS[name]).eval()


def _ids(b: int, t: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def _run_chunks(model, ids, chunks, cache, cache_rows=None):
    """forward_step over ids [B,T] in chunks of the given sizes; returns concatenated logits, hidden."""
    logits, hidden, start = [], [], 0
    for size in chunks:
        pos = torch.arange(start, start + size, device=ids.device)[None].expand(ids.shape[0], -1)
        lg, hd = model.forward_step(ids[:, start:start + size], pos, pos, cache, cache_rows=cache_rows)
        logits.append(lg)
        hidden.append(hd)
        start += size
    assert start == ids.shape[1]
    return torch.cat(logits, 1), torch.cat(hidden, 1)


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_prefill_then_tokens_and_chunked_equal_full_forward(name):
    model = _model(name)
    ids = _ids(2, 13, model.config.vocab_size)
    full = model(ids)
    for chunks in ([6] + [1] * 7, [3, 5, 1, 4], [13]):
        cache = model.new_kv_cache(2, 16)
        logits, hidden = _run_chunks(model, ids, chunks, cache)
        torch.testing.assert_close(logits, full.logits, **TOL)
        torch.testing.assert_close(hidden, full.hidden_states, **TOL)


@torch.no_grad()
def test_cache_rows_and_ragged_positions():
    """Two sequences of different lengths in permuted cache rows of a larger cache, decoded together."""
    model = _model("mimo")
    a, b = _ids(1, 9, 128, seed=2)[0], _ids(1, 5, 128, seed=3)[0]
    cache = model.new_kv_cache(4, 12)
    rows = torch.tensor([3, 1])
    # prefill each row separately (different lengths), then decode one token per row with ragged positions
    model.forward_step(a[None, :6], torch.arange(6)[None], torch.arange(6)[None], cache, cache_rows=rows[:1])
    model.forward_step(b[None, :2], torch.arange(2)[None], torch.arange(2)[None], cache, cache_rows=rows[1:])
    got_a, got_b = [], []
    for step in range(3):
        pos = torch.tensor([[6 + step], [2 + step]])
        lg, _ = model.forward_step(torch.stack([a[6 + step], b[2 + step]])[:, None], pos, pos, cache, cache_rows=rows)
        got_a.append(lg[0, 0])
        got_b.append(lg[1, 0])
    torch.testing.assert_close(torch.stack(got_a), model(a[None]).logits[0, 6:9], **TOL)
    torch.testing.assert_close(torch.stack(got_b), model(b[None]).logits[0, 2:5], **TOL)


@torch.no_grad()
def test_tree_mask_siblings_share_a_position():
    """Tree verification: two candidate tokens at the same position in different slots, each seeing only the prefix."""
    model = _model("mimo")
    prefix, cand = _ids(1, 5, 128, seed=4), torch.tensor([[7, 11]])
    cache = model.new_kv_cache(1, 10)
    pos = torch.arange(5)[None]
    model.forward_step(prefix, pos, pos, cache)
    mask = torch.zeros(1, 2, 10, dtype=torch.bool)
    mask[:, :, :5] = True  # both see the prefix; each sees itself (always admitted), not its sibling
    logits, _ = model.forward_step(cand, torch.tensor([[5, 5]]), torch.tensor([[5, 6]]), cache, attn_mask=mask)
    for j in range(2):
        ref = model(torch.cat([prefix, cand[:, j:j + 1]], 1)).logits[0, -1]
        torch.testing.assert_close(logits[0, j], ref, **TOL)
    # kv_len: reading only the first 7 slots gives the same result
    logits_short, _ = model.forward_step(cand, torch.tensor([[5, 5]]), torch.tensor([[5, 6]]), cache,
                                         attn_mask=mask[:, :, :7], kv_len=7)
    torch.testing.assert_close(logits_short, logits, **TOL)


@pytest.mark.parametrize("name", ["mimo", "qwen3_tied", "llama3_mha"])
@torch.no_grad()
def test_mtp_step_in_chunks_equals_full_forward_mtp_logits(name):
    model = _model(name)
    b, t = 2, 11
    ids = _ids(b, t, model.config.vocab_size, seed=5)
    full = model(ids)
    cache = model.new_mtp_kv_cache(b, 16)
    prev = full.hidden_states
    for depth in range(model.config.num_mtp_layers):
        k = depth + 1
        n = t - k  # positions whose input token t_{i+k} exists
        got_logits, got_hidden, start = [], [], 0
        for size in [4, 1, 2, n - 7]:
            sl = slice(start, start + size)
            pos = torch.arange(start, start + size)[None].expand(b, -1)
            lg, hd = model.mtp_step(depth, prev[:, sl], ids[:, start + k:start + k + size], pos, pos, cache)
            got_logits.append(lg)
            got_hidden.append(hd)
            start += size
        torch.testing.assert_close(torch.cat(got_logits, 1), full.mtp_logits[depth][:, :n], **TOL)
        torch.testing.assert_close(torch.cat(got_hidden, 1), full.mtp_hidden_states[depth][:, :n], **TOL)
        prev = full.mtp_hidden_states[depth]


@torch.no_grad()
def test_padding_left_and_right_match_unpadded_rows():
    model = _model("mimo")
    a, b = _ids(1, 7, 128, seed=6), _ids(1, 4, 128, seed=7)
    ref_a, ref_b = model(a), model(b)
    for left in (True, False):
        pad = torch.zeros(1, 3, dtype=torch.long)
        b_pad = torch.cat([pad, b], 1) if left else torch.cat([b, pad], 1)
        mask = torch.ones(2, 7, dtype=torch.long)
        if left:
            mask[1, :3] = 0
        else:
            mask[1, 4:] = 0
        out = model(torch.cat([a, b_pad]), attention_mask=mask)
        real = mask[1].bool()
        torch.testing.assert_close(out.logits[0], ref_a.logits[0], **TOL)
        torch.testing.assert_close(out.logits[1, real], ref_b.logits[0], **TOL)
        assert torch.isfinite(out.logits).all()
        # MTP depth 1 at real positions whose next token is real
        n = 3  # b has 4 tokens -> depth-1 inputs exist for its first 3 positions
        idx = real.nonzero().squeeze(-1)[:n]
        torch.testing.assert_close(out.mtp_logits[0][1, idx], ref_b.mtp_logits[0][0, :n], **TOL)


def test_bad_inputs_raise():
    model = _model("mimo")
    cache = model.new_kv_cache(1, 4)
    ids = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="cache_slots must lie"):
        model.forward_step(ids, torch.tensor([[3, 4]]), torch.tensor([[3, 4]]), cache)
    one_mtp = _model("qwen3_tied")  # 2 trunk layers, 1 MTP layer
    with pytest.raises(ValueError, match="layers"):
        one_mtp.forward_step(ids, torch.zeros_like(ids), torch.zeros_like(ids), one_mtp.new_mtp_kv_cache(1, 4))
    with pytest.raises(ValueError, match="depth"):
        model.mtp_step(2, torch.zeros(1, 2, 32), ids, ids, ids, model.new_mtp_kv_cache(1, 4))
    with pytest.raises(ValueError, match="rope_type"):
        ModelConfig.tiny(rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="multiple"):
        ModelConfig.tiny(num_key_value_heads=3)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@torch.no_grad()
def test_bf16_same_code_path(device):
    """bf16 parameters and cache run the same code; results track the fp32 model."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    fp32 = _model("mimo").to(device)
    bf16 = _model("mimo").to(device=device, dtype=torch.bfloat16)
    ids = _ids(2, 10, 128, seed=8).to(device)
    full = bf16(ids)
    assert full.logits.dtype == torch.bfloat16 and bf16.inv_freq.dtype == torch.bfloat16
    cache = bf16.new_kv_cache(2, 12)
    assert cache.k.dtype == torch.bfloat16
    logits, _ = _run_chunks(bf16, ids, [4, 1, 5], cache)
    scale = fp32(ids).logits.abs().max()
    assert (logits.float() - full.logits.float()).abs().max() <= 0.02 * scale
    assert (full.logits.float() - fp32(ids).logits).abs().max() <= 0.05 * scale
    assert (full.mtp_logits[1].float() - fp32(ids).mtp_logits[1]).abs().max() <= 0.05 * scale
