"""Synthetic arithmetic data: correct worked solutions, gradable answers, verl schema, seeding, SFT files."""

from __future__ import annotations

import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from mtprl.data.dataset import build_prompt_dataset, load_prompt_records
from mtprl.data.sft import load_sft_records, tokenize_sft
from mtprl.data.synthetic import DATA_SOURCE, LEVELS, TINY_MODEL_LEVELS, make_problem, make_problems, write_synthetic_math

EXPR = re.compile(r"^[0-9+\-*()]+$")
QUESTION_SHAPES = {
    1: re.compile(r"^What is (\d)\+(\d)\?$"),
    2: re.compile(r"^What is (\d\d)([+-])(\d\d)\?$"),
    3: re.compile(r"^What is (\d)\*(\d)\+(\d{1,2})\?$"),
    4: re.compile(r"^What is \((\d{1,2})\+(\d{1,2})\)\*(\d)-(\d{1,2})\?$"),
}


def evaluate(expr: str) -> int:
    assert EXPR.match(expr), expr  # only digits and + - * ( ): safe to evaluate
    return eval(expr)  # noqa: S307


def dapo_answer(text: str) -> str | None:
    """What the DAPO scorer extracts: the last `Answer:` line within the last 300 characters."""
    found = re.findall(r"(?i)Answer\s*:\s*([^\n]+)", text[-300:])
    return found[-1].strip() if found else None


@pytest.mark.parametrize("level", LEVELS)
def test_problems_are_correct_and_in_range(level):
    rng = np.random.default_rng(level)
    for _ in range(300):
        p = make_problem(level, rng)
        assert p.level == level
        m = QUESTION_SHAPES[level].match(p.question)
        assert m, p.question
        expr = p.question[len("What is "):-1]
        assert evaluate(expr) == p.answer >= 0
        lines = p.solution.split("\n")
        assert lines[-1] == f"Answer: {p.answer}"
        assert len(lines) == {1: 2, 2: 2, 3: 3, 4: 4}[level]
        for step in lines[:-1]:  # every step "lhs = rhs" is true arithmetic
            lhs, rhs = step.split(" = ")
            assert evaluate(lhs) == int(rhs), step
        assert lines[-2].endswith(f" = {p.answer}")
        assert dapo_answer(p.solution) == str(p.answer)
        if level == 2 and m.group(2) == "-":
            assert int(m.group(1)) >= int(m.group(3))


def test_hand_checked_levels():
    # level 4 with fixed numbers through the same generator path: (12+7)*3-5
    class FixedRng:
        def __init__(self, values):
            self.values = list(values)

        def integers(self, low, high):
            value = self.values.pop(0)
            assert low <= value < high
            return value

    p = make_problem(4, FixedRng([12, 7, 3, 5]))
    assert p.question == "What is (12+7)*3-5?"
    assert p.solution == "12+7 = 19\n19*3 = 57\n57-5 = 52\nAnswer: 52"
    p = make_problem(2, FixedRng([12, 47, 1]))  # subtraction swaps so the result is >= 0
    assert (p.question, p.solution, p.answer) == ("What is 47-12?", "47-12 = 35\nAnswer: 35", 35)
    p = make_problem(3, FixedRng([6, 7, 15]))
    assert p.solution == "6*7 = 42\n42+15 = 57\nAnswer: 57"


def test_levels_round_robin_and_bad_arguments():
    assert [p.level for p in make_problems(8, seed=0, split="train", levels=(2, 4))] == [2, 4] * 4
    weighted = make_problems(8, seed=0, split="train", levels=TINY_MODEL_LEVELS)
    assert [p.level for p in weighted] == [1, 1, 1, 2] * 2
    with pytest.raises(ValueError, match="levels must be"):
        make_problems(4, seed=0, split="train", levels=(5,))
    with pytest.raises(ValueError, match="split must be"):
        make_problems(4, seed=0, split="test")
    with pytest.raises(ValueError, match="unknown level"):
        make_problem(0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="must be positive"):
        write_synthetic_math("unused", num_train=0, num_val=1, seed=0)


def test_written_files_load_and_grade(tmp_path):
    paths = write_synthetic_math(tmp_path, num_train=40, num_val=12, seed=3)
    train = load_prompt_records(paths.train)
    val = load_prompt_records(paths.val)
    assert len(train) == 40 and len(val) == 12
    for split, records in (("train", train), ("val", val)):
        for i, r in enumerate(records):
            assert r.data_source == DATA_SOURCE and r.ability == "MATH" and r.reward_style == "rule"
            info = r.extra_info
            assert info["index"] == i and info["split"] == split and info["level"] == LEVELS[i % 4]
            assert r.messages[0]["role"] == "user" and r.messages[0]["content"].endswith(info["question"])
            assert "Answer:" in r.messages[0]["content"]
            assert r.ground_truth == str(evaluate(info["question"][len("What is "):-1]))
            assert dapo_answer(info["solution"]) == r.ground_truth


def test_prompts_are_short_for_a_tiny_model(tmp_path, hf_tokenizer):
    paths = write_synthetic_math(tmp_path, num_train=200, num_val=8, seed=0)
    data = build_prompt_dataset(paths.train, hf_tokenizer, max_prompt_length=48)
    assert data.num_truncated == 0 and len(data) == 200
    lengths = [len(p.prompt_ids) for p in data.prompts]
    assert 24 <= min(lengths) and max(lengths) <= 48


def test_seeded_and_independent_of_num_val(tmp_path):
    a = write_synthetic_math(tmp_path / "a", num_train=30, num_val=5, seed=11)
    b = write_synthetic_math(tmp_path / "b", num_train=30, num_val=9, seed=11)
    c = write_synthetic_math(tmp_path / "c", num_train=30, num_val=5, seed=12)
    assert pq.read_table(a.train).equals(pq.read_table(b.train))
    assert pq.read_table(a.sft_train).equals(pq.read_table(b.sft_train))
    assert pq.read_table(a.val).to_pylist() == pq.read_table(b.val).to_pylist()[:5]
    assert not pq.read_table(a.train).equals(pq.read_table(c.train))
    questions = [r["extra_info"]["question"] for r in pq.read_table(a.train).to_pylist()]
    val_questions = [r["extra_info"]["question"] for r in pq.read_table(a.val).to_pylist()]
    assert questions[:5] != val_questions  # the splits draw from different streams


def test_sft_files_follow_verl_and_tokenize(tmp_path, hf_tokenizer, raw_tokenizer):
    paths = write_synthetic_math(tmp_path, num_train=16, num_val=4, seed=0)
    table = pq.read_table(paths.sft_train)
    assert {"prompt", "response", "messages"} <= set(table.column_names)
    rows = table.to_pylist()
    rl_rows = pq.read_table(paths.train).to_pylist()
    for row, rl in zip(rows, rl_rows):  # verl SFTDataset: prompt is the user turn as a string
        assert row["prompt"] == rl["prompt"][0]["content"]
        assert row["response"] == rl["extra_info"]["solution"]
        assert row["messages"] == [
            {"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}
        ]
    records = load_sft_records(paths.sft_train)
    examples = tokenize_sft(records, hf_tokenizer, max_length=128)
    for ex, row in zip(examples, rows):
        target = [t for t, m in zip(ex.input_ids, ex.loss_mask) if m]
        assert raw_tokenizer.decode(target, skip_special_tokens=False) == row["response"] + "<|im_end|>"
        assert ex.loss_mask == sorted(ex.loss_mask)  # prompt zeros, then response ones


def test_sft_prose_fraction_marks_only_sft_rows(tmp_path):
    import pyarrow.parquet as pq

    from mtprl.data.synthetic import write_synthetic_math
    from mtprl.reward.math_dapo import compute_score

    paths = write_synthetic_math(tmp_path, num_train=400, num_val=10, seed=0, levels=(1, 2), sft_prose_frac=0.5)
    sft = pq.read_table(paths.sft_train).to_pylist()
    prose = [r for r in sft if "Answer:" not in r["response"]]
    assert 150 < len(prose) < 250  # about half
    for r in prose[:20]:
        truth = r["extra_info"]["ground_truth"]
        assert r["response"].endswith(f"The answer is {truth}.")
        assert compute_score(r["response"], truth)["score"] == -1.0  # correct, but not gradable
    assert all("Answer:" in r["extra_info"]["solution"] for r in pq.read_table(paths.train).to_pylist())
    again = write_synthetic_math(tmp_path / "again", num_train=400, num_val=10, seed=0, levels=(1, 2), sft_prose_frac=0.5)
    assert pq.read_table(again.sft_train).to_pylist() == sft
