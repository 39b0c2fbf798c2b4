"""SFT pairs: parquet in verl's SFTDataset layout -> prompt + response token ids with a loss mask.

verl's SFTDataset reads `data.prompt_key` (default "prompt") and `data.response_key` (default
"response"); the prompt is a string that becomes one user message. We accept that, and also a
prompt column holding chat messages (our RL layout). The sequence is

    chat_template(messages, add_generation_prompt=True) + response + eos_token

and loss_mask[t] = 1 marks the response and eos tokens, the ones the model learns to emit
(the trainer shifts: logits at t-1 predict token t).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mtprl.data.dataset import encode_record_prompts, read_parquet_rows
from mtprl.data.schema import MalformedRowError, parse_messages

SFT_TRUNCATION_MODES = ("error", "left", "right")


@dataclass(frozen=True)
class SFTRecord:
    """One SFT pair.

    index: position over all files given (0-based).
    messages: the prompt as chat messages (a string prompt becomes one user message).
    response: the target assistant text (without eos).
    """

    index: int
    messages: tuple[dict[str, str], ...]
    response: str
    source_file: str = ""
    source_row: int = -1


def load_sft_records(
    files: str | Path | Sequence[str | Path], *, prompt_key: str = "prompt", response_key: str = "response"
) -> list[SFTRecord]:
    """Load SFT pairs; malformed rows raise MalformedRowError naming file, row and field."""
    if isinstance(files, (str, Path)):
        files = [files]
    if len(files) == 0:
        raise ValueError("no SFT parquet files given")
    records: list[SFTRecord] = []
    for path in files:
        rows = read_parquet_rows(path, [prompt_key, response_key],
                                 {prompt_key: "data.prompt_key", response_key: "data.response_key"})
        for row_idx, row in enumerate(rows):
            prompt, response = row.get(prompt_key), row.get(response_key)
            if prompt is None:
                raise MalformedRowError(str(path), row_idx, prompt_key, "missing (null) prompt")
            if isinstance(prompt, str):
                messages: tuple[dict[str, str], ...] = ({"role": "user", "content": prompt},)
            else:
                messages = parse_messages(prompt, path=str(path), row=row_idx, field_name=prompt_key)
            if not isinstance(response, str) or not response:
                got = "missing" if response is None else repr(response)[:40]
                raise MalformedRowError(str(path), row_idx, response_key, f"expected a non-empty string, got {got}")
            records.append(SFTRecord(len(records), messages, response, str(path), row_idx))
    return records


@dataclass(frozen=True)
class SFTExample:
    """input_ids: [T] prompt + response + eos ids; loss_mask: [T] 1 where the token is a training target."""

    input_ids: list[int]
    loss_mask: list[int]


def tokenize_sft(
    records: Sequence[SFTRecord], tokenizer: Any, *, max_length: int, truncation: str = "error"
) -> list[SFTExample]:
    """Tokenize SFT pairs; sequences over max_length are cut per `truncation` (verl's SFT modes).

    "left" keeps the end (the response), "right" keeps the start, "error" raises naming the row.
    """
    if truncation not in SFT_TRUNCATION_MODES:
        raise ValueError(f"SFT truncation must be one of {SFT_TRUNCATION_MODES}, got {truncation!r}")
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos_token; SFT responses must end with one")
    prompt_ids = encode_record_prompts(tokenizer, records)
    responses = [r.response + tokenizer.eos_token for r in records]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"] if records else []
    examples = []
    for record, p_ids, r_ids in zip(records, prompt_ids, response_ids):
        ids = list(p_ids) + list(r_ids)
        mask = [0] * len(p_ids) + [1] * len(r_ids)
        if len(ids) > max_length:
            if truncation == "error":
                raise ValueError(
                    f"{record.source_file}: row {record.source_row} (0-based): {len(ids)} tokens, more than "
                    f"max_length={max_length}; raise max_length or pick truncation=left|right"
                )
            cut = slice(len(ids) - max_length, None) if truncation == "left" else slice(0, max_length)
            ids, mask = ids[cut], mask[cut]
        examples.append(SFTExample(input_ids=ids, loss_mask=mask))
    return examples
