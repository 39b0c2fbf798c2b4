"""benchmarks/spec_cost.py --ops: the operator counts it reports are those of the engine's steps (its wrappers
reach every part of a speculative step, and the counts grow by a fixed amount per trunk layer)."""

import importlib.util
from pathlib import Path

import torch

from mtprl.model import CausalLM, ModelConfig
from mtprl.rollout import Engine, SpeculativeConfig

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "spec_cost.py"
_spec = importlib.util.spec_from_file_location("bench_spec_cost", _PATH)
spec_cost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(spec_cost)


def _engine(layers: int) -> Engine:
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="mimo", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, num_mtp_layers=1)
    return Engine(CausalLM(cfg).eval(), max_num_seqs=2, max_seq_len=96)


def test_op_counts_cover_every_part_and_grow_per_layer():
    spec = SpeculativeConfig(num_steps=3)
    plain, speculative = {}, {}
    for layers in (1, 2, 3):
        engine = _engine(layers)
        plain[layers] = spec_cost.op_counts(engine, 2, 12, None)
        speculative[layers] = spec_cost.op_counts(engine, 2, 12, spec)
    for counts in speculative.values():
        parts = [counts[name] for name in spec_cost.SPEC_PHASES]
        assert all(p > 0 for p in parts) and sum(parts) < counts["step"]  # every part seen, the rest is emitting
    for counts in plain.values():
        assert set(counts) == {"step"}
    # one more trunk layer adds the same block's calls to a plain step and to the verification; drafting runs the
    # MTP layer only (its mean may move by a call: the packed path builds cache views once per live-row count)
    per_layer = plain[2]["step"] - plain[1]["step"]
    assert per_layer > 0 and plain[3]["step"] - plain[2]["step"] == per_layer
    assert speculative[3]["verify_and_accept"] - speculative[2]["verify_and_accept"] == per_layer
    assert abs(speculative[3]["draft_tree"] - speculative[2]["draft_tree"]) <= 0.02 * speculative[2]["draft_tree"]
