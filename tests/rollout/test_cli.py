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


def test_stops_at_the_eos_ids_of_config_and_generation_config(tmp_path, capsys):
    """verl's rollouts also stop at the model's config.json / generation_config.json eos ids (Qwen / MiMo base
    tokenizers: <|endoftext|> while the chat turn ends with <|im_end|>). A tiny model whose generation_config
    names a second eos id (the 4th token greedy decoding emits): plain and speculative generation stop right
    after it."""
    from transformers import AutoTokenizer

    from mtprl.trainer.policy import eos_token_ids

    path = tmp_path / "model"
    build_math_tokenizer(path, vocab_size=300, num_problems=50)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(1)
    model = CausalLM(tiny_config(vocab_size=len(tok), num_mtp_layers=1)).eval()
    model.save_pretrained(str(path))
    ids = encode_prompts(tok, ["1+1="], raw=False)
    free = Engine(model, max_num_seqs=1, max_seq_len=64).generate(ids, SamplingParams(temperature=0.0, max_new_tokens=10))
    gen = free[0].token_ids
    cut = next(i for i in range(3, len(gen)) if gen[i] not in gen[:i])  # the first stop at gen[cut]
    assert tok.eos_token_id not in gen[:cut + 1]
    unused = next(t for t in range(len(tok)) if t not in gen and t != tok.eos_token_id)
    hf = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**hf, "eos_token_id": unused}))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_token_id, gen[cut]]}))
    assert eos_token_ids(path, tok) == (tok.eos_token_id, unused, gen[cut])
    for extra in ([], ["--speculative-num-steps", "2"]):
        run_generate(_args("--model", str(path), "--prompt", "1+1=", "--temperature", "0", "--max-new-tokens", "10",
                           *extra))
        (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert row["token_ids"] == gen[:cut + 1] and row["finish_reason"] == "stop"
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": "<|im_end|>"}))
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id must be a token id"):
        eos_token_ids(path, tok)
