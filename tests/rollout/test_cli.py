"""`mtprl generate` plumbing: prompts from --prompt / parquet / JSONL, chat template, JSONL output."""

from __future__ import annotations

import argparse
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mtprl.data.tokenizer import build_math_tokenizer
from mtprl.model import CausalLM, tiny_config
from mtprl.rollout import Engine, SamplingParams
from mtprl.rollout.cli import add_generate_args, encode_prompts, read_prompts, run_generate


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen_model")
    build_math_tokenizer(path, vocab_size=300, num_problems=50)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(path))
    torch.manual_seed(0)
    model = CausalLM(tiny_config(vocab_size=vocab, num_mtp_layers=1))
    model.save_pretrained(str(path))
    return path


def _args(*argv):
    parser = argparse.ArgumentParser()
    add_generate_args(parser)
    return parser.parse_args(list(argv))


def test_generate_from_prompt_matches_engine(model_dir, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    args = _args("--model", str(model_dir), "--prompt", "1+1=", "--prompt", "What is 2*3?", "--temperature", "0",
                 "--max-new-tokens", "6", "--output", str(out), "--speculative-num-steps", "2")
    assert run_generate(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt_index"] for r in rows] == [0, 1]
    assert "rollout/spec_accept_length" in json.loads(capsys.readouterr().err)
    from transformers import AutoTokenizer

    from mtprl.model import from_pretrained

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = encode_prompts(tok, ["1+1=", "What is 2*3?"], raw=False)
    assert tok.decode(ids[0]).startswith("<|im_start|>user\n1+1=")  # chat template applied
    model = from_pretrained(str(model_dir)).eval()
    want = Engine(model, max_num_seqs=4, max_seq_len=64).generate(
        ids, SamplingParams(temperature=0.0, max_new_tokens=6, stop_token_ids=(tok.eos_token_id,)))
    assert [r["token_ids"] for r in rows] == [c.token_ids for c in want]
    assert all(len(r["logprobs"]) == len(r["token_ids"]) for r in rows)


def test_parquet_and_jsonl_inputs(model_dir, tmp_path, capsys):
    messages = [[{"role": "user", "content": "1+2="}], [{"role": "system", "content": "hi"}, {"role": "user", "content": "3"}]]
    pq.write_table(pa.table({"prompt": messages, "data_source": ["a", "b"]}), tmp_path / "p.parquet")
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": m}) for m in messages) + "\n")
    assert read_prompts(str(tmp_path / "p.parquet")) == messages == read_prompts(str(tmp_path / "p.jsonl"))
    args = _args("--model", str(model_dir), "--input", str(tmp_path / "p.parquet"), "--n", "2", "--max-new-tokens", "4",
                 "--seed", "3")
    run_generate(args)
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    with pytest.raises(ValueError, match="prompt"):
        (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
        read_prompts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="parquet or .jsonl"):
        (tmp_path / "p.txt").write_text("x")
        read_prompts(str(tmp_path / "p.txt"))
