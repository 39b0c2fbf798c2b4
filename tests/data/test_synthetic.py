"""Synthetic arithmetic data: correct worked solutions, gradable answers, verl schema, seeding, SFT files."""

from __future__ import annotations

import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from mtprl.data.dataset import build_prompt_dataset, load_prompt_records
from mtprl.data.sft import load_sft_records, tokenize_sft
from mtprl.data.synthetic import (COLUMN_NAMES, DATA_SOURCE, LEVELS, TINY_MODEL_LEVELS, WORKED_LEVELS, WORKED_SHAPES, held_out,
                                  make_problem, make_problems, write_synthetic_math)

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
        make_problems(4, seed=0, split="train", levels=(17,))
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


# ----- worked levels: column arithmetic written out --------------------------------------------------------------
LINE = re.compile(r"^([a-z0-9+ -]+): (.+?)(?:, (carry|borrow) (\d))?, so far (\d+)$")


def _check_worked_line(step: str, op: str, carry_in: int) -> tuple[int, int]:
    """The arithmetic of one column as written; returns (digit or last sum written, carry / borrow out)."""
    if op == "+":  # "d1+d2+...+carry=total"
        lhs, total = step.split("=")
        terms = [int(x) for x in lhs.split("+")]
        assert terms[-1] == carry_in and sum(terms) == int(total), step
        return int(total), int(total) // 10
    if op == "*":  # "x*d=p, p+carry=total"
        prod, add = step.split(", ")
        (x, d), p = prod.split("=")[0].split("*"), int(prod.split("=")[1])
        assert int(x) * int(d) == p and add == f"{p}+{carry_in}={p + carry_in}", step
        return p + carry_in, (p + carry_in) // 10
    # "x-borrow-y=v" or "x-borrow-y<0, 1x-borrow-y=v+10"
    x, b, y = (int(v) for v in step.split("<")[0].split("=")[0].split("-"))
    assert b == carry_in, step
    value = x - b - y
    if value < 0:
        assert step == f"{x}-{b}-{y}<0, 1{x}-{b}-{y}={value + 10}", step
        return value + 10, 1
    assert step == f"{x}-{b}-{y}={value}", step
    return value, 0


@pytest.mark.parametrize("level", WORKED_LEVELS)
def test_worked_solutions_are_correct_arithmetic(level):
    op, count, digits = WORKED_SHAPES[level]
    rng = np.random.default_rng(level)
    for _ in range(200):
        p = make_problem(level, rng)
        expr = p.question[len("What is "):-1]
        operands = re.split(r"[+\-*]", expr)
        assert len(operands) == max(count, 2 if op != "+" else count)
        assert all(len(x) == digits for x in (operands if op != "*" else operands[:1])), p.question
        assert evaluate(expr) == p.answer >= 0
        lines = p.solution.split("\n")
        assert lines[-1] == f"Answer: {p.answer}" and dapo_answer(p.solution) == str(p.answer)
        assert len(lines) == digits + 1  # one line per column
        carry, so_far = 0, ""
        for k, line in enumerate(lines[:-1]):
            m = LINE.match(line)
            assert m, line
            if op == "+":  # a sum's line starts with the columns still to add and the carry coming in
                assert m.group(1) == "+".join(x[:digits - k] for x in operands) + f" carry {carry}", line
            else:
                assert m.group(1) == COLUMN_NAMES[k]
            value, carry_out = _check_worked_line(m.group(2), op, carry)
            last = k == digits - 1
            assert (m.group(3) is None) == last, line  # the last column carries nothing on
            so_far = f"{value if last and op != '-' else value % 10}{so_far}"
            assert m.group(5) == so_far, line
            if not last:
                assert int(m.group(4)) == carry_out, line
            carry = carry_out
        assert int(so_far) == p.answer


def test_worked_levels_by_hand():
    class FixedRng:
        def __init__(self, values):
            self.values = list(values)

        def integers(self, low, high):
            value = self.values.pop(0)
            assert low <= value < high
            return value

    assert make_problem(7, FixedRng([472, 385])).solution == (
        "472+385 carry 0: 2+5+0=7, carry 0, so far 7\n47+38 carry 0: 7+8+0=15, carry 1, so far 57\n"
        "4+3 carry 1: 4+3+1=8, so far 857\nAnswer: 857")
    assert make_problem(13, FixedRng([158, 403])).solution == (  # sorted: 403-158
        "units: 3-0-8<0, 13-0-8=5, borrow 1, so far 5\ntens: 0-1-5<0, 10-1-5=4, borrow 1, so far 45\n"
        "hundreds: 4-1-1=2, so far 245\nAnswer: 245")
    p = make_problem(14, FixedRng([347, 8]))
    assert (p.question, p.answer) == ("What is 347*8?", 2776)
    assert p.solution.split("\n")[1] == "tens: 4*8=32, 32+5=37, carry 3, so far 76"
    p = make_problem(5, FixedRng([9, 8]))
    assert p.solution == "9+8 carry 0: 9+8+0=17, so far 17\nAnswer: 17"
    p = make_problem(16, FixedRng([1000, 2000, 3000, 9999]))
    assert p.solution.split("\n")[0] == "1000+2000+3000+9999 carry 0: 0+0+0+9+0=9, carry 0, so far 9"


def test_disjoint_splits_share_no_question(tmp_path):
    levels = (5, 6, 8, 12)
    train = make_problems(2000, seed=3, split="train", levels=levels, disjoint=True)
    val = make_problems(200, seed=3, split="val", levels=levels, disjoint=True)
    assert not {p.question for p in train} & {p.question for p in val}
    assert all(held_out(p.question, 3) for p in val) and not any(held_out(p.question, 3) for p in train)
    # level 5 has 100 problems: about one in 8 is held out, and both splits still draw it
    assert 5 <= sum(held_out(f"What is {a}+{b}?", 3) for a in range(10) for b in range(10)) <= 25
    assert {p.level for p in val} == set(levels)
    paths = write_synthetic_math(tmp_path, num_train=300, num_val=40, seed=3, levels=levels, disjoint=True)
    rows = {split: [r["extra_info"]["question"] for r in pq.read_table(path).to_pylist()]
            for split, path in (("train", paths.train), ("val", paths.val))}
    assert not set(rows["train"]) & set(rows["val"])
    # without `disjoint` the streams are the same as before: the val rows are a prefix-stable draw of their own
    plain = make_problems(40, seed=3, split="val", levels=levels)
    assert [p.question for p in plain] == [p.question for p in make_problems(60, seed=3, split="val", levels=levels)][:40]


def test_worked_lengths_run_from_about_25_to_300_tokens(tmp_path):
    from mtprl.data import build_math_tokenizer, load_tokenizer

    tok = load_tokenizer(build_math_tokenizer(tmp_path / "tok", vocab_size=384, num_problems=600, seed=0,
                                              levels=WORKED_LEVELS))
    lengths = {}
    for level in WORKED_LEVELS:
        problems = make_problems(50, seed=0, split="train", levels=(level,))
        lengths[level] = [len(tok(p.solution)["input_ids"]) + 1 for p in problems]  # + eos
    assert 15 <= min(lengths[5]) and max(lengths[5]) <= 30
    assert 190 <= min(lengths[10]) and max(lengths[10]) <= 220  # 6 digits: ~200 tokens (8 digits: ~300)
    means = [sum(lengths[level]) / len(lengths[level]) for level in range(5, 13)]
    assert all(a < b for a, b in zip(means, means[1:]))  # one more digit, one more line


def test_careless_teacher_by_hand():
    """A slip writes carry 0 where the column carries 1, and the columns after it follow from the slip."""
    from mtprl.data.synthetic import MathProblem, careless_solution

    correct = "478+385 carry 0: 8+5+0=13, carry 1, so far 3\n47+38 carry 1: 7+8+1=16, carry 1, so far 63\n" \
              "4+3 carry 1: 4+3+1=8, so far 863\nAnswer: 863"
    problem = MathProblem(7, "What is 478+385?", correct, 863)
    slipped = careless_solution(problem, np.random.default_rng(0), 1.0).split("\n")
    assert slipped == ["478+385 carry 0: 8+5+0=13, carry 0, so far 3",  # slip: 13 carries 1
                       "47+38 carry 0: 7+8+0=15, carry 0, so far 53",  # slip again
                       "4+3 carry 0: 4+3+0=7, so far 753",
                       "Answer: 753"]
    assert careless_solution(problem, np.random.default_rng(0), 0.0) == problem.solution
    product = make_problem(14, np.random.default_rng(0))  # only sums slip
    assert careless_solution(product, np.random.default_rng(0), 1.0) == product.solution


def test_sft_slip_fraction_only_in_sft_rows(tmp_path):
    """sft_slip_frac: about that share of carries dropped in the SFT responses (each wrong answer explained by its
    slips); RL rows and their ground truths untouched; seeded."""
    paths = write_synthetic_math(tmp_path, num_train=600, num_val=10, seed=0, levels=(6, 7), sft_slip_frac=0.4)
    sft, rl = pq.read_table(paths.sft_train).to_pylist(), pq.read_table(paths.train).to_pylist()
    carries = slips = wrong = 0
    for s, r in zip(sft, rl):
        assert s["extra_info"]["ground_truth"] == r["reward_model"]["ground_truth"]
        assert r["extra_info"]["solution"].endswith(f"Answer: {r['reward_model']['ground_truth']}")  # RL: correct
        for line in s["response"].split("\n")[:-2]:  # the columns that may carry (not the last one)
            total = int(re.search(r"=(\d+),", line).group(1))
            if total >= 10:
                carries += 1
                slips += ", carry 0," in line
        wrong += dapo_answer(s["response"]) != s["extra_info"]["ground_truth"]
    assert 0.33 < slips / carries < 0.47 and wrong > 100
    again = write_synthetic_math(tmp_path / "again", num_train=600, num_val=10, seed=0, levels=(6, 7), sft_slip_frac=0.4)
    assert pq.read_table(again.sft_train).to_pylist() == sft
    with pytest.raises(ValueError, match="sft_slip_frac"):
        write_synthetic_math(tmp_path / "bad", num_train=4, num_val=2, seed=0, sft_slip_frac=1.5)
