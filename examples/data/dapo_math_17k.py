"""Convert a local copy of the public DAPO-Math-17k parquet file into mtprl's schema.

    python examples/data/dapo_math_17k.py path/to/dapo-math-17k.parquet data/dapo_math_17k.parquet

Validates every row, drops the repeated problems (use --keep-duplicates to keep them) and keeps
data_source "math_dapo". Nothing is downloaded: bring the file yourself.
"""

from __future__ import annotations

import argparse

from mtprl.data.converters import convert_dapo_math_17k


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="the DAPO-Math-17k parquet file")
    parser.add_argument("output", help="where to write the converted parquet file")
    parser.add_argument("--keep-duplicates", action="store_true", help="keep the repeated rows")
    args = parser.parse_args(argv)
    report = convert_dapo_math_17k(args.input, args.output, dedup=not args.keep_duplicates)
    print(report.describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
