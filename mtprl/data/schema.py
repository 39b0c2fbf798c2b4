"""Row schema of RL prompt parquet files, in verl's layout.

One row of a verl RL parquet file (DAPO-Math-17k, AIME-2024, our synthetic math):

    data_source   str                     which reward function scores it ("math_dapo", ...)
    prompt        list[{role, content}]   chat messages; the column name is `data.prompt_key`
    ability       str                     free-form tag ("MATH"); optional column
    reward_model  {style, ground_truth}   ground_truth is the reference answer (str)
    extra_info    dict                    anything else (index, level, solution, ...); optional column

`parse_row` turns one such row into a typed `PromptRecord` or raises `MalformedRowError` naming
the file, the row and the field. Nothing here reads files; see `dataset.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

VALID_ROLES = ("system", "user", "assistant")


class MalformedRowError(ValueError):
    """A parquet row that does not follow the schema; names the file, 0-based row and field."""

    def __init__(self, path: str, row: int, field_name: str, problem: str):
        self.path = path
        self.row = row
        self.field_name = field_name
        super().__init__(f"{path}: row {row} (0-based): field '{field_name}': {problem}")


@dataclass(frozen=True)
class PromptRecord:
    """One RL prompt, validated.

    index: position in the loaded data set (0-based, over all files in the order given).
    data_source: selects the reward function and groups validation metrics (`val-core/{data_source}/...`).
    messages: chat messages, each {"role": one of VALID_ROLES, "content": str}; at least one.
    ground_truth: reference answer given to the scorer.
    ability: free-form tag ("" when the file has no `ability` column).
    reward_style: `reward_model.style` ("" when absent), e.g. "rule" or "rule-lighteval/MATH_v2".
    extra_info: the row's `extra_info` dict ({} when absent); not interpreted here.
    source_file / source_row: where the row came from, for error messages.
    """

    index: int
    data_source: str
    messages: tuple[dict[str, str], ...]
    ground_truth: str
    ability: str = ""
    reward_style: str = ""
    extra_info: dict[str, Any] = field(default_factory=dict)
    source_file: str = ""
    source_row: int = -1


def parse_messages(value: Any, *, path: str, row: int, field_name: str) -> tuple[dict[str, str], ...]:
    """Validate a chat-message list: non-empty, each item {role in VALID_ROLES, content: str}."""
    if isinstance(value, str):
        raise MalformedRowError(
            path, row, field_name,
            "expected a list of chat messages [{'role': ..., 'content': ...}], got a plain string; "
            "wrap it as [{'role': 'user', 'content': text}]",
        )
    if not isinstance(value, (list, tuple)):
        raise MalformedRowError(
            path, row, field_name, f"expected a list of chat messages, got {type(value).__name__}"
        )
    if len(value) == 0:
        raise MalformedRowError(path, row, field_name, "the message list is empty")
    messages = []
    for k, msg in enumerate(value):
        where = f"{field_name}[{k}]"
        if not isinstance(msg, dict):
            raise MalformedRowError(
                path, row, where, f"expected a {{role, content}} dict, got {type(msg).__name__}"
            )
        role, content = msg.get("role"), msg.get("content")
        if role not in VALID_ROLES:
            raise MalformedRowError(
                path, row, f"{where}.role", f"role {role!r} is not one of {', '.join(VALID_ROLES)}"
            )
        if not isinstance(content, str):
            raise MalformedRowError(
                path, row, f"{where}.content", f"expected a string, got {type(content).__name__}"
            )
        messages.append({"role": role, "content": content})
    return tuple(messages)


def _optional_str(row: dict, key: str, *, path: str, row_idx: int) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MalformedRowError(path, row_idx, key, f"expected a string, got {type(value).__name__}")
    return value


def parse_row(
    row: dict[str, Any],
    *,
    index: int,
    path: str,
    row_idx: int,
    prompt_key: str = "prompt",
    reward_fn_key: str = "data_source",
) -> PromptRecord:
    """Validate one parquet row (a dict from pyarrow's `to_pylist`) into a PromptRecord.

    prompt_key / reward_fn_key: column names, as verl's `data.prompt_key` / `data.reward_fn_key`.
    Raises MalformedRowError (a ValueError) naming path, row_idx and the field.
    """
    data_source = row.get(reward_fn_key)
    if not isinstance(data_source, str) or not data_source:
        got = "missing" if data_source is None else repr(data_source)
        raise MalformedRowError(path, row_idx, reward_fn_key, f"expected a non-empty string, got {got}")

    if row.get(prompt_key) is None:
        raise MalformedRowError(path, row_idx, prompt_key, "missing (null) prompt")
    messages = parse_messages(row[prompt_key], path=path, row=row_idx, field_name=prompt_key)

    reward_model = row.get("reward_model")
    if not isinstance(reward_model, dict):
        got = "missing" if reward_model is None else type(reward_model).__name__
        raise MalformedRowError(
            path, row_idx, "reward_model", f"expected a {{style, ground_truth}} dict, got {got}"
        )
    ground_truth = reward_model.get("ground_truth")
    if not isinstance(ground_truth, str):
        got = "missing" if ground_truth is None else type(ground_truth).__name__
        raise MalformedRowError(
            path, row_idx, "reward_model.ground_truth",
            f"expected a string, got {got}; store the reference answer as text",
        )
    style = reward_model.get("style")
    if style is not None and not isinstance(style, str):
        raise MalformedRowError(
            path, row_idx, "reward_model.style", f"expected a string, got {type(style).__name__}"
        )

    extra_info = row.get("extra_info")
    if extra_info is None:
        extra_info = {}
    if not isinstance(extra_info, dict):
        raise MalformedRowError(
            path, row_idx, "extra_info", f"expected a dict, got {type(extra_info).__name__}"
        )

    return PromptRecord(
        index=index,
        data_source=data_source,
        messages=messages,
        ground_truth=ground_truth,
        ability=_optional_str(row, "ability", path=path, row_idx=row_idx),
        reward_style=style or "",
        extra_info=dict(extra_info),
        source_file=path,
        source_row=row_idx,
    )


def record_to_row(record: PromptRecord, *, prompt_key: str = "prompt") -> dict[str, Any]:
    """The inverse of `parse_row`: a dict in verl's column layout, ready for pyarrow."""
    return {
        "data_source": record.data_source,
        prompt_key: [dict(m) for m in record.messages],
        "ability": record.ability,
        "reward_model": {"ground_truth": record.ground_truth, "style": record.reward_style},
        "extra_info": dict(record.extra_info),
    }
