"""mtprl.data: parquet prompt data in verl's schema, chat-templated tokenisation, a resumable
seeded loader, SFT pairs, the offline math tokenizer and the synthetic arithmetic data set."""

from mtprl.data.dataset import (
    PromptDataset,
    TokenizedPrompt,
    build_prompt_dataset,
    load_prompt_records,
    tokenize_prompts,
    truncate_ids,
)
from mtprl.data.loader import PromptLoader
from mtprl.data.schema import MalformedRowError, PromptRecord
from mtprl.data.sft import SFTExample, SFTRecord, load_sft_records, tokenize_sft
from mtprl.data.synthetic import write_synthetic_math
from mtprl.data.tokenizer import build_math_tokenizer, load_tokenizer

__all__ = [
    "MalformedRowError",
    "PromptDataset",
    "PromptLoader",
    "PromptRecord",
    "SFTExample",
    "SFTRecord",
    "TokenizedPrompt",
    "build_math_tokenizer",
    "build_prompt_dataset",
    "load_prompt_records",
    "load_sft_records",
    "load_tokenizer",
    "tokenize_prompts",
    "tokenize_sft",
    "truncate_ids",
    "write_synthetic_math",
]
