"""The packed fast path (mtprl/model/packed.py) == the module path (CausalLM.forward_step / mtp_step): logits,
hidden states AND the K/V it writes, so the two paths can share a cache."""

import pytest
import torch

from mtprl.model import CausalLM, ModelConfig
from mtprl.model.packed import PackedModel

TOL = dict(atol=1e-5, rtol=1e-5)

CONFIGS = {
    "mimo_gqa_bias": ModelConfig.tiny(),
    "qwen3_qknorm_tied": ModelConfig.tiny(model_type="qwen3", attention_bias=False, qk_norm=True,
                                          tie_word_embeddings=True, head_dim=16, num_mtp_layers=1),
    "llama3_mha_outbias": ModelConfig.tiny(model_type="llama", attention_bias=True, attention_out_bias=True,
                                           num_key_value_heads=4, num_mtp_layers=1,
                                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 8}),
}


def _model(name: str) -> CausalLM:
    torch.manual_seed(0)
    model = CausalLM(CONFIGS[name]).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that every packed weight matters
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.copy_(torch.randn(p.shape) * 0.1 + (1.0 if "norm" in pname else 0.0))
    return model


def _both(model, fn, signed=None):
    """Run fn(stepper, cache, mtp_cache) on the module path and the packed path, each with its own caches."""
    outs = []
    for stepper in (model, PackedModel(model, signed=signed)):
        cache, mtp_cache = model.new_kv_cache(3, 24), model.new_mtp_kv_cache(3, 24)
        outs.append((fn(stepper, cache, mtp_cache), cache, mtp_cache))
    return outs


def _assert_same(ref, got):
    (ref_out, ref_cache, ref_mtp), (out, cache, mtp) = ref, got
    for a, b in zip(ref_out, out):
        torch.testing.assert_close(b, a, **TOL)
    for a, b in ((ref_cache.k, cache.k), (ref_cache.v, cache.v), (ref_mtp.k, mtp.k), (ref_mtp.v, mtp.v)):
        torch.testing.assert_close(b, a, **TOL)


@pytest.mark.parametrize("signed", [True, False])  # residual stream as signed pairs (narrow models) or plain
@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_prefill_decode_tree_and_mtp_match_module_path(name, signed):
    model = _model(name)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(vocab, (3, 7), generator=g)
    step_ids = torch.randint(vocab, (3, 1), generator=g)
    tree_ids = torch.randint(vocab, (3, 3), generator=g)

    def run(m, cache, mtp_cache):
        pos = torch.arange(7)[None].expand(3, 7)
        out = list(m.forward_step(prompt, pos, pos, cache, kv_len=7))  # prefill, T > 1
        ragged = torch.tensor([[7], [5], [6]])  # rows at different positions, stale slots hidden by the mask
        out += m.forward_step(step_ids, ragged, ragged, cache, kv_len=8)
        # tree: two siblings at position 8 (slots 8, 9) and a child of the first at 9 (slot 10)
        tpos, tslots = torch.tensor([[8, 8, 9]]).expand(3, 3), torch.tensor([[8, 9, 10]]).expand(3, 3)
        mask = torch.zeros(3, 3, 11, dtype=torch.bool)
        mask[:, :, :8] = True
        mask[:, 2, 8] = True
        out += m.forward_step(tree_ids, tpos, tslots, cache, attn_mask=mask, kv_len=11)
        for depth in range(model.config.num_mtp_layers):
            logits, hidden = m.mtp_step(depth, out[1], prompt, pos, pos, mtp_cache, kv_len=7)
            out += [logits, hidden]
            out += m.mtp_step(depth, out[3], step_ids, ragged, ragged, mtp_cache, kv_len=8)
        return out

    ref, got = _both(model, run, signed)
    assert PackedModel(model, signed=signed).signed == signed and PackedModel(model).signed  # 32 wide: signed
    _assert_same(ref, got)


@pytest.mark.parametrize("signed", [True, False])
@torch.no_grad()
def test_batch_1_steps_match_module_path(signed, monkeypatch):
    """One row: prefill, a one-token step, an MTP step and a three-token verification as the module path; the
    verification's matmuls go through cpu_attention.small_mm when the kernel is built and torch runs one thread
    (the tiny model's weights are below its size threshold, lowered here)."""
    from mtprl.model import cpu_attention

    monkeypatch.setattr(cpu_attention, "SMALL_MM_MIN_WEIGHT", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # (small_mm runs at one thread only)
    model = _model("mimo_gqa_bias")
    ids = torch.randint(128, (1, 6), generator=torch.Generator().manual_seed(5))

    def run(m, cache, mtp_cache):
        pos = torch.arange(5)[None]
        out = list(m.forward_step(ids[:, :5], pos, pos, cache, kv_len=5))
        p = torch.full((1, 1), 5)
        out += m.forward_step(ids[:, 5:6], p, p, cache, kv_len=6)  # one row
        out += m.mtp_step(0, out[-1], ids[:, 5:6], p, p, mtp_cache, kv_len=6)
        p = torch.tensor([[6, 7, 8]])
        out += m.forward_step(ids[:, 3:6], p, p, cache, kv_len=9)  # three rows (a verification)
        return out

    outs = []
    for stepper in (model, PackedModel(model, signed=signed)):
        cache, mtp_cache = model.new_kv_cache(1, 12), model.new_mtp_kv_cache(1, 12)
        outs.append((run(stepper, cache, mtp_cache), cache, mtp_cache))
    _assert_same(*outs)


@torch.no_grad()
def test_shared_cache_and_logit_index():
    """Prefill with the module path, decode with the packed one (and the reverse): a shared cache works, and
    logit_index computes the logits at chosen positions only."""
    model = _model("mimo_gqa_bias")
    packed = PackedModel(model)
    ids = torch.randint(128, (2, 9), generator=torch.Generator().manual_seed(2))
    full = model(ids, compute_mtp=False).logits
    for first, second in ((model, packed), (packed, model)):
        cache = model.new_kv_cache(2, 12)
        pos = torch.arange(8)[None].expand(2, 8)
        first.forward_step(ids[:, :8], pos, pos, cache)
        logits, _ = second.forward_step(ids[:, 8:], torch.full((2, 1), 8), torch.full((2, 1), 8), cache)
        torch.testing.assert_close(logits[:, 0], full[:, 8], **TOL)
    cache = model.new_kv_cache(2, 12)
    pos = torch.arange(9)[None].expand(2, 9)
    index = torch.tensor([[8, 3], [0, 5]])
    logits, _ = packed.forward_step(ids, pos, pos, cache, logit_index=index)
    torch.testing.assert_close(logits, full[torch.arange(2)[:, None], index], **TOL)
    # mtp_step takes it too (the speculative commit reads each row's last position only), on both paths
    hidden = torch.randn(2, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    for stepper in (model, packed):
        every, h_every = stepper.mtp_step(0, hidden, ids, pos, pos, model.new_mtp_kv_cache(2, 12))
        some, h_some = stepper.mtp_step(0, hidden, ids, pos, pos, model.new_mtp_kv_cache(2, 12), logit_index=index)
        assert some.shape == (2, 2, model.config.vocab_size)
        torch.testing.assert_close(some, every[torch.arange(2)[:, None], index], **TOL)
        torch.testing.assert_close(h_some, h_every, **TOL)


@torch.no_grad()
def test_pack_sees_in_place_weight_updates():
    model = _model("mimo_gqa_bias")
    packed = PackedModel(model)
    ids = torch.randint(128, (1, 5), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(5)[None]
    before, _ = packed.forward_step(ids, pos, pos, model.new_kv_cache(1, 8))
    model.layers[0].mlp.up_proj.weight.add_(0.5)
    model.layers[1].self_attn.k_proj.bias.add_(0.5)
    stale, _ = packed.forward_step(ids, pos, pos, model.new_kv_cache(1, 8))
    torch.testing.assert_close(stale, before)  # copies: not seen until pack()
    packed.pack()
    after, _ = packed.forward_step(ids, pos, pos, model.new_kv_cache(1, 8))
    torch.testing.assert_close(after, model(ids, compute_mtp=False).logits, **TOL)
    assert not torch.allclose(after, before)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("signed", [True, False])
def test_repack_writes_into_the_previous_pack(name, signed):
    """A re-pack after an update copies into the old packed tensors (never a second packed copy at the peak): every
    packed tensor keeps its storage, takes the new values, and aliases of parameters stay aliases."""
    from mtprl.distributed.weight_sync import stepper_weights

    model = _model(name)
    packed = PackedModel(model, signed=signed)
    before = {k: (t.data_ptr(), t.clone()) for k, t in stepper_weights(packed).items()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5).add_(0.25)
    packed.pack()
    fresh = stepper_weights(PackedModel(model, signed=signed))
    after = stepper_weights(packed)
    assert after.keys() == fresh.keys() == before.keys()
    for k, t in after.items():
        assert t.data_ptr() == before[k][0], k  # same storage
        torch.testing.assert_close(t, fresh[k], rtol=0, atol=0, msg=k)
        assert not torch.equal(t, before[k][1]), k  # and the update reached it


@pytest.mark.parametrize("name", list(CONFIGS))
def test_an_fp32_model_packed_in_bf16_is_the_bf16_models_pack(name):
    """PackedModel(dtype=bf16) of fp32 weights (the engine of an fp32 policy on one GPU, #26 B2): every packed
    tensor is bf16 and equal to the pack of a bf16 copy of the model (cast then packed = packed then cast), the
    tied head is the embedding, and a re-pack after an update casts into the same storages."""
    from mtprl.distributed.weight_sync import stepper_weights

    model = _model(name)
    packed = PackedModel(model, dtype=torch.bfloat16)
    reference = stepper_weights(PackedModel(_model(name).to(torch.bfloat16)))
    got = stepper_weights(packed)
    assert got.keys() == reference.keys()
    for k, t in got.items():
        assert t.dtype == torch.bfloat16, k
        torch.testing.assert_close(t, reference[k], rtol=0, atol=0, msg=k)
    assert (packed.head is packed.embed) == model.config.tie_word_embeddings
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the policy is untouched
    storages = {k: t.data_ptr() for k, t in got.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    packed.pack()
    bf16 = _model(name).to(torch.bfloat16)
    with torch.no_grad():
        for p, q in zip(bf16.parameters(), model.parameters()):
            p.copy_(q)
    reference = stepper_weights(PackedModel(bf16))
    for k, t in stepper_weights(packed).items():
        assert t.data_ptr() == storages[k], k
        torch.testing.assert_close(t, reference[k], rtol=0, atol=0, msg=k)


def test_bad_inputs_raise():
    model = _model("mimo_gqa_bias")
    packed = PackedModel(model)
    cache = model.new_kv_cache(2, 8)
    ids, pos = torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="cache_rows"):
        packed.forward_step(ids, pos, pos, cache, cache_rows=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="cache_slots must lie"):
        packed.forward_step(ids, pos, pos + 8, cache)
    with pytest.raises(ValueError, match="depth=2"):
        packed.mtp_step(2, torch.zeros(2, 1, 32), ids, pos, pos, model.new_mtp_kv_cache(2, 8))
    one_mtp = _model("qwen3_qknorm_tied")  # 2 trunk layers, 1 MTP layer: the MTP cache is not a trunk cache
    with pytest.raises(ValueError, match="has 1 layers, the model needs 2"):
        PackedModel(one_mtp).forward_step(ids, pos, pos, one_mtp.new_mtp_kv_cache(2, 8))


@torch.no_grad()
def test_bf16_close_to_module_path():
    model = _model("qwen3_qknorm_tied").to(torch.bfloat16)
    ids = torch.randint(128, (2, 6), generator=torch.Generator().manual_seed(4))
    pos = torch.arange(6)[None].expand(2, 6)
    ref, _ = model.forward_step(ids, pos, pos, model.new_kv_cache(2, 8))
    for signed in (True, False):
        got, _ = PackedModel(model, signed=signed).forward_step(ids, pos, pos, model.new_kv_cache(2, 8))
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), ref.float(), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_mtp_chain_equals_mtp_step_per_level(name):
    """mtp_chain (per-level inputs built once) == one mtp_step per level, each level fed the last one's hidden
    state, rows at different positions; on both paths, against the module path's mtp_step."""
    model = _model(name)
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    g = torch.Generator().manual_seed(2)
    context = torch.randint(vocab, (3, 6), generator=g)
    h0 = torch.randn(3, 1, hidden, generator=g)
    tokens = torch.randint(vocab, (3, 4), generator=g)
    start = torch.tensor([[6], [4], [5]])  # each row's first chain position (slot = position)
    positions = start + torch.arange(4)

    def per_level(stepper, cache, mtp_cache):
        stepper.mtp_step(0, torch.randn(3, 6, hidden, generator=torch.Generator().manual_seed(3)), context,
                         torch.arange(6).expand(3, 6), torch.arange(6).expand(3, 6), mtp_cache)
        outs, h = [], h0
        for i in range(4):
            logits, h = model.mtp_step(0, h, tokens[:, i:i + 1], positions[:, i:i + 1], positions[:, i:i + 1],
                                       mtp_cache, kv_len=10)
            outs += [logits, h]
        return outs

    def chained(stepper, cache, mtp_cache):
        stepper.mtp_step(0, torch.randn(3, 6, hidden, generator=torch.Generator().manual_seed(3)), context,
                         torch.arange(6).expand(3, 6), torch.arange(6).expand(3, 6), mtp_cache)
        step = stepper.mtp_chain(0, positions, positions, mtp_cache, kv_len=10)
        outs, h = [], h0
        for i in range(4):
            logits, h = step(i, h, tokens[:, i:i + 1])
            outs += [logits, h]
        return outs

    ref = _both(model, per_level)[0]
    for got in _both(model, chained):
        _assert_same(ref, got)
