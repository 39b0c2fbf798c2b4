"""The offline math tokenizer: HF loading, id round trip, digits, chat template, determinism."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mtprl.data.tokenizer import (
    IM_END,
    IM_START,
    PAD_TOKEN,
    build_math_tokenizer,
    load_tokenizer,
    train_tokenizer,
)

TEXTS = [
    "What is 12+35?\n12+35 = 47\nAnswer: 47",
    "  leading and   inner   spaces, trailing  ",
    "tabs\tand\r\nwindows newlines\n\n\nblank lines",
    "numbers 0 9 10 2024 3.14159 -7 1,000,000 and 1e-5",
    f"{IM_START}user\nWhat is (3+4)*5-6?{IM_END}\n{IM_START}assistant\n3+4 = 7{IM_END}",
    f"{PAD_TOKEN}{PAD_TOKEN}text after pads",
    "unicode: café, naïve, ∑_{i=1}^n i = n(n+1)/2, 数学, 🙂",
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n$\\binom{6}{2}$",
    "Don't we'll they're I'M",
    "",
]

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def test_vocab_and_special_tokens(hf_tokenizer, raw_tokenizer):
    assert 300 <= raw_tokenizer.get_vocab_size() <= 600
    assert len(hf_tokenizer) == raw_tokenizer.get_vocab_size()
    assert [raw_tokenizer.token_to_id(t) for t in (PAD_TOKEN, IM_START, IM_END)] == [0, 1, 2]
    assert hf_tokenizer.eos_token == IM_END and hf_tokenizer.eos_token_id == 2
    assert hf_tokenizer.pad_token == PAD_TOKEN and hf_tokenizer.pad_token_id == 0
    assert hf_tokenizer.bos_token is None


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_after_reload_and_decode_round_trips(hf_tokenizer, raw_tokenizer, text):
    ids = raw_tokenizer.encode(text).ids
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    assert hf_tokenizer.encode(text, add_special_tokens=False) == ids
    assert raw_tokenizer.decode(ids, skip_special_tokens=False) == text
    assert hf_tokenizer.decode(ids, skip_special_tokens=False) == text
    for special in (IM_START, IM_END, PAD_TOKEN):  # special tokens are single ids, never split
        if special in text:
            assert raw_tokenizer.token_to_id(special) in ids


def test_a_qwen2_rebuild_from_vocab_and_merges_gives_the_same_ids(tokenizer_dir, raw_tokenizer, tmp_path):
    # transformers 5 rebuilds a "Qwen2Tokenizer" from vocab + merges with Qwen2's own pre-tokenizer;
    # our pipeline is Qwen2's, so ids agree even if a checkpoint re-labels the tokenizer class.
    copy = Path(shutil.copytree(tokenizer_dir, tmp_path / "qwen2"))
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "Qwen2Tokenizer"}))
    qwen2 = load_tokenizer(copy)
    assert type(qwen2).__name__ == "Qwen2Tokenizer"
    for text in TEXTS:
        assert qwen2.encode(text, add_special_tokens=False) == raw_tokenizer.encode(text).ids


def test_every_digit_is_its_own_token(raw_tokenizer):
    for text in ("12345", " 2024", "x=907", "Answer: 118"):
        enc = raw_tokenizer.encode(text)
        digits = [t for t in enc.tokens if any(ch.isdigit() for ch in t)]
        assert all(len(t) == 1 for t in digits), enc.tokens
        assert len(digits) == sum(ch.isdigit() for ch in text)


def test_chat_template(hf_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    assert hf_tokenizer.apply_chat_template(messages, tokenize=False) == expected
    assert (
        hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        == expected + "<|im_start|>assistant\n"
    )
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == hf_tokenizer.encode(expected + "<|im_start|>assistant\n", add_special_tokens=False)
    assert ids[0] == 1 and ids.count(2) == 2  # <|im_start|> first, one <|im_end|> per message


def test_common_math_words_are_single_tokens(raw_tokenizer):
    for word in ("Answer", "What", "Ġis", "Ġstep"):
        assert raw_tokenizer.token_to_id(word) is not None, word


def test_deterministic_files_in_process_and_across_processes(tmp_path):
    a = build_math_tokenizer(tmp_path / "a", num_problems=300)
    b = build_math_tokenizer(tmp_path / "b", num_problems=300)
    code = (
        "import sys; from mtprl.data.tokenizer import build_math_tokenizer; "
        "build_math_tokenizer(sys.argv[1], num_problems=300)"
    )
    repo = Path(__file__).resolve().parents[2]
    env = {"PYTHONHASHSEED": "123", "PYTHONPATH": str(repo)}  # another hash seed than this process
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "c")], check=True, env=env, cwd=repo)
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes() == (tmp_path / "c" / name).read_bytes(), name


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be at least 259"):
        train_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
