"""What the packed path (mtprl/model/packed.py) hands to attention, and that a step reads nothing back to the host
(#26 B7, B6): a prefill calls SDPA with is_causal=True and no mask (on CUDA the flash kernel, which takes none);
every other step's mask is allocated with the slot count rounded up to a multiple of 8, so that SDPA's CUDA kernel
does not pad it again in every layer; the RoPE rows come from a table sized from the cache, not from the largest
position (a host-device sync a step). Checked on the CPU and on a fake CUDA device (FakeTensorMode: shapes,
devices and strides, no kernels, and any read of a value raises), each step also against the module path."""

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from mtprl.model import CausalLM, ModelConfig, cpu_attention
from mtprl.model.kv_cache import KVCache
from mtprl.model.packed import PackedModel
from tests.trainer.test_fake_cuda import _to_device, fake_cuda  # noqa: F401 (a fixture)

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _model(**overrides) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig.tiny(**overrides)).eval()


@pytest.fixture
def attention_calls(monkeypatch):
    """Every attention call of the packed path: (kind, q shape, mask or None, is_causal, enable_gqa)."""
    calls = []
    sdpa, kernel = F.scaled_dot_product_attention, cpu_attention.decode_attention

    def record_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        calls.append(("sdpa", tuple(q.shape), attn_mask, is_causal, enable_gqa))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    enable_gqa=enable_gqa)

    def record_kernel(q, keys, values, mask, scale):
        calls.append(("kernel", tuple(q.shape), mask, False, False))
        return kernel(q, keys, values, mask, scale)

    monkeypatch.setattr(F, "scaled_dot_product_attention", record_sdpa)
    monkeypatch.setattr(cpu_attention, "decode_attention", record_kernel)
    return calls


def _unpadded(mask: torch.Tensor) -> bool:
    """Whether SDPA's memory-efficient CUDA kernel takes `mask` as it is: torch's aligned_tensor<8> test
    (aten/src/ATen/native/transformers/attention.cpp, preprocess_mask) - every stride but the last a multiple of 8,
    the last 1; any other mask it pads (pad_bias), a copy on each call."""
    return all(s % 8 == 0 for s in mask.stride()[:-1]) and mask.stride(-1) == 1


def _check_masked(calls, kv_len: int) -> None:
    """Each call took a mask over kv_len slots, in rows allocated kv_len rounded up to a multiple of 8 wide."""
    assert calls
    for kind, _, mask, is_causal, _ in calls:
        assert mask is not None and not is_causal and mask.shape[-1] == kv_len, kind
        assert _unpadded(mask), (kind, mask.shape, mask.stride())
        if mask.stride(-2) != 0:  # (0: the query heads of a one-token step folded onto one mask row)
            assert mask.stride(-2) == -(-kv_len // 8) * 8


def _both(model, run, rows=6, slots=24):
    """run(stepper, cache, mtp_cache) on the module path, then on the packed path (last: what attention_calls
    holds at the end is the packed path's), with their own caches; the outputs and caches equal."""
    outs = []
    for stepper in (model, PackedModel(model)):
        cache, mtp_cache = model.new_kv_cache(rows, slots), model.new_mtp_kv_cache(rows, slots)
        outs.append((run(stepper, cache, mtp_cache), cache, mtp_cache))
    (ref, ref_cache, ref_mtp), (got, cache, mtp) = outs
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, **TOL)
    for a, b in ((ref_cache.k, cache.k), (ref_cache.v, cache.v), (ref_mtp.k, mtp.k), (ref_mtp.v, mtp.v)):
        torch.testing.assert_close(b, a, **TOL)


@pytest.mark.parametrize("rows", [1, 5])
@torch.no_grad()
def test_prefill_is_causal_sdpa_without_a_mask(rows, attention_calls):
    """A prompt from slot 0 (slots 0..T-1 in every row, kv_len = T; on the CPU recognised from the slots): one SDPA
    call per layer with is_causal=True and attn_mask None, GQA through enable_gqa (a causal mask cannot be folded);
    logits, hidden states and the K/V written equal the module path's (which attends under the boolean mask)."""
    model = _model()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(128, (rows, 11), generator=g)
    hidden = torch.randn(rows, 11, 32, generator=g)
    pos = torch.arange(11)[None].expand(rows, 11)

    def run(m, cache, mtp_cache):
        attention_calls.clear()
        out = list(m.forward_step(prompt, pos, pos, cache, kv_len=11))
        out += m.forward_step(prompt[:, :5], pos[:, :5], pos[:, :5], model.new_kv_cache(rows, 5))  # kv_len = max
        out += m.mtp_step(1, hidden, prompt, pos, pos, mtp_cache, kv_len=11)
        return out

    _both(model, run, rows)
    calls = attention_calls
    assert len(calls) == 2 * model.config.num_hidden_layers + 1
    for kind, q_shape, mask, is_causal, enable_gqa in calls:
        assert kind == "sdpa" and mask is None and is_causal and enable_gqa and q_shape[1] == 4


@torch.no_grad()
def test_prefill_keyword_is_checked():
    """prefill=True is the caller's word (on CUDA it is not checked: that would be a host-device sync); on the CPU
    a step that is not a prefill raises, on both paths, and a prefill that does not say so is still found."""
    model = _model()
    ids = torch.zeros(2, 4, dtype=torch.long)
    pos = torch.arange(4)[None].expand(2, 4)
    for stepper in (model, PackedModel(model)):
        with pytest.raises(ValueError, match="kv_len = T"):
            stepper.forward_step(ids, pos, pos, model.new_kv_cache(2, 8), kv_len=5, prefill=True)
        with pytest.raises(ValueError, match="cache_slots 0..T-1"):
            stepper.forward_step(ids, pos.flip(1), pos.flip(1), model.new_kv_cache(2, 8), kv_len=4, prefill=True)
        with pytest.raises(ValueError, match="no attn_mask"):
            stepper.forward_step(ids, pos, pos, model.new_kv_cache(2, 8), attn_mask=torch.ones(2, 4, 4), kv_len=4,
                                 prefill=True)


@torch.no_grad()
def test_reordered_slots_are_not_a_prefill(attention_calls):
    """Slots that fill 0..T-1 in another order are not causal in token order: masked, and equal to the module path."""
    model = _model()
    ids = torch.randint(128, (2, 6), generator=torch.Generator().manual_seed(3))
    slots = torch.tensor([[0, 2, 1, 3, 5, 4], [0, 1, 2, 3, 4, 5]])
    _both(model, lambda m, cache, mtp: m.forward_step(ids, slots, slots, cache, kv_len=6), rows=2)
    assert attention_calls and all(mask is not None and not is_causal for _, _, mask, is_causal, _ in attention_calls)


@pytest.mark.parametrize("head_dim", [8, 16])  # 16: few query rows go through cpu_attention's kernel
@torch.no_grad()
def test_step_masks_are_allocated_rounded_up_to_8(head_dim, attention_calls):
    """Decode, tree and chained MTP steps over 13 slots: masks [.., 13] whose rows are allocated 16 wide (the
    3 extra slots masked out), for SDPA's own GQA (few rows), the folded one (16 rows or more) and the CPU kernel
    (head dim 16, up to 12 query rows per kv head); every output equal to the module path."""
    model = _model(head_dim=head_dim)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(128, (6, 10), generator=g)
    hidden = torch.randn(6, 10, 32, generator=g)
    step_ids, tree_ids = torch.randint(128, (6, 1), generator=g), torch.randint(128, (6, 3), generator=g)
    pos = torch.arange(10)[None].expand(6, 10)
    ragged = torch.tensor([[10], [8], [9], [10], [7], [12]])
    tree_pos, tree_slots = torch.tensor([[10, 10, 11]]).expand(6, 3), torch.tensor([[10, 11, 12]]).expand(6, 3)
    tree_mask = torch.zeros(6, 3, 13, dtype=torch.bool)
    tree_mask[:, :, :10] = True
    tree_mask[:, 2, 10] = True
    chain = torch.tensor([[9], [7], [8], [9], [6], [8]]) + torch.arange(4)

    def run(m, cache, mtp_cache):
        out = list(m.forward_step(prompt, pos, pos, cache, kv_len=10))
        m.mtp_step(0, hidden, prompt, pos, pos, mtp_cache, kv_len=10)
        attention_calls.clear()
        out += m.forward_step(step_ids, ragged, ragged, cache, kv_len=13)  # 6 one-token rows: SDPA's GQA
        out += m.forward_step(step_ids[:2], ragged[:2], ragged[:2], cache, kv_len=13)
        out += m.forward_step(tree_ids, tree_pos, tree_slots, cache, attn_mask=tree_mask, kv_len=13)  # 18: folded
        out += m.mtp_step(0, hidden[:, :1], step_ids, ragged, ragged, mtp_cache, kv_len=13)
        step = m.mtp_chain(0, chain, chain, mtp_cache, kv_len=13)
        h = hidden[:, :1]
        for i in range(4):
            logits, h = step(i, h, step_ids)
            out += [logits, h]
        return out

    _both(model, run)
    calls = attention_calls
    _check_masked(calls, 13)
    kinds = {(kind, enable_gqa) for kind, *_, enable_gqa in calls}
    if cpu_attention.kernel() is not None and head_dim == 16:
        assert kinds == {("kernel", False)}
    else:
        assert kinds == {("sdpa", False), ("sdpa", True)}  # folded, SDPA's GQA


@torch.no_grad()
def test_rope_table_covers_the_cache_and_grows_on_the_cpu():
    """The RoPE table is built once for the cache's slots; a CPU step at a position past them still matches the
    module path (there the table grows: reading the largest position is free on the CPU)."""
    model = _model()
    packed = PackedModel(model)
    ids = torch.randint(128, (2, 3), generator=torch.Generator().manual_seed(4))
    pos = torch.arange(3)[None].expand(2, 3)
    packed.forward_step(ids, pos, pos, model.new_kv_cache(2, 300))
    assert packed._cos.shape[0] >= 300
    for far in (pos + 500, pos + 40):
        ref = model.forward_step(ids, far, pos, model.new_kv_cache(2, 8))
        got = packed.forward_step(ids, far, pos, model.new_kv_cache(2, 8))
        for a, b in zip(ref, got):
            torch.testing.assert_close(b, a, **TOL)


class _HostReads(TorchFunctionMode):
    """Fails on any call that reads a tensor's value back to the host (.item(), int(t), bool(t), .tolist(),
    torch.equal, ...): on a GPU each is a host-device sync. (Under FakeTensorMode the data-dependent ops below
    them - nonzero, boolean-mask indexing - raise as well.)"""

    READS = frozenset({"item", "tolist", "equal", "__int__", "__bool__", "__float__", "__index__"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in self.READS:
            raise AssertionError(f"a host read in the step: {func.__name__}")
        return func(*args, **(kwargs or {}))


def _fake_model(device):
    model = _to_device(_model(), device)
    caches = [KVCache.empty(2, 3, 2, 29, 8, dtype=torch.bfloat16, device=device) for _ in range(2)]
    return PackedModel(model), *caches


@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")  # (packed.py's cache-view key)
@torch.no_grad()
def test_on_cuda_steps_read_nothing_back_and_fold_gqa_under_aligned_masks(fake_cuda, attention_calls):
    """On a (fake) CUDA device, decode, tree, MTP and chained MTP steps: no value read back to the host (the RoPE
    rows included, #26 B6) and no CPU tensor mixed in (FakeTensorMode raises on both); GQA folded into the query
    rows (SDPA's memory-efficient kernel, the one that takes a mask, has no GQA) under masks allocated 16 wide
    for 11 slots."""
    packed, cache, mtp_cache = _fake_model(fake_cuda)
    ids = torch.zeros(3, 3, dtype=torch.long, device=fake_cuda)
    with _HostReads():
        step = torch.full((3, 1), 7, device=fake_cuda)
        logits, h = packed.forward_step(ids[:, :1], step, step, cache, kv_len=11)
        tree = torch.arange(8, 11, device=fake_cuda)[None].expand(3, 3)
        packed.forward_step(ids, tree, tree, cache, attn_mask=torch.ones(3, 3, 11, dtype=torch.bool, device=fake_cuda),
                            kv_len=11)
        packed.mtp_step(0, h, ids[:, :1], step, step, mtp_cache, kv_len=11)
        chain_step = packed.mtp_chain(0, tree, tree, mtp_cache, kv_len=11)
        for i in range(3):
            _, h = chain_step(i, h, ids[:, :1])
    assert logits.device == fake_cuda and h.device == fake_cuda
    _check_masked(attention_calls, 11)
    assert all(kind == "sdpa" and not gqa and q_shape[1] == 2 for kind, q_shape, *_, gqa in attention_calls)


@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")
@torch.no_grad()
def test_on_cuda_a_prefill_said_to_be_one_is_causal(fake_cuda, attention_calls):
    """On a (fake) CUDA device a prefill is known only from the caller's prefill=True (checking the slots would be a
    host-device sync): then SDPA is_causal with no mask - the flash kernel - and no host read; without it the
    exact masked path."""
    packed, cache, mtp_cache = _fake_model(fake_cuda)
    prompt = torch.zeros(3, 7, dtype=torch.long, device=fake_cuda)
    pos = torch.arange(7, device=fake_cuda)[None].expand(3, 7)
    with _HostReads():
        _, hidden = packed.forward_step(prompt, pos, pos, cache, kv_len=7, prefill=True)
        packed.mtp_step(0, hidden, prompt, pos, pos, mtp_cache, kv_len=7, prefill=True)
    assert len(attention_calls) == 3
    assert all(mask is None and is_causal and gqa for _, _, mask, is_causal, gqa in attention_calls)
    attention_calls.clear()
    packed.forward_step(prompt, pos, pos, cache, kv_len=7)
    assert attention_calls and all(mask is not None and not is_causal for _, _, mask, is_causal, _ in attention_calls)
