"""Shared fixtures for tests/data: the layout-sample parquet files and one built tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"  # copies of shared/data/*_layout_sample.parquet
DAPO_SAMPLE = FIXTURES / "dapo_math_17k_layout_sample.parquet"
AIME_SAMPLE = FIXTURES / "aime_2024_layout_sample.parquet"


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from mtprl.data.tokenizer import build_math_tokenizer

    return build_math_tokenizer(tmp_path_factory.mktemp("tok"), num_problems=400)


@pytest.fixture(scope="session")
def hf_tokenizer(tokenizer_dir):
    from mtprl.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def raw_tokenizer(tokenizer_dir):
    """The tokenizers.Tokenizer read straight from tokenizer.json (a path independent of transformers)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
