"""Convert a local copy of the public AIME-2024 parquet file into mtprl's schema (a validation set).

    python examples/data/aime_2024.py path/to/aime-2024.parquet data/aime_2024.parquet [--data-source aime_2024]

Validates every row. The public file repeats each problem (for mean@k validation) and labels rows
"math_dapo"; both are kept unless --dedup / --data-source say otherwise. Nothing is downloaded.
"""

from __future__ import annotations

import argparse

from mtprl.data.converters import convert_aime_2024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="the AIME-2024 parquet file")
    parser.add_argument("output", help="where to write the converted parquet file")
    parser.add_argument("--dedup", action="store_true", help="drop repeated problems")
    parser.add_argument(
        "--data-source", default=None,
        help="new data_source for every row (e.g. aime_2024, for val-core/aime_2024/* metrics); default: keep",
    )
    args = parser.parse_args(argv)
    report = convert_aime_2024(args.input, args.output, dedup=args.dedup, data_source=args.data_source)
    print(report.describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
