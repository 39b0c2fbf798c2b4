"""DAPO-Math-17k / AIME-2024 converters on the layout-sample fixtures, and the example CLI scripts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mtprl.data.converters import convert_aime_2024, convert_dapo_math_17k, convert_math_parquet
from mtprl.data.dataset import load_prompt_records
from mtprl.data.schema import MalformedRowError

from .conftest import AIME_SAMPLE, DAPO_SAMPLE

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"
UUID = "00000000-0000-0000-0000-00000000000{}"


def test_dapo_dedup_keeps_first_occurrences(tmp_path):
    report = convert_dapo_math_17k(DAPO_SAMPLE, tmp_path / "dapo.parquet")
    assert (report.rows_in, report.rows_out, report.duplicates) == (15, 5, 10)
    records = load_prompt_records(report.out_path)
    assert [r.ground_truth for r in records] == ["56", "9", "2", "23", "15"]
    assert [r.extra_info["index"] for r in records] == [UUID.format(i) for i in range(1, 6)]
    assert {r.data_source for r in records} == {"math_dapo"}
    source = pq.read_table(DAPO_SAMPLE)
    out = pq.read_table(report.out_path)
    assert out.schema.equals(source.schema)
    assert out.to_pylist() == source.to_pylist()[:5]  # the sample's first 5 rows are the 5 problems
    assert "15 rows read, 5 written, 10 duplicates dropped" in report.describe()


def test_dapo_keep_duplicates_and_small_read_batches(tmp_path):
    keep = convert_dapo_math_17k(DAPO_SAMPLE, tmp_path / "all.parquet", dedup=False)
    assert (keep.rows_out, keep.duplicates) == (15, 0)
    assert pq.read_table(keep.out_path).to_pylist() == pq.read_table(DAPO_SAMPLE).to_pylist()
    batched = convert_math_parquet(DAPO_SAMPLE, tmp_path / "b.parquet", dedup=True, batch_rows=4)
    assert pq.read_table(batched.out_path).equals(pq.read_table(tmp_path / "all.parquet").slice(0, 5))


def test_aime_keeps_fixture_layout_or_renames_source(tmp_path):
    kept = convert_aime_2024(AIME_SAMPLE, tmp_path / "aime.parquet")
    assert (kept.rows_in, kept.rows_out) == (3, 3)
    records = load_prompt_records(kept.out_path)
    assert [r.data_source for r in records] == ["math_dapo"] * 3
    assert [r.extra_info["index"] for r in records] == [0, 1, 2]
    assert pq.read_table(kept.out_path).equals(pq.read_table(AIME_SAMPLE))
    renamed = convert_aime_2024(AIME_SAMPLE, tmp_path / "aime_named.parquet", data_source="aime_2024")
    records = load_prompt_records(renamed.out_path)
    assert [r.data_source for r in records] == ["aime_2024"] * 3
    assert [r.ground_truth for r in records] == ["56", "9", "2"]
    with pytest.raises(ValueError, match="non-empty"):
        convert_aime_2024(AIME_SAMPLE, tmp_path / "x.parquet", data_source="")


def test_bad_input_stops_without_writing(tmp_path):
    rows = pq.read_table(DAPO_SAMPLE).to_pylist()
    rows[6]["prompt"] = []
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), bad)
    out = tmp_path / "out.parquet"
    with pytest.raises(MalformedRowError, match=r"bad.parquet: row 6 \(0-based\): field 'prompt'"):
        convert_dapo_math_17k(bad, out)
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        convert_dapo_math_17k(tmp_path / "missing.parquet", out)
    no_reward = tmp_path / "no_reward.parquet"
    pq.write_table(pq.read_table(DAPO_SAMPLE).drop_columns(["reward_model"]), no_reward)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['reward_model'\]"):
        convert_dapo_math_17k(no_reward, out)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_scripts(tmp_path, capsys):
    assert load_script("dapo_math_17k").main([str(DAPO_SAMPLE), str(tmp_path / "d.parquet")]) == 0
    assert "5 written, 10 duplicates dropped" in capsys.readouterr().out
    assert len(load_prompt_records(tmp_path / "d.parquet")) == 5
    aime = load_script("aime_2024")
    assert aime.main([str(AIME_SAMPLE), str(tmp_path / "a.parquet"), "--data-source", "aime_2024"]) == 0
    assert {r.data_source for r in load_prompt_records(tmp_path / "a.parquet")} == {"aime_2024"}
    out = tmp_path / "synth"
    assert load_script("synthetic_math").main([str(out), "--num-train", "8", "--num-val", "4"]) == 0
    assert len(load_prompt_records(out / "train.parquet")) == 8
    assert (out / "tokenizer" / "tokenizer.json").is_file()
