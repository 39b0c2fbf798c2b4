"""Wall-clock readings that include the device's queued work.

CUDA kernels run asynchronously: a phase timed with ``time.perf_counter()`` alone ends when its last kernel
is queued, so the update (whose optimizer step queues and returns) and the weight sync are undercounted and
the time shows up in whichever later phase first waits on the GPU. On CUDA every reading is taken after
``torch.cuda.synchronize``; on the CPU it is plain ``perf_counter`` (nothing is queued).
"""

from __future__ import annotations

import time

import torch


def device_clock(device: torch.device | str | None = None) -> float:
    """``time.perf_counter()`` once ``device`` has finished the work queued on it so far."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
