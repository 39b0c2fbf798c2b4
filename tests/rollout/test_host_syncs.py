"""Host-device syncs on the decode path, counted on the CPU: every read of a tensor's value on the host (.tolist,
.item, int(), bool(), float(), index use) made while a decode step and its retirement run. On CUDA each is a
stall of the whole pipeline; the engine keeps host-side shadows of row lengths so that a step makes ONE read
(its done flags, tokens emitted per row and the adaptive rule's acceptance counts, together), plus the finished
rows' tokens when some finish. Reads that happen only for CPU tensors (trunk.check_step's slot bounds,
trunk.is_prefill's slot comparison, the packed RoPE table's growth past the cache: skipped on CUDA, where they
would sync; tests/model/test_packed_attention.py runs the packed steps on a fake CUDA device, where any read
fails) are not counted."""

from __future__ import annotations

import traceback

import pytest
import torch

from mtprl.model import CausalLM, ModelConfig
from mtprl.rollout import Engine, SamplingParams, SpeculativeConfig

CPU_ONLY_CHECKS = {"check_step", "is_prefill", "_rope_rows"}
READS = ("tolist", "item", "__int__", "__bool__", "__index__", "__float__")


class HostReads:
    """Counts host reads of tensor values while `active` (per call site, for the failure message)."""

    def __init__(self, monkeypatch):
        self.active = False
        self.sites: dict[str, int] = {}
        for name in READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def read(tensor, *args):
            if self.active and tensor.numel() > 0:
                stack = traceback.extract_stack()[:-1]
                if not any(f.name in CPU_ONLY_CHECKS for f in stack):
                    site = next((f"{f.filename.rsplit('mtprl/', 1)[-1]}:{f.lineno} {name}" for f in reversed(stack)
                                 if "/mtprl/" in f.filename), name)
                    self.sites[site] = self.sites.get(site, 0) + 1
            return original(tensor, *args)
        return read

    @property
    def total(self) -> int:
        return sum(self.sites.values())


@pytest.fixture
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="mimo", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, attention_bias=True,
                      num_mtp_layers=1)
    return CausalLM(cfg).eval()


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "module"])
@pytest.mark.parametrize("spec", [None, SpeculativeConfig(num_steps=3), SpeculativeConfig(num_steps=3, eagle_topk=2),
                                  SpeculativeConfig(num_steps=3, adaptive=True)],
                         ids=["plain", "chain", "tree", "adaptive"])
def test_one_host_read_per_decode_step(model, monkeypatch, spec, packed):
    reads = HostReads(monkeypatch)
    eng = Engine(model, max_num_seqs=8, max_seq_len=128, packed=packed)
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=30, stop_token_ids=[])  # rows end together
    steps, retired = {"n": 0}, {"n": 0, "reads": 0}
    original_step, original_retire = Engine._decode_step, Engine._retire

    def step(self, run):
        reads.active = True
        try:
            steps["n"] += 1
            return original_step(self, run)
        finally:
            reads.active = False

    def retire(self, run, finished):
        retired["n"] += any(finished)
        before = reads.total
        reads.active = True
        try:
            return original_retire(self, run, finished)
        finally:
            reads.active = False
            retired["reads"] += reads.total - before

    monkeypatch.setattr(Engine, "_decode_step", step)
    monkeypatch.setattr(Engine, "_retire", retire)
    out = eng.generate([list(range(1, 12))], params, spec, torch.Generator().manual_seed(0))
    assert len(out) == 4 and steps["n"] > 5
    # one read per step, and one for the finished rows' tokens at each step where some finish
    assert reads.total - retired["reads"] == steps["n"], reads.sites
    assert retired["reads"] == retired["n"] >= 1, reads.sites
