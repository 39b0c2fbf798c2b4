"""Converters for the public math RL parquet files (when a user has them locally) into our schema.

DAPO-Math-17k (`dapo-math-17k.parquet`): already in verl's layout (data_source "math_dapo", DAPO
instruction template in the user turn, reward_model.ground_truth, extra_info.index a uuid string),
but each problem is repeated many times (about 100x). We validate every row, optionally drop the
repeats (same data source, messages and ground truth: the first occurrence is kept), and write the
rows unchanged otherwise, with the input's column types.

AIME-2024 (`aime-2024.parquet`): the same layout; the public file also uses data_source "math_dapo"
(see shared/data/aime_2024_layout_sample.parquet) and repeats each problem (32x) so that validation
averages several samples. We keep both by default; `data_source="aime_2024"` renames the source so
validation metrics come out as `val-core/aime_2024/...`.

The input is read in batches, so the 1.8M-row DAPO file never sits in memory as Python objects;
only the kept rows do.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mtprl.data.schema import parse_row

REQUIRED_COLUMNS = ("data_source", "prompt", "reward_model")


@dataclass(frozen=True)
class ConversionReport:
    """rows_in: rows read; rows_out: rows written; duplicates: rows dropped as repeats."""

    in_path: Path
    out_path: Path
    rows_in: int
    rows_out: int
    duplicates: int

    def describe(self) -> str:
        return (
            f"{self.in_path} -> {self.out_path}: {self.rows_in} rows read, {self.rows_out} written, "
            f"{self.duplicates} duplicates dropped"
        )


def _open_parquet(path: Path) -> pq.ParquetFile:
    if not path.is_file():
        raise FileNotFoundError(f"parquet file not found: {path}")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{path}: cannot be read as parquet: {err}") from err
    missing = [c for c in REQUIRED_COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; the file has {pf.schema_arrow.names}")
    return pf


def convert_math_parquet(
    in_path: str | Path,
    out_path: str | Path,
    *,
    dedup: bool,
    data_source: str | None = None,
    batch_rows: int = 8192,
) -> ConversionReport:
    """Validate, optionally de-duplicate and re-label a verl-layout math parquet file.

    dedup: drop rows whose (data_source, prompt messages, ground_truth) was seen before.
    data_source: new data_source for every row; None keeps the file's.
    Raises MalformedRowError (file, row, field) on the first bad row; writes nothing then.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    if data_source is not None and not data_source:
        raise ValueError("data_source must be a non-empty string or None (keep the file's)")
    pf = _open_parquet(in_path)
    schema = pf.schema_arrow.remove_metadata()  # pandas metadata would describe the input's row index
    if data_source is not None:
        schema = schema.set(schema.get_field_index("data_source"), pa.field("data_source", pa.string()))
    seen: set[str] = set()
    kept: list[dict] = []
    rows_in = 0
    for batch in pf.iter_batches(batch_size=batch_rows):
        for row in batch.to_pylist():
            record = parse_row(row, index=rows_in, path=str(in_path), row_idx=rows_in)
            rows_in += 1
            if dedup:
                key = json.dumps([record.data_source, record.messages, record.ground_truth])
                if key in seen:
                    continue
                seen.add(key)
            if data_source is not None:
                row["data_source"] = data_source
            kept.append(row)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(kept, schema=schema), tmp)
    os.replace(tmp, out_path)
    return ConversionReport(in_path, out_path, rows_in, len(kept), rows_in - len(kept))


def convert_dapo_math_17k(in_path: str | Path, out_path: str | Path, *, dedup: bool = True) -> ConversionReport:
    """DAPO-Math-17k: keep data_source "math_dapo"; drop the repeated rows by default."""
    return convert_math_parquet(in_path, out_path, dedup=dedup)


def convert_aime_2024(
    in_path: str | Path, out_path: str | Path, *, dedup: bool = False, data_source: str | None = None
) -> ConversionReport:
    """AIME-2024: keep the file's data_source ("math_dapo") unless given one; keep repeats by default."""
    return convert_math_parquet(in_path, out_path, dedup=dedup, data_source=data_source)
