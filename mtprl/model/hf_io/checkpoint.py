"""Load and save HF checkpoint directories (config.json + safetensors, single file or sharded with an index).

Fresh MTP layers. When `num_mtp_layers` asks for more MTP layers than the checkpoint holds, each missing layer
is initialised as a warm start rather than randomly:
  * if the checkpoint has MTP layers, the new layer is a copy of its last MTP layer (MiMo itself reuses its one
    MTP layer for several draft steps, so a trained layer is a good prior for the next depth);
  * otherwise: block = copy of the LAST trunk layer, final_layernorm = copy of the trunk's final norm,
    hidden_layernorm and token_layernorm = ones, input_proj = [I ; 0] (hidden half identity, token half zero).
    Why: at init the layer computes "one more pass of the last trunk layer over the normalised final hidden
    state, then the trunk's final norm", so its logits are well-formed lm_head outputs close to the trunk's own
    next-token distribution (neighbouring tokens are correlated) instead of random noise, and no random
    projection destroys the hidden state. The token half starts at zero but still gets gradient (its input
    Emb(t_{i+k}) is non-zero), so training learns how to use the lookahead token from the first step.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mtprl.model.causal_lm import CausalLM
from mtprl.model.config import ModelConfig
from mtprl.model.hf_io.config_map import config_from_hf, config_to_hf
from mtprl.model.hf_io.keymaps import IGNORED_HF_KEYS, from_hf_name, to_hf_name
from mtprl.model.trunk import rope_inv_freq

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def read_hf_config(path: str | os.PathLike) -> dict:
    """The dict of path/config.json (ValueError if the directory or file is missing)."""
    path = Path(path)
    if not path.is_dir():
        what = "no such directory" if not path.exists() else "not a directory"
        raise ValueError(f"{str(path)!r}: {what}; pass a local HF checkpoint directory "
                         "(config.json + *.safetensors); nothing is downloaded")
    if not (path / "config.json").is_file():
        raise ValueError(f"{str(path)!r} has no config.json")
    return json.loads((path / "config.json").read_text())


def _checkpoint_files(path: Path) -> list[Path]:
    if (path / INDEX_FILE).is_file():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    raise ValueError(f"{str(path)!r} has neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors checkpoints are "
                     "supported; convert *.bin with transformers' save_pretrained(safe_serialization=True))")


def _load_state_dict(path: Path, num_mtp_layers: int, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Our-named tensors from all safetensors files, cast to dtype on device; MTP layers >= num_mtp_layers dropped."""
    state: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for file in _checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for hf_name in f.keys():
                ours = from_hf_name(hf_name)
                if ours is None:
                    if not IGNORED_HF_KEYS.match(hf_name):
                        unknown.append(hf_name)
                    continue
                if ours.startswith("mtp_layers.") and int(ours.split(".")[1]) >= num_mtp_layers:
                    continue
                state[ours] = f.get_tensor(hf_name).to(device=device, dtype=dtype)
    if unknown:
        raise ValueError(f"checkpoint {str(path)!r} has keys this model does not know: {unknown[:8]}"
                         f"{' ...' if len(unknown) > 8 else ''}")
    return state


def _fresh_mtp_params(state: dict[str, torch.Tensor], config: ModelConfig, k: int) -> dict[str, torch.Tensor]:
    """Warm-start parameters of MTP layer k (see module docstring)."""
    if k > 0 and f"mtp_layers.{k - 1}.input_proj.weight" in state:
        prefix = f"mtp_layers.{k - 1}."
        return {f"mtp_layers.{k}.{n[len(prefix):]}": t.clone() for n, t in state.items() if n.startswith(prefix)}
    last = f"layers.{config.num_hidden_layers - 1}."
    ref = state["norm.weight"]
    h = config.hidden_size
    params = {f"mtp_layers.{k}.block.{n[len(last):]}": t.clone() for n, t in state.items() if n.startswith(last)}
    proj = torch.zeros(h, 2 * h, dtype=ref.dtype, device=ref.device)
    proj[:, :h] = torch.eye(h, dtype=ref.dtype, device=ref.device)
    params.update({
        f"mtp_layers.{k}.input_proj.weight": proj,
        f"mtp_layers.{k}.hidden_layernorm.weight": torch.ones_like(ref),
        f"mtp_layers.{k}.token_layernorm.weight": torch.ones_like(ref),
        f"mtp_layers.{k}.final_layernorm.weight": ref.clone(),
    })
    return params


def from_pretrained(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device="cpu",
                    num_mtp_layers: int | None = None) -> CausalLM:
    """Load an HF directory of a qwen2 / llama / qwen3 / mimo model.

    num_mtp_layers: None -> the checkpoint's own `num_nextn_predict_layers` (0 if absent); D -> exactly D MTP
    layers: extra checkpoint layers are dropped, missing ones freshly initialised (module docstring).
    Parameters are created directly from the checkpoint tensors (no random init of a large model).
    """
    path = Path(path)
    config = config_from_hf(read_hf_config(path))
    if num_mtp_layers is not None:
        if num_mtp_layers < 0:
            raise ValueError(f"num_mtp_layers must be >= 0, got {num_mtp_layers}")
        config = config.replace(num_mtp_layers=num_mtp_layers)
    state = _load_state_dict(path, config.num_mtp_layers, dtype, device)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # some tied checkpoints store the head too; the embedding is the head
    for k in range(config.num_mtp_layers):
        if f"mtp_layers.{k}.input_proj.weight" not in state:
            state.update(_fresh_mtp_params(state, config, k))
    with torch.device("meta"):
        model = CausalLM(config)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(path)!r} does not match its config: missing {sorted(missing)[:8]}, "
                         f"unexpected {sorted(unexpected)[:8]}")
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = rope_inv_freq(config).to(device)
    model.source_dir = str(path.resolve())
    return model.eval()


def _shards(state: dict[str, torch.Tensor], max_shard_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if max_shard_bytes is None:
        return [state]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _copy_side_files(source: str | None, target: Path, hf_config: dict) -> None:
    """Tokenizer files, generation config and remote-code modules (auto_map) of the source directory."""
    if source is None or not Path(source).is_dir():
        return
    names = list(TOKENIZER_FILES)
    for ref in (hf_config.get("auto_map") or {}).values():
        refs = ref if isinstance(ref, list) else [ref]
        names += [f"{r.split('--')[-1].split('.')[0]}.py" for r in refs if isinstance(r, str)]
    for name in dict.fromkeys(names):
        src, dst = Path(source) / name, target / name
        if not src.is_file() or (dst.exists() and src.samefile(dst)):
            continue
        shutil.copyfile(src, dst)


def _remove_stale_weights(path: Path) -> None:
    """Delete weight files of an earlier save so the loader cannot pick up a stale index or single file."""
    for stale in [path / SINGLE_FILE, path / INDEX_FILE, *path.glob("model-*-of-*.safetensors")]:
        if stale.is_file():
            stale.unlink()


def save_pretrained(model: CausalLM, path: str | os.PathLike, *, max_shard_bytes: int | None = None) -> None:
    """Write config.json + model.safetensors (or shards of at most max_shard_bytes + index) to `path`,
    plus the tokenizer files of model.source_dir. MTP layers are saved under MiMo names."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {to_hf_name(n): t.detach().to("cpu").contiguous() for n, t in model.state_dict().items()}
    dtype_name = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    hf_config = config_to_hf(model.config, dtype_name=dtype_name)
    shards = _shards(state, max_shard_bytes)
    _remove_stale_weights(path)
    if len(shards) == 1:
        save_file(shards[0], str(path / SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            weight_map.update({key: name for key in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                  indent=2, sort_keys=True))
    (path / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    _copy_side_files(model.source_dir, path, hf_config)
