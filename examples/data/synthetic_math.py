"""Write the synthetic arithmetic data set (RL + SFT parquet files) and the offline math tokenizer.

    python examples/data/synthetic_math.py outputs/data --num-train 4000 --num-val 200 --seed 0

Creates out_dir/{train,val,sft_train,sft_val}.parquet and out_dir/tokenizer/ (HF format,
loadable with transformers.AutoTokenizer). Runs offline in about a second.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mtprl.data.synthetic import ALL_LEVELS, TINY_MODEL_LEVELS, write_synthetic_math
from mtprl.data.tokenizer import build_math_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--levels", type=int, nargs="+", default=list(TINY_MODEL_LEVELS), choices=ALL_LEVELS,
        help="difficulty levels, round-robin; repeat one to weight it (default: %(default)s)",
    )
    parser.add_argument("--vocab-size", type=int, default=512)
    args = parser.parse_args(argv)
    paths = write_synthetic_math(
        args.out_dir, num_train=args.num_train, num_val=args.num_val, seed=args.seed, levels=tuple(args.levels)
    )
    tok_dir = build_math_tokenizer(Path(args.out_dir) / "tokenizer", vocab_size=args.vocab_size)
    for path in (paths.train, paths.val, paths.sft_train, paths.sft_val, tok_dir):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
