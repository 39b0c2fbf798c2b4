"""A small byte-level BPE tokenizer trained offline on synthetic math text, saved in HF format.

Pipeline (the Qwen2 one, so every loader agrees on the ids):
    normalizer     NFC
    pre-tokenizer  Split(Qwen2 regex, isolated) -> ByteLevel(use_regex=False)
                   the regex's `\\p{N}` alternative makes every digit its own pre-token, so numbers are
                   spelt digit by digit (tiny models learn carries far more easily)
    model          BPE over the 256 byte symbols, merges learnt from the corpus
    decoder        ByteLevel
Special tokens: <|endoftext|> (pad), <|im_start|>, <|im_end|> (eos). No BOS, no UNK (bytes cover all).

Saved files: tokenizer.json, tokenizer_config.json (tokenizer_class "PreTrainedTokenizerFast", eos/pad,
the ChatML chat template), special_tokens_map.json. `transformers.AutoTokenizer.from_pretrained(dir)`
loads tokenizer.json as is; and because the pipeline is Qwen2's, a loader that rebuilds a Qwen2
tokenizer from vocab + merges (transformers 5 does for tokenizer_class "Qwen2Tokenizer") gets the
same ids too. Both are tested.

Deterministic: the same texts and vocab_size give byte-identical files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from mtprl.data.synthetic import DAPO_INSTRUCTION, DAPO_REMINDER, LEVELS, make_problems, user_content

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
EOS_TOKEN = IM_END
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)  # ids 0, 1, 2

# Qwen2's pre-tokenizer split pattern (from its tokenizer.json).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML: "<|im_start|>{role}\n{content}<|im_end|>\n" per message, then "<|im_start|>assistant\n"
# when add_generation_prompt is set.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def chatml(messages: Iterable[dict[str, str]], add_generation_prompt: bool) -> str:
    """Python twin of CHAT_TEMPLATE (for tests and for text corpora)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def empty_tokenizer() -> Tokenizer:
    """An untrained tokenizer with the full pipeline (normalizer, pre-tokenizer, decoder) set."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 512) -> Tokenizer:
    """Train the byte-level BPE on `texts`; vocab = 3 special tokens + 256 bytes + merges (<= vocab_size).

    The vocabulary stops short of vocab_size when the corpus has no more pairs to merge.
    """
    min_size = len(SPECIAL_TOKENS) + 256
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be at least {min_size} (special tokens + 256 bytes), got {vocab_size}")
    tok = empty_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def tokenizer_config(model_max_length: int) -> dict[str, Any]:
    """Contents of tokenizer_config.json."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }


def save_tokenizer(tok: Tokenizer, out_dir: str | Path, *, model_max_length: int = 2048) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json to out_dir."""
    for token in SPECIAL_TOKENS:
        if tok.token_to_id(token) is None:
            raise ValueError(f"the tokenizer lacks the special token {token}; build it with train_tokenizer")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"), pretty=True)
    special_map = {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "additional_special_tokens": [IM_START, IM_END]}
    for name, content in (
        ("tokenizer_config.json", tokenizer_config(model_max_length)),
        ("special_tokens_map.json", special_map),
    ):
        (out_dir / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    return out_dir


def math_corpus(num_problems: int = 2000, *, seed: int = 0, levels: Sequence[int] = LEVELS) -> list[str]:
    """Training text: chat-rendered synthetic problems of `levels` with their solutions, plus the DAPO
    instruction."""
    texts = [
        chatml([{"role": "user", "content": user_content(p.question)}, {"role": "assistant", "content": p.solution}],
               add_generation_prompt=False)
        for p in make_problems(num_problems, seed=seed, split="train", levels=levels)
    ]
    return texts + [f"{DAPO_INSTRUCTION}\n\n{DAPO_REMINDER}", "system\nYou are a helpful assistant."]


def build_math_tokenizer(
    out_dir: str | Path, *, vocab_size: int = 512, num_problems: int = 2000, seed: int = 0,
    model_max_length: int = 2048, levels: Sequence[int] = LEVELS,
) -> Path:
    """Train on the synthetic math corpus (problems of `levels`) and save to out_dir (HF format); returns out_dir."""
    tok = train_tokenizer(math_corpus(num_problems, seed=seed, levels=levels), vocab_size=vocab_size)
    return save_tokenizer(tok, out_dir, model_max_length=model_max_length)


def load_tokenizer(path: str | Path) -> Any:
    """`transformers.AutoTokenizer.from_pretrained(path)` with a clear error for a directory without one."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {path}; build one with mtprl.data.tokenizer.build_math_tokenizer({str(path)!r})"
        )
    return load_hf_tokenizer(path)


def load_hf_tokenizer(path: str | Path, *, trust_remote_code: bool = False, source: str = "path") -> Any:
    """The tokenizer of a local HF directory (`AutoTokenizer.from_pretrained`); nothing is downloaded.

    `source` names where the path came from (a config key or CLI flag): a missing directory is a
    FileNotFoundError "{source}='{path}': no such directory" (transformers would answer with a hub repo-id message).
    AutoTokenizer also parses the directory's config.json as a transformers model config; for a model_type
    transformers does not know (MiMo's "mimo") it falls back to the base config class, which logs "You are using
    a model of type mimo to instantiate a model of type ''" and warns that `rope_scaling` is deprecated. The
    tokenizer needs none of it, so for such a model_type we pass a neutral config: tokenizer_config.json alone
    picks the tokenizer class (MiMo's names Qwen2Tokenizer). With trust_remote_code and an auto_map AutoConfig
    entry the model's own config code runs, as asked.
    """
    from transformers import AutoTokenizer, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path = Path(path)
    if not path.is_dir():
        what = "no such directory" if not path.exists() else "not a directory"
        raise FileNotFoundError(f"{source}={str(path)!r}: {what} (a local HF checkpoint or tokenizer directory is "
                                "needed; nothing is downloaded)")
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    config_file = path / "config.json"
    if config_file.is_file():
        hf_config = json.loads(config_file.read_text())
        remote = trust_remote_code and "AutoConfig" in (hf_config.get("auto_map") or {})
        if hf_config.get("model_type") not in CONFIG_MAPPING and not remote:
            kwargs["config"] = PretrainedConfig()
    return AutoTokenizer.from_pretrained(str(path), **kwargs)
