"""The CPU decode-attention kernel (mtprl/model/csrc/decode_attention.cpp) == F.scaled_dot_product_attention."""

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mtprl.model import cpu_attention

def _cpu_has_avx2_fma() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


needs_kernel = pytest.mark.skipif(shutil.which("c++") is None or not cpu_attention.enabled() or not _cpu_has_avx2_fma(),
                                  reason="no C++ compiler, no AVX2/FMA (Linux x86), or MTPRL_CPU_ATTENTION=0")


@pytest.fixture(scope="module")
def kernel():
    k = cpu_attention.kernel()
    assert k is not None, "a C++ compiler is present but the kernel did not build (see the warning logged)"
    return k


@needs_kernel
@pytest.mark.parametrize("head_dim", [16, 32])
@pytest.mark.parametrize("rows,slots", [(1, 1), (2, 7), (3, 8), (4, 203), (2, 1000)])
def test_kernel_matches_sdpa_on_cache_views(kernel, head_dim, rows, slots):
    """K/V as slices of a larger [R,H,S,D] cache (strided rows and heads), masks with -inf holes, a mask shared
    by the heads and one per head; exact zero weight for masked keys (a huge value there must not leak)."""
    g = torch.Generator().manual_seed(head_dim * 1000 + rows * 10 + slots)
    b, h = 3, 2
    cache_k = torch.randn(b + 1, h, slots + 5, head_dim, generator=g)
    cache_v = torch.randn(b + 1, h, slots + 5, head_dim, generator=g)
    keys, values = cache_k[:b, :, :slots], cache_v[:b, :, :slots]
    q = torch.randn(b, h, rows, head_dim, generator=g) * 2
    for shared in (True, False):
        visible = torch.rand(b, 1 if shared else h, rows, slots, generator=g) < 0.7
        visible[..., 0] = True  # every query row sees at least one key
        mask = torch.where(visible, 0.0, float("-inf"))
        cache_v[:b, :, :slots][~visible.expand(b, h, rows, slots).any(2)] = 1e30  # never attended: must not leak
        values = cache_v[:b, :, :slots]
        ref = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        out = cpu_attention.decode_attention(q, keys, values, mask, head_dim ** -0.5)
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-5)


@needs_kernel
def test_kernel_rejects_what_it_does_not_serve(kernel):
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 4, 16)
    mask = torch.zeros(1, 1, 1, 4)
    with pytest.raises(RuntimeError, match="head_dim"):
        cpu_attention.decode_attention(torch.randn(1, 1, 1, 64), torch.randn(1, 1, 4, 64), torch.randn(1, 1, 4, 64),
                                       mask, 0.125)
    with pytest.raises(RuntimeError, match="float32"):
        cpu_attention.decode_attention(q.double(), k.double(), k.double(), mask.double(), 0.25)
    assert not cpu_attention.usable(cpu_attention.MAX_ROWS[16] + 1, 16, torch.float32, torch.device("cpu"))
    assert not cpu_attention.usable(1, 64, torch.float32, torch.device("cpu"))
    assert not cpu_attention.usable(1, 16, torch.bfloat16, torch.device("cpu"))
    assert cpu_attention.usable(1, 16, torch.float32, torch.device("cpu"))


def test_disabled_kernel_falls_back(monkeypatch):
    monkeypatch.setenv("MTPRL_CPU_ATTENTION", "0")
    cpu_attention.kernel.cache_clear()
    try:
        assert cpu_attention.kernel() is None
        assert not cpu_attention.usable(1, 16, torch.float32, torch.device("cpu"))
    finally:
        cpu_attention.kernel.cache_clear()  # the next caller builds / loads it again


@pytest.fixture
def fresh_kernel(monkeypatch):
    """kernel() forgets its result before and after; the kernel is enabled and a compiler 'present'."""
    monkeypatch.setenv("MTPRL_CPU_ATTENTION", "1")
    monkeypatch.setattr(cpu_attention.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(cpu_attention, "_first_build", lambda name: False)  # (no build directory created)
    cpu_attention.kernel.cache_clear()
    yield
    cpu_attention.kernel.cache_clear()  # the next caller builds / loads the real one again


def test_build_name_is_keyed_by_cpu_and_compile_flags(monkeypatch, fresh_kernel):
    """A -march=native build must never be loaded on a CPU with other instruction-set flags (SIGILL on a cluster
    sharing torch's extension cache): the extension name, and so its cache directory, differs per flag set."""
    base = "avx avx2 fma sse4_2"
    assert cpu_attention.build_name(base) == cpu_attention.build_name(base)
    names = {cpu_attention.build_name(base), cpu_attention.build_name(base + " avx512f"),
             cpu_attention.build_name(base, ("-O3", "-mavx2", "-mfma"))}
    assert len(names) == 3 and all(n.startswith("mtprl_decode_attention_") for n in names)
    assert cpu_attention.cpu_flags() == cpu_attention.cpu_flags() != ""
    loaded = []
    monkeypatch.setattr(cpu_attention, "_load_extension", lambda name: loaded.append(name) or name)
    for flags in (base, base + " avx512f avx512bw"):
        monkeypatch.setattr(cpu_attention, "cpu_flags", lambda: flags)
        cpu_attention.kernel.cache_clear()
        assert cpu_attention.kernel() == cpu_attention.build_name(flags)
    assert loaded == [cpu_attention.build_name(base), cpu_attention.build_name(base + " avx512f avx512bw")]
    assert loaded[0] != loaded[1]


def test_load_failure_falls_back_to_sdpa_with_one_warning(monkeypatch, fresh_kernel, caplog):
    """A build or load that raises (compiler error, a broken or foreign .so) -> kernel() None, ONE warning however
    often it is asked, and the packed path runs on SDPA: the same greedy tokens as the module path."""
    from mtprl.model import CausalLM, tiny_config
    from mtprl.rollout import Engine, SamplingParams

    calls = []

    def broken(name):
        calls.append(name)
        raise ImportError(f"{name}.so: undefined symbol: _ZN2at4_ops")

    monkeypatch.setattr(cpu_attention, "_load_extension", broken)
    monkeypatch.setattr(cpu_attention, "cpu_flags", lambda: "avx avx2 fma sse4_2")
    torch.manual_seed(0)
    model = CausalLM(tiny_config(head_dim=16)).eval()
    prompts, params = [[1, 2, 3], [4, 5]], SamplingParams(temperature=0.0, max_new_tokens=6)
    with caplog.at_level("WARNING", logger=cpu_attention.__name__):
        packed = Engine(model, max_num_seqs=2, max_seq_len=16).generate(prompts, params)
        for _ in range(3):
            assert not cpu_attention.usable(1, 16, torch.float32, torch.device("cpu"))
    module = Engine(model, max_num_seqs=2, max_seq_len=16, packed=False).generate(prompts, params)
    assert [c.token_ids for c in packed] == [c.token_ids for c in module]
    assert len(calls) == 1
    warnings = [r for r in caplog.records if r.name == cpu_attention.__name__]
    assert len(warnings) == 1 and "scaled_dot_product_attention" in warnings[0].getMessage()
    assert "undefined symbol" in warnings[0].getMessage()


def test_cpu_without_avx2_is_not_built(monkeypatch, fresh_kernel, caplog):
    """On x86 Linux, a CPU whose flags lack AVX2/FMA gets SDPA (one warning) without a compile attempt."""
    if not (Path("/proc/cpuinfo").is_file() and cpu_attention.platform.machine() in ("x86_64", "AMD64")):
        pytest.skip("x86 Linux only")
    monkeypatch.setattr(cpu_attention, "cpu_flags", lambda: "sse sse2 sse4_2")
    monkeypatch.setattr(cpu_attention, "_load_extension", lambda name: pytest.fail("must not build"))
    with caplog.at_level("WARNING", logger=cpu_attention.__name__):
        assert cpu_attention.kernel() is None and cpu_attention.kernel() is None
    assert len([r for r in caplog.records if r.name == cpu_attention.__name__]) == 1


@needs_kernel
@pytest.mark.parametrize("m", [1, 2, 5, 16])
@pytest.mark.parametrize("k,n", [(1, 1), (7, 5), (8, 16), (13, 33), (128, 384), (768, 1280), (2304, 768)])
def test_small_mm_matches_addmm(kernel, m, k, n):
    """The few-row matmul: x [M,K] @ w [K,N] (+ init [N] or [M,N]), K and N not multiples of the kernel's 4 / 8 / 16
    blocks too; a non-contiguous x is taken as well."""
    g = torch.Generator().manual_seed(m * 10000 + k * 100 + n)
    x, w = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    tol = dict(rtol=1e-5, atol=1e-5 * k ** 0.5)
    torch.testing.assert_close(cpu_attention.small_mm(x, w), x @ w, **tol)
    for init in (torch.randn(n, generator=g), torch.randn(m, n, generator=g)):
        torch.testing.assert_close(cpu_attention.small_mm(x, w, init), torch.addmm(init, x, w), **tol)
    strided = torch.randn(k, m, generator=g).t()
    torch.testing.assert_close(cpu_attention.small_mm(strided, w), strided @ w, **tol)
    big = torch.randn(512, 512, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert cpu_attention.small_mm_usable(torch.randn(2, 512), big) and not cpu_attention.small_mm_usable(x, w[:, :1])
        assert not cpu_attention.small_mm_usable(torch.randn(17, 512), big)
        assert not cpu_attention.small_mm_usable(torch.randn(1, 512), big)  # one row: torch's GEMM is as fast
        torch.set_num_threads(2)
        assert not cpu_attention.small_mm_usable(torch.randn(4, 512), big)  # two threads: torch's GEMM uses both
    finally:
        torch.set_num_threads(threads)
