"""The LR schedule against verl's get_constant_schedule_with_warmup / get_cosine_schedule_with_warmup."""

import math

import pytest
import torch

from mtprl.config.schema import OptimConfig
from mtprl.trainer.optim import build_scheduler, lr_factor


def test_constant_warmup_starts_from_zero_as_verl():
    # verl: current_step / max(1, num_warmup_steps) while current_step < num_warmup_steps, then 1
    got = [lr_factor(s, warmup=4, total=10, style="constant", min_lr_ratio=0.0) for s in range(6)]
    assert got == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])


def test_cosine_warmup_then_decay_to_min_ratio():
    f = [lr_factor(s, warmup=2, total=6, style="cosine", min_lr_ratio=0.1) for s in range(7)]
    # warmup 0, 1/2; then 0.1 + 0.9 * 0.5 * (1 + cos(pi * (s - 2) / 4))
    expect = [0.0, 0.5] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 4)) for s in range(2, 7)]
    assert f == pytest.approx(expect)
    assert f[2] == pytest.approx(1.0) and f[4] == pytest.approx(0.55) and f[6] == pytest.approx(0.1)


def test_scheduler_lr_per_step():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = build_scheduler(opt, OptimConfig(lr=1e-3, lr_warmup_steps=2), total_steps=5)
    lrs = []
    for _ in range(4):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.5e-3, 1e-3, 1e-3])
