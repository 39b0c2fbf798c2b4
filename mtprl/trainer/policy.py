"""Loading the policy and its tokenizer from ``actor_rollout_ref.model`` and choosing device / dtype.

Precision (``actor_rollout_ref.model.dtype``). ``float32``: everything in fp32. ``bfloat16``: mixed precision,
as verl's FSDP default (``mixed_precision.param_dtype=bf16``, fp32 master weights) and TRL / HF's ``bf16=True``
(autocast over fp32 weights): the weights, their gradients and the optimizer state stay fp32; the trainer's
forwards and backwards (update, old-log-prob and reference forwards, SFT) run under
``torch.autocast(device_type, dtype=torch.bfloat16)`` (:func:`compute_autocast`), so matmuls and attention
run in bf16 while the embedding, the norms' statistics and the residual stream stay fp32; every log-softmax
(sampled tokens' log-probs, entropy, the PPO ratio, the MTP loss) and every loss is taken in fp32. On one
process the rollout engine shares the fp32 weights and samples in fp32 (its packed path and CPU kernels are
fp32). Multi-rank runs get the same split through FSDP2's MixedPrecisionPolicy, their engine a copy in the
configured dtype. ``float16`` is refused: it needs loss scaling, which mtprl does not do.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from mtprl.config.loader import ConfigError
from mtprl.config.schema import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# override_config keys that name dropout probabilities: our blocks have no dropout, so 0 is what we run.
_DROPOUT_KEYS = ("attention_dropout", "embd_pdrop", "resid_pdrop", "hidden_dropout", "dropout")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def compute_dtype(model_cfg: ModelConfig) -> torch.dtype:
    """The dtype the trainer's forwards and backwards compute in (``model.dtype``); weights stay fp32."""
    return DTYPES[model_cfg.dtype]


def check_precision(model_cfg: ModelConfig, device: torch.device) -> None:
    """A ConfigError for a ``model.dtype`` this device cannot train in (never a silent fall-back to fp32); the
    dtype itself (float16 refused, unknown names) is checked with the rest of the config (mtprl.config.validate)."""
    key = f"actor_rollout_ref.model.dtype={model_cfg.dtype}"
    if model_cfg.dtype == "float32":
        return
    if not torch.amp.is_autocast_available(device.type):
        raise ConfigError(f"{key}: torch has no autocast for device {device.type!r}; use float32")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ConfigError(f"{key}: this GPU has no bf16 support; use float32")


def compute_autocast(model_cfg: ModelConfig, device: torch.device):
    """The context the trainer's forwards run in: nothing for fp32, bf16 autocast for ``bfloat16``. Run the
    forward inside it and the losses / log-softmax outside (they cast the logits to fp32); backward needs no
    context (autocast's casts are recorded in the graph)."""
    dtype = compute_dtype(model_cfg)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def policy_config(model_cfg: ModelConfig, device: torch.device):
    """The policy's model config (``mtprl.model.ModelConfig``) from ``actor_rollout_ref.model``, its MTP layers
    as ``model.mtp`` asks, after the checks every load makes (override_config, path, precision on ``device``,
    MTP layers present); ConfigErrors name the key. Nothing is loaded.

    mtp.enable: the checkpoint's MTP layers, or ``mtp.num_layers`` of them (fresh ones initialised as
    documented in ``mtprl.model.hf_io.checkpoint``); a checkpoint without MTP layers needs ``num_layers``.
    Without mtp.enable the checkpoint's MTP layers are still loaded (so a save loses nothing) but unused.
    """
    from mtprl.model.hf_io.checkpoint import load_config

    for key, value in model_cfg.override_config.items():
        if key in _DROPOUT_KEYS and float(value) == 0.0:
            continue
        raise ConfigError(
            f"actor_rollout_ref.model.override_config.{key}={value!r} is not supported: only dropout "
            "probabilities of 0 (what mtprl's blocks do) can be overridden"
        )
    if not model_cfg.path:
        raise ConfigError("actor_rollout_ref.model.path is empty: give a local HF checkpoint directory")
    if not Path(model_cfg.path).is_dir():
        raise ConfigError(f"actor_rollout_ref.model.path={model_cfg.path!r}: no such directory (a local HF checkpoint "
                          "directory is needed; nothing is downloaded)")
    check_precision(model_cfg, device)
    mtp = model_cfg.mtp
    config = load_config(model_cfg.path, mtp.num_layers if mtp.enable else None)
    if mtp.enable and config.num_mtp_layers == 0:
        raise ConfigError(
            f"actor_rollout_ref.model.mtp.enable=True but {model_cfg.path} has no MTP layers; set "
            "actor_rollout_ref.model.mtp.num_layers=D to create D fresh ones (then warm them up with `mtprl sft "
            "sft.freeze_trunk=True`)"
        )
    return config


def load_policy(model_cfg: ModelConfig, device: torch.device, dtype: torch.dtype = torch.float32):
    """The whole policy on ``device`` (see :func:`policy_config`), its weights in ``dtype``: fp32 for the trainer
    whatever ``model.dtype`` (the compute dtype: see the module docstring); the rollout engine's copy of a
    multi-rank run is read in the compute dtype directly. Sharded loading for several ranks:
    :func:`mtprl.distributed.loading.load_sharded_policy`."""
    from mtprl.model import from_pretrained

    config = policy_config(model_cfg, device)
    model = from_pretrained(model_cfg.path, dtype=dtype, device=device, num_mtp_layers=config.num_mtp_layers)
    if model_cfg.enable_gradient_checkpointing:
        apply_gradient_checkpointing(model)
    return model


def load_policy_tokenizer(model_cfg: ModelConfig):
    """The tokenizer of ``model.tokenizer_path`` (default ``model.path``); errors name the key."""
    from mtprl.data.tokenizer import load_hf_tokenizer

    key = "actor_rollout_ref.model." + ("tokenizer_path" if model_cfg.tokenizer_path else "path")
    path = model_cfg.tokenizer_path or model_cfg.path
    if not path:
        raise ConfigError(f"{key} is empty: give a local HF checkpoint directory")
    try:
        tok = load_hf_tokenizer(path, trust_remote_code=model_cfg.trust_remote_code, source=key)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"no tokenizer could be loaded from {key}={path!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def eos_token_ids(model_dir, tokenizer) -> tuple[int, ...]:
    """The ids generation stops at, as verl's rollouts (vLLM / SGLang) take them: the tokenizer's eos_token_id,
    then ``eos_token_id`` of the model directory's config.json and generation_config.json (each an int or a
    list), in that order, without repeats. (Qwen / MiMo: the tokenizer's eos may be <|endoftext|> while the
    generation config adds <|im_end|>, the end of a chat turn.) A missing file or key adds nothing."""
    ids: list[int] = []

    def add(value, source: str) -> None:
        for v in value if isinstance(value, list) else [value]:
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{source}: eos_token_id must be a token id (int >= 0) or a list of them, "
                                  f"got {value!r}")
            if v not in ids:
                ids.append(v)

    add(tokenizer.eos_token_id, "the tokenizer")
    for name in ("config.json", "generation_config.json") if model_dir else ():
        path = Path(model_dir) / name
        if path.is_file():
            try:
                fields = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON: {e}") from None
            add(fields.get("eos_token_id") if isinstance(fields, dict) else None, str(path))
    return tuple(ids)


class _CheckpointedForward:
    """Mixin: the block's forward runs under torch.utils.checkpoint when gradients are on."""

    def forward(self, *args, **kwargs):
        from torch.utils.checkpoint import checkpoint

        if not torch.is_grad_enabled():
            return super().forward(*args, **kwargs)
        return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)


def apply_gradient_checkpointing(model) -> None:
    """Recompute each decoder block's activations in the backward pass instead of storing them
    (``model.enable_gradient_checkpointing``), applied from outside the model: every block of the trunk and
    of the MTP layers becomes a subclass with a checkpointed forward. Parameter names and deep copies are
    unaffected, and gradients are unchanged (tested)."""
    blocks = list(model.layers) + [m.block for m in model.mtp_layers]
    for block in blocks:
        cls = type(block)
        if issubclass(cls, _CheckpointedForward):
            continue
        block.__class__ = type(f"Checkpointed{cls.__name__}", (_CheckpointedForward, cls), {})


def set_trainable(model, *, trunk: bool, mtp: bool) -> None:
    """requires_grad per part: the MTP layers vs everything else (embedding, blocks, norm, head)."""
    for name, p in model.named_parameters():
        p.requires_grad_(mtp if name.startswith("mtp_layers.") else trunk)


def init_policy_checkpoint(out_dir, model_config, tokenizer_dir, *, seed: int):
    """Write a randomly initialised policy (``mtprl.model.ModelConfig``) as an HF directory with the
    tokenizer files of ``tokenizer_dir``; the vocabulary must cover the tokenizer."""
    from mtprl.model import CausalLM

    tok_vocab = len(load_policy_tokenizer(ModelConfig(path=str(tokenizer_dir))))
    if model_config.vocab_size < tok_vocab:
        raise ValueError(f"vocab_size={model_config.vocab_size} is smaller than the tokenizer's {tok_vocab} tokens")
    torch.manual_seed(seed)
    model = CausalLM(model_config)
    model.source_dir = str(tokenizer_dir)  # save_pretrained copies the tokenizer files from here
    model.save_pretrained(str(out_dir))
    return out_dir
