"""SFT pairs: string or chat prompts, hand-built token sequences and loss masks, truncation, errors."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtprl.data.schema import MalformedRowError
from mtprl.data.sft import load_sft_records, tokenize_sft
from mtprl.data.tokenizer import chatml


def write(rows, path) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_string_and_chat_prompts(tmp_path):
    strings = write([{"prompt": "What is 1+1?", "response": "1+1 = 2\nAnswer: 2"}], tmp_path / "s.parquet")
    chats = write(
        [{"q": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1+1?"}],
          "a": "Answer: 2"}],
        tmp_path / "c.parquet",
    )
    (s,) = load_sft_records(strings)
    assert s.messages == ({"role": "user", "content": "What is 1+1?"},) and s.response == "1+1 = 2\nAnswer: 2"
    (c,) = load_sft_records(chats, prompt_key="q", response_key="a")
    assert [m["role"] for m in c.messages] == ["system", "user"] and c.response == "Answer: 2"


def test_ids_and_loss_mask(tmp_path, hf_tokenizer, raw_tokenizer):
    path = write([{"prompt": "What is 3+4?", "response": "3+4 = 7\nAnswer: 7"}], tmp_path / "s.parquet")
    (ex,) = tokenize_sft(load_sft_records(path), hf_tokenizer, max_length=64)
    prompt_ids = raw_tokenizer.encode(chatml([{"role": "user", "content": "What is 3+4?"}], True)).ids
    response_ids = raw_tokenizer.encode("3+4 = 7\nAnswer: 7<|im_end|>").ids
    assert ex.input_ids == prompt_ids + response_ids
    assert ex.loss_mask == [0] * len(prompt_ids) + [1] * len(response_ids)
    assert ex.input_ids[-1] == hf_tokenizer.eos_token_id


def test_truncation(tmp_path, hf_tokenizer):
    path = write([{"prompt": "What is 3+4?", "response": "3+4 = 7\nAnswer: 7"}], tmp_path / "s.parquet")
    records = load_sft_records(path)
    (full,) = tokenize_sft(records, hf_tokenizer, max_length=64)
    (left,) = tokenize_sft(records, hf_tokenizer, max_length=10, truncation="left")
    (right,) = tokenize_sft(records, hf_tokenizer, max_length=10, truncation="right")
    assert left.input_ids == full.input_ids[-10:] and left.loss_mask == full.loss_mask[-10:]
    assert right.input_ids == full.input_ids[:10] and right.loss_mask == full.loss_mask[:10]
    with pytest.raises(ValueError, match=r"s.parquet: row 0 \(0-based\): \d+ tokens, more than max_length=10"):
        tokenize_sft(records, hf_tokenizer, max_length=10)
    with pytest.raises(ValueError, match="SFT truncation must be one of"):
        tokenize_sft(records, hf_tokenizer, max_length=10, truncation="middle")


@pytest.mark.parametrize(
    "good, bad, field",
    [
        ({"prompt": "q", "response": "r"}, {"prompt": None, "response": "x"}, "prompt"),
        ({"prompt": "q", "response": "r"}, {"prompt": "q", "response": None}, "response"),
        ({"prompt": "q", "response": "r"}, {"prompt": "q", "response": ""}, "response"),
        (
            {"prompt": [{"role": "user", "content": "q"}], "response": "r"},
            {"prompt": [{"role": "robot", "content": "q"}], "response": "x"},
            "prompt[0].role",
        ),
    ],
)
def test_malformed_rows(tmp_path, good, bad, field):
    path = write([good, bad], tmp_path / "bad.parquet")
    with pytest.raises(MalformedRowError) as err:
        load_sft_records(path)
    assert (err.value.path, err.value.row, err.value.field_name) == (path, 1, field)
    assert f"{path}: row 1 (0-based): field '{field}'" in str(err.value)


def test_missing_response_column(tmp_path):
    path = write([{"prompt": "q", "answer": "a"}], tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['response'\].*set data.response_key") as err:
        load_sft_records(path)
    assert "data.prompt_key" not in str(err.value)
