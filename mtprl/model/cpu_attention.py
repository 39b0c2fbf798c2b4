"""A CPU attention kernel for decode steps (csrc/decode_attention.cpp), built on first use; the same extension
holds the few-row matmul (small_mm) of batch-1 decode and verification steps.

PyTorch's CPU attention pays several microseconds of GEMM set-up per (batch row, kv head) pair, which dominates
a decode step's attention when the head dim is small and each pair has only a few query rows (one-token steps,
MTP draft levels, short verifications): on the rollout benchmark's model (head dim 16, GQA 4/2, 24 layers) the
kernel takes 0.57-0.74x the time of `F.scaled_dot_product_attention` at batch 1 and 0.69-0.97x at batch 16-64
for 2-12 query rows per kv head (benchmarks/attention.py). With more rows, or head dims of 64 and up, SDPA's
GEMMs win: the packed path uses the kernel only within MAX_ROWS.

Built with `torch.utils.cpp_extension.load` (-O3 -march=native; needs a C++ compiler and an AVX2+FMA CPU) into
torch's extension cache (~30 s once per machine; `make setup` does it), then loaded in well under a second.
`MTPRL_CPU_ATTENTION=0` turns it off. When it cannot be built or loaded, `kernel()` returns None with one
warning and callers keep using SDPA: the kernel is an optimisation, never a requirement.

The cache is keyed by extension name only, and may be shared by machines (a shared home on a cluster): a
-march=native build from a CPU with more instruction-set extensions would die with SIGILL on another. So the
name carries a hash of the CPU's flags (/proc/cpuinfo) and the compile flags (`build_name`): each kind of CPU
gets its own build.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

# head dim -> query rows per (batch row, kv head) up to which the kernel is not slower than SDPA at batch 1-64
# (benchmarks/attention.py on this project's CPU). From head dim 64 on SDPA's GEMMs win (the kernel's one FMA
# chain per key then costs more than the GEMM set-up it saves), so those sizes always use SDPA.
MAX_ROWS = {16: 12, 32: 4}
SOURCE = Path(__file__).parent / "csrc" / "decode_attention.cpp"
CFLAGS = ("-O3", "-march=native")
_log = logging.getLogger(__name__)


def enabled() -> bool:
    return os.environ.get("MTPRL_CPU_ATTENTION", "1") not in ("0", "false", "off", "")


@functools.cache
def kernel():
    """The compiled module (its `decode_attention(q, k, v, mask, scale)`), or None when disabled or unbuildable.
    Built or loaded once per process (`kernel.cache_clear()` forgets the result)."""
    return _build() if enabled() else None


def cpu_flags() -> str:
    """The CPU's instruction-set flags: the first `flags` (x86) or `Features` (ARM) line of /proc/cpuinfo, sorted;
    where there is none (not Linux), the platform's machine and processor names."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")) and ":" in line:
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def build_name(flags: str, cflags: tuple[str, ...] = CFLAGS) -> str:
    """The extension's name in torch's cache: one build per (CPU flags, compile flags)."""
    digest = hashlib.sha256("\n".join((platform.machine(), flags, " ".join(cflags))).encode()).hexdigest()[:12]
    return f"mtprl_decode_attention_{digest}"


def _load_extension(name: str):
    """Build (first time) or load the extension `name` from torch's cache."""
    from torch.utils.cpp_extension import load

    return load(name=name, sources=[str(SOURCE)], extra_cflags=list(CFLAGS), verbose=False)


def _build():
    flags = cpu_flags()
    x86_linux = platform.machine() in ("x86_64", "AMD64") and Path("/proc/cpuinfo").is_file()
    if x86_linux and not {"avx2", "fma"} <= set(flags.split()):  # (elsewhere the compiler's #error tells)
        _log.warning("this CPU has no AVX2/FMA: CPU decode attention falls back to scaled_dot_product_attention")
        return None
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        _log.warning("no C++ compiler found: CPU decode attention falls back to scaled_dot_product_attention")
        return None
    name = build_name(flags)
    try:
        if _first_build(name):  # a first build takes ~30 s: say so (later loads take milliseconds)
            print("mtprl: building the CPU decode-attention kernel (once per kind of CPU, about 30 s)",
                  file=sys.stderr, flush=True)
        return _load_extension(name)
    except Exception as exc:  # no AVX2, compiler error, a broken cached build, ...: an optimisation only
        _log.warning("CPU decode-attention kernel not built or loaded (%s): using scaled_dot_product_attention",
                     str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__)
        return None


def _first_build(name: str) -> bool:
    try:  # (a private helper of torch's: any failure just means "say it")
        from torch.utils.cpp_extension import _get_build_directory

        return not any(Path(_get_build_directory(name, verbose=False)).glob("*.so"))
    except Exception:
        return True


def usable(rows: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the packed path should use decode_attention for a step: float32 on the CPU, at most
    MAX_ROWS[head_dim] query rows per (batch row, kv head), and the kernel built."""
    return (rows <= MAX_ROWS.get(head_dim, 0) and device.type == "cpu" and dtype == torch.float32
            and kernel() is not None)


# small_mm: 2 to this many rows, weights of at least this many elements (1 MB in fp32: below that the weights sit in
# cache and torch's GEMM is as fast or faster), one torch thread. Measured on the 97M model (docs/performance.md):
# at one thread a 4-row verification step 1.19-1.36x as fast as through torch's GEMM, a one-row step 0.94x; at two
# threads torch's GEMM uses both cores and small_mm (one) is slower everywhere (0.67x one row, 0.87x four rows).
SMALL_MM_MAX_ROWS, SMALL_MM_MIN_WEIGHT = 16, 1 << 18


def small_mm_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the packed path should compute x @ w with the kernel's small_mm: 2 to SMALL_MM_MAX_ROWS float32 CPU
    rows against a weight of SMALL_MM_MIN_WEIGHT elements or more (streamed from memory), torch on one thread, the
    kernel built."""
    return (2 <= x.shape[0] <= SMALL_MM_MAX_ROWS and w.numel() >= SMALL_MM_MIN_WEIGHT and x.dtype == torch.float32
            and w.dtype == torch.float32 and x.device.type == "cpu" and torch.get_num_threads() == 1
            and kernel() is not None)


def small_mm(x: torch.Tensor, w: torch.Tensor, init: torch.Tensor | None = None) -> torch.Tensor:
    """x [M,K] @ w [K,N] (+ init [N], [1,N] or [M,N]) -> [M,N] for 1 <= M <= 16: the same as torch.addmm(init, x, w)
    up to rounding, reading w once (batch-1 decode and verification steps stream every weight)."""
    return kernel().small_mm(x, w, init)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """q [B,H,M,D], keys / values [B,H,S,D] (last dim contiguous), additive mask [B,1,M,S] -> [B,H,M,D];
    the same as F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)."""
    return kernel().decode_attention(q, keys, values, mask, scale)
