"""Loading verl-layout parquet files into PromptRecords, errors for bad rows, and prompt tokenisation."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtprl.data.dataset import build_prompt_dataset, load_prompt_records, tokenize_prompts, truncate_ids
from mtprl.data.schema import MalformedRowError, parse_row, record_to_row
from mtprl.data.tokenizer import chatml

from .conftest import AIME_SAMPLE, DAPO_SAMPLE


def good_row(i: int, content: str = "What is 1+2?", gt: str = "3") -> dict:
    return {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": f"{content} #{i}"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": gt, "style": "rule"},
        "extra_info": {"index": i},
    }


def write(rows: list[dict], path) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_loads_fixtures_in_order_with_running_index():
    records = load_prompt_records([AIME_SAMPLE, DAPO_SAMPLE])
    assert len(records) == 3 + 15
    assert [r.index for r in records] == list(range(18))
    assert [r.source_row for r in records[3:6]] == [0, 1, 2]
    first = records[0]
    assert first.data_source == "math_dapo"
    assert first.ground_truth == "56"
    assert first.ability == "MATH"
    assert first.reward_style == "rule-lighteval/MATH_v2"
    assert first.extra_info == {"index": 0}
    assert len(first.messages) == 1 and first.messages[0]["role"] == "user"
    assert "What is the sum of the positive divisors of 28?" in first.messages[0]["content"]
    assert records[3].extra_info == {"index": "00000000-0000-0000-0000-000000000001"}
    assert [r.ground_truth for r in records[3:8]] == ["56", "9", "2", "23", "15"]
    assert records[0].source_file == str(AIME_SAMPLE)


def test_record_round_trips_through_row():
    record = load_prompt_records(DAPO_SAMPLE)[4]
    row = record_to_row(record)
    again = parse_row(row, index=4, path=record.source_file, row_idx=record.source_row)
    assert again == record


def _set(row: dict, path: str, value) -> dict:
    *parents, leaf = path.split(".")
    target = row
    for key in parents:
        target = target[key]
    target[leaf] = value
    return row


@pytest.mark.parametrize(
    "column_path, value, field",
    [
        ("prompt", None, "prompt"),
        ("prompt", [], "prompt"),
        ("prompt", [{"role": "tool", "content": "x"}], "prompt[0].role"),
        ("prompt", [{"role": "user", "content": None}], "prompt[0].content"),
        ("reward_model.ground_truth", None, "reward_model.ground_truth"),
        ("reward_model", None, "reward_model"),
        ("data_source", None, "data_source"),
        ("data_source", "", "data_source"),
    ],
)
def test_bad_row_names_file_row_and_field(tmp_path, column_path, value, field):
    rows = [good_row(i) for i in range(4)]
    _set(rows[2], column_path, value)
    path = write(rows, tmp_path / "bad.parquet")
    with pytest.raises(MalformedRowError) as err:
        load_prompt_records(path)
    assert err.value.path == path and err.value.row == 2 and err.value.field_name == field
    assert f"{path}: row 2 (0-based): field '{field}'" in str(err.value)


@pytest.mark.parametrize(
    "column_path, value, field",
    [
        ("prompt", "What is 1+2?", "prompt"),  # a plain string, not chat messages
        ("reward_model.ground_truth", 3, "reward_model.ground_truth"),  # int column
        ("data_source", 7, "data_source"),
        ("extra_info", "note", "extra_info"),
        ("ability", 1, "ability"),
    ],
)
def test_wrong_column_type_is_an_error_at_row_zero(tmp_path, column_path, value, field):
    rows = [_set(good_row(i), column_path, value) for i in range(3)]
    path = write(rows, tmp_path / "typed.parquet")
    with pytest.raises(MalformedRowError, match=rf"row 0 \(0-based\): field '{field}'"):
        load_prompt_records(path)


def test_missing_file_and_missing_column(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        load_prompt_records(tmp_path / "nope.parquet")
    rows = [good_row(0)]
    rows[0]["messages"] = rows[0].pop("prompt")
    path = write(rows, tmp_path / "renamed.parquet")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['prompt'\].*data.prompt_key"):
        load_prompt_records(path)
    # the configurable prompt key (verl's data.prompt_key) reads it
    (record,) = load_prompt_records(path, prompt_key="messages")
    assert record.messages == ({"role": "user", "content": "What is 1+2? #0"},)
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_text("hello")
    with pytest.raises(ValueError, match="cannot be read as parquet"):
        load_prompt_records(not_parquet)
    with pytest.raises(ValueError, match="no parquet files"):
        load_prompt_records([])


def test_optional_columns_default(tmp_path):
    row = good_row(0)
    del row["ability"], row["extra_info"]
    (record,) = load_prompt_records(write([row], tmp_path / "min.parquet"))
    assert record.ability == "" and record.extra_info == {}


@pytest.mark.parametrize(
    "mode, length, expected",
    [
        ("left", 4, [7, 8, 9, 10]),
        ("right", 4, [1, 2, 3, 4]),
        ("middle", 4, [1, 2, 9, 10]),
        ("middle", 5, [1, 2, 8, 9, 10]),
        ("left", 10, list(range(1, 11))),
        ("error", 10, list(range(1, 11))),
    ],
)
def test_truncate_ids(mode, length, expected):
    assert truncate_ids(list(range(1, 11)), length, mode) == expected


def test_truncate_ids_errors():
    with pytest.raises(ValueError, match="truncation='error'"):
        truncate_ids([1, 2, 3], 2, "error")
    with pytest.raises(ValueError, match="must be one of"):
        truncate_ids([1, 2, 3], 2, "both")


def test_prompt_ids_are_the_chat_template_tokens(hf_tokenizer, raw_tokenizer):
    records = load_prompt_records(AIME_SAMPLE)
    data = tokenize_prompts(records, hf_tokenizer, max_prompt_length=1024)
    assert data.num_filtered == data.num_truncated == 0 and len(data) == 3
    for item, record in zip(data.prompts, records):
        text = chatml(record.messages, add_generation_prompt=True)
        assert item.prompt_ids == raw_tokenizer.encode(text).ids
        assert raw_tokenizer.decode(item.prompt_ids, skip_special_tokens=False) == text
        assert item.record is record and not item.truncated


@pytest.fixture()
def mixed_lengths(tmp_path, raw_tokenizer):
    """A file with prompts of several lengths and their untruncated ids from the raw tokenizer."""
    rows = [good_row(i, content="What is 1+2?" + " and 3" * (3 * i)) for i in range(6)]
    path = write(rows, tmp_path / "mixed.parquet")
    full = [raw_tokenizer.encode(chatml(r["prompt"], add_generation_prompt=True)).ids for r in rows]
    return path, full


def test_filter_overlong_prompts_counts_them(hf_tokenizer, mixed_lengths):
    path, full = mixed_lengths
    limit = sorted(len(ids) for ids in full)[2]  # keeps exactly the three shortest
    data = build_prompt_dataset(path, hf_tokenizer, max_prompt_length=limit, filter_overlong_prompts=True)
    assert data.num_rows == 6 and data.num_filtered == 3 and data.num_truncated == 0
    assert [p.record.source_row for p in data.prompts] == [0, 1, 2]
    assert f"3 longer than max_prompt_length={limit} filtered" in data.describe()


@pytest.mark.parametrize("mode", ["left", "right", "middle"])
def test_truncation_modes(hf_tokenizer, mixed_lengths, mode):
    path, full = mixed_lengths
    limit = len(full[1])
    data = build_prompt_dataset(path, hf_tokenizer, max_prompt_length=limit, truncation=mode)
    assert len(data) == 6 and data.num_truncated == 4 and data.num_filtered == 0
    for item, ids in zip(data.prompts, full):
        assert item.truncated == (len(ids) > limit)
        if mode == "left":
            assert item.prompt_ids == ids[-limit:]
        elif mode == "right":
            assert item.prompt_ids == ids[:limit]
        else:
            assert item.prompt_ids == (ids[: limit // 2] + ids[-(limit - limit // 2):] if len(ids) > limit else ids)


def test_truncation_error_names_the_row(hf_tokenizer, mixed_lengths):
    path, full = mixed_lengths
    with pytest.raises(ValueError, match=rf"mixed.parquet: row 2 \(0-based\): prompt has {len(full[2])} tokens"):
        build_prompt_dataset(path, hf_tokenizer, max_prompt_length=len(full[1]), truncation="error")


def test_tokenize_bad_arguments(hf_tokenizer, mixed_lengths):
    path, full = mixed_lengths
    records = load_prompt_records(path)
    with pytest.raises(ValueError, match="data.truncation must be one of"):
        tokenize_prompts(records, hf_tokenizer, max_prompt_length=8, truncation="start")
    with pytest.raises(ValueError, match="max_prompt_length must be positive"):
        tokenize_prompts(records, hf_tokenizer, max_prompt_length=0)
    with pytest.raises(ValueError, match="no prompt left"):
        tokenize_prompts(records, hf_tokenizer, max_prompt_length=3, filter_overlong_prompts=True)


def test_tokenizer_without_chat_template_is_an_error(tokenizer_dir, mixed_lengths):
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    with pytest.raises(ValueError, match="no chat template"):
        tokenize_prompts(load_prompt_records(mixed_lengths[0]), plain, max_prompt_length=64)


def test_missing_data_source_column_names_reward_fn_key(tmp_path):
    rows = [good_row(0)]
    rows[0]["source"] = rows[0].pop("data_source")
    path = write(rows, tmp_path / "nosource.parquet")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['data_source'\].*set data.reward_fn_key") as err:
        load_prompt_records(path)
    assert "data.prompt_key" not in str(err.value)  # the prompt column is there: do not point at its key
    (record,) = load_prompt_records(path, reward_fn_key="source")
    assert record.data_source == "math_dapo"


def test_chat_template_failure_names_file_and_row(hf_tokenizer, tmp_path):
    import copy

    strict = copy.deepcopy(hf_tokenizer)
    strict.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with a user message') }}"
        "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    rows = [good_row(i) for i in range(4)]
    rows[2]["prompt"] = [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "1+2?"}]
    path = write(rows, tmp_path / "roles.parquet")
    with pytest.raises(ValueError, match=r"roles.parquet: row 2 \(0-based\): .*chat template.*start with a user message"):
        build_prompt_dataset(path, strict, max_prompt_length=64)
