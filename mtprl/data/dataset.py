"""RL prompt data sets: parquet files in verl's schema -> validated records -> chat-templated token ids.

    records = load_prompt_records(["train.parquet"], prompt_key="prompt")
    data = tokenize_prompts(records, tokenizer, max_prompt_length=64, truncation="error",
                            filter_overlong_prompts=True)
    print(data.describe())          # "... 3 prompts longer than max_prompt_length=64 filtered"

Overlong prompts follow verl's `data.filter_overlong_prompts` and `data.truncation`:
with filtering on they are dropped (and counted); otherwise `truncation` decides:
"error" raises naming the file and row, "left" keeps the last max_prompt_length tokens,
"right" keeps the first ones, "middle" keeps the first half and the last half.
Truncation cuts the chat-templated ids, so "right" may cut the generation prompt, as in verl.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from mtprl.data.schema import PromptRecord, parse_row

logger = logging.getLogger(__name__)

TRUNCATION_MODES = ("error", "left", "right", "middle")


def read_parquet_rows(
    path: str | Path, required_columns: Sequence[str], config_keys: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Read a whole parquet file as a list of row dicts; clear errors for a missing file or column.

    config_keys: column -> the config key that names it (``data.prompt_key``), for the missing-column hint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"parquet file not found: {path} (check data.train_files / data.val_files)"
        )
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{path}: cannot be read as parquet: {err}") from err
    missing = [c for c in required_columns if c not in table.column_names]
    if missing:
        keys = config_keys or {}
        hints = [f" If '{c}' lives under another name, set {keys[c]} to it." for c in missing if c in keys]
        raise ValueError(f"{path}: missing column(s) {missing}; the file has {table.column_names}." + "".join(hints))
    return table.to_pylist()


def load_prompt_records(
    files: str | Path | Sequence[str | Path],
    *,
    prompt_key: str = "prompt",
    reward_fn_key: str = "data_source",
) -> list[PromptRecord]:
    """Load and validate every row of the given parquet files, in order (index = running count).

    Required columns: `prompt_key`, `reward_fn_key`, "reward_model"; "ability" and "extra_info"
    are optional. The first malformed row stops loading with a MalformedRowError.
    """
    if isinstance(files, (str, Path)):
        files = [files]
    if len(files) == 0:
        raise ValueError("no parquet files given; set data.train_files / data.val_files")
    records: list[PromptRecord] = []
    for path in files:
        rows = read_parquet_rows(path, [prompt_key, reward_fn_key, "reward_model"],
                                 {prompt_key: "data.prompt_key", reward_fn_key: "data.reward_fn_key"})
        for row_idx, row in enumerate(rows):
            records.append(
                parse_row(
                    row, index=len(records), path=str(path), row_idx=row_idx,
                    prompt_key=prompt_key, reward_fn_key=reward_fn_key,
                )
            )
    return records


def truncate_ids(ids: list[int], max_length: int, mode: str) -> list[int]:
    """Cut `ids` to `max_length` tokens: "left" keeps the end, "right" the start, "middle" both ends.

    Raises ValueError for mode "error" (callers name the row) and for an unknown mode.
    """
    if mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {mode!r}")
    if len(ids) <= max_length:
        return list(ids)
    if mode == "left":
        return list(ids[len(ids) - max_length:])
    if mode == "right":
        return list(ids[:max_length])
    if mode == "middle":
        head = max_length // 2
        tail = max_length - head
        return list(ids[:head]) + list(ids[len(ids) - tail:])
    raise ValueError(f"sequence of {len(ids)} tokens is longer than {max_length} (truncation='error')")


def chat_prompt_texts(tokenizer: Any, conversations: Sequence[Sequence[dict[str, str]]]) -> list[str]:
    """Render chat messages with the tokenizer's chat template, ending in the generation prompt."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "the tokenizer has no chat template; use a tokenizer saved with one "
            "(mtprl.data.tokenizer.build_math_tokenizer writes a ChatML template)"
        )
    return [
        tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        for messages in conversations
    ]


def encode_chat_prompts(tokenizer: Any, conversations: Sequence[Sequence[dict[str, str]]]) -> list[list[int]]:
    """Chat-template then tokenize (no extra BOS/EOS: the template holds every special token)."""
    texts = chat_prompt_texts(tokenizer, conversations)
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def encode_record_prompts(tokenizer: Any, records: Sequence[Any]) -> list[list[int]]:
    """`encode_chat_prompts` of records with ``messages``, ``source_file`` and ``source_row``; a chat template
    that fails on a row (a template that rejects a role order, ...) raises a ValueError naming file and row."""
    chat_prompt_texts(tokenizer, [])  # no template at all: its own error
    try:
        return encode_chat_prompts(tokenizer, [r.messages for r in records])
    except Exception as batch_error:
        for r in records:
            try:
                chat_prompt_texts(tokenizer, [r.messages])
            except Exception as e:
                raise ValueError(
                    f"{r.source_file}: row {r.source_row} (0-based): the tokenizer's chat template failed on this "
                    f"prompt: {type(e).__name__}: {e}"
                ) from e
        raise batch_error


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt ready for rollout.

    record: the validated row.
    prompt_ids: [T_prompt] chat-templated token ids, at most max_prompt_length long.
    truncated: whether prompt_ids was cut (only with filter_overlong_prompts=False).
    """

    record: PromptRecord
    prompt_ids: list[int]
    truncated: bool


@dataclass(frozen=True)
class PromptDataset:
    """Tokenized prompts plus what happened to overlong ones.

    prompts: kept prompts, in file order.
    num_rows: rows read.
    num_filtered: rows dropped for being longer than max_prompt_length.
    num_truncated: rows kept but cut to max_prompt_length.
    max_prompt_length: the limit applied.
    """

    prompts: list[TokenizedPrompt]
    num_rows: int
    num_filtered: int
    num_truncated: int
    max_prompt_length: int

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> TokenizedPrompt:
        return self.prompts[i]

    def describe(self) -> str:
        """One line for the console: counts of rows, kept, filtered and truncated prompts."""
        return (
            f"{self.num_rows} prompt rows, {len(self.prompts)} kept; "
            f"{self.num_filtered} longer than max_prompt_length={self.max_prompt_length} filtered, "
            f"{self.num_truncated} truncated"
        )


def tokenize_prompts(
    records: Sequence[PromptRecord],
    tokenizer: Any,
    *,
    max_prompt_length: int,
    truncation: str = "error",
    filter_overlong_prompts: bool = False,
) -> PromptDataset:
    """Chat-template and tokenize every record; filter or truncate the overlong ones (see module doc)."""
    if max_prompt_length <= 0:
        raise ValueError(f"max_prompt_length must be positive, got {max_prompt_length}")
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"data.truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    all_ids = encode_record_prompts(tokenizer, records)
    kept: list[TokenizedPrompt] = []
    num_filtered = num_truncated = 0
    for record, ids in zip(records, all_ids):
        if len(ids) <= max_prompt_length:
            kept.append(TokenizedPrompt(record=record, prompt_ids=ids, truncated=False))
        elif filter_overlong_prompts:
            num_filtered += 1
        elif truncation == "error":
            raise ValueError(
                f"{record.source_file}: row {record.source_row} (0-based): prompt has {len(ids)} tokens, "
                f"more than max_prompt_length={max_prompt_length}; raise data.max_prompt_length, set "
                "data.filter_overlong_prompts=true, or pick data.truncation=left|right|middle"
            )
        else:
            num_truncated += 1
            kept.append(
                TokenizedPrompt(
                    record=record, prompt_ids=truncate_ids(ids, max_prompt_length, truncation), truncated=True
                )
            )
    data = PromptDataset(
        prompts=kept, num_rows=len(records), num_filtered=num_filtered,
        num_truncated=num_truncated, max_prompt_length=max_prompt_length,
    )
    logger.info(data.describe())
    if not kept:
        raise ValueError(f"no prompt left after filtering: {data.describe()}")
    return data


def build_prompt_dataset(
    files: str | Path | Sequence[str | Path],
    tokenizer: Any,
    *,
    max_prompt_length: int,
    truncation: str = "error",
    filter_overlong_prompts: bool = False,
    prompt_key: str = "prompt",
    reward_fn_key: str = "data_source",
) -> PromptDataset:
    """`load_prompt_records` then `tokenize_prompts`: parquet files -> PromptDataset."""
    records = load_prompt_records(files, prompt_key=prompt_key, reward_fn_key=reward_fn_key)
    return tokenize_prompts(
        records, tokenizer, max_prompt_length=max_prompt_length, truncation=truncation,
        filter_overlong_prompts=filter_overlong_prompts,
    )
