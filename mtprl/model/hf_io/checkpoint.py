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
from typing import Any

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


class CheckpointReader:
    """Our-named tensors of an HF directory, each read whole or as a range of its first dimension (safetensors
    reads only those rows from disk), with fresh MTP layers derived as the module docstring says - the same
    values whether a tensor is read whole or row range by row range. ``from_pretrained`` reads every tensor
    whole; a sharded load (``mtprl.distributed.loading``) reads on each rank only the rows its FSDP2 shard
    holds, so no rank ever holds the whole model.

    config: the model's config (``num_mtp_layers`` as wanted: checkpoint MTP layers beyond it are ignored).
    """

    def __init__(self, path: str | os.PathLike, config: ModelConfig) -> None:
        self.path, self.config = Path(path), config
        self._where: dict[str, tuple[Path, str]] = {}  # our name -> (file, HF key)
        unknown: list[str] = []
        for file in _checkpoint_files(self.path):
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for hf_name in f.keys():
                    ours = from_hf_name(hf_name)
                    if ours is None:
                        if not IGNORED_HF_KEYS.match(hf_name):
                            unknown.append(hf_name)
                    elif not (ours.startswith("mtp_layers.") and int(ours.split(".")[1]) >= config.num_mtp_layers):
                        self._where[ours] = (file, hf_name)
        if unknown:
            raise ValueError(f"checkpoint {str(self.path)!r} has keys this model does not know: {unknown[:8]}"
                             f"{' ...' if len(unknown) > 8 else ''}")
        if config.tie_word_embeddings:
            self._where.pop("lm_head.weight", None)  # some tied checkpoints store the head too; the embedding is it
        self._files: dict[Path, Any] = {}

    def stored(self) -> set[str]:
        """Our names of the tensors the checkpoint holds (MTP layers past config.num_mtp_layers left out)."""
        return set(self._where)

    def close(self) -> None:
        self._files.clear()

    def read(self, name: str, rows: tuple[int, int] | None = None, *, dtype: torch.dtype = torch.float32,
             device="cpu") -> torch.Tensor:
        """Tensor ``name`` (rows ``[start, stop)`` of its first dimension; None: all of it) in ``dtype`` on
        ``device``. A KeyError for a name that is neither stored nor a fresh MTP layer's."""
        if name in self._where:
            file, hf_name = self._where[name]
            if file not in self._files:
                self._files[file] = safe_open(str(file), framework="pt", device="cpu")
            f = self._files[file]
            t = f.get_tensor(hf_name) if rows is None else f.get_slice(hf_name)[rows[0]: rows[1]]
            return t.to(device=device, dtype=dtype)
        return self._fresh(name, rows, dtype, device)

    def _fresh(self, name: str, rows, dtype, device) -> torch.Tensor:
        """A parameter of an MTP layer the checkpoint lacks (module docstring): layer k > 0 is a copy of layer
        k - 1 (stored or itself fresh); layer 0 is derived from the trunk."""
        parts = name.split(".", 2)
        if parts[0] != "mtp_layers" or len(parts) < 3 or int(parts[1]) >= self.config.num_mtp_layers:
            raise KeyError(name)
        k, rest = int(parts[1]), parts[2]
        if k > 0:  # (clone: a re-read of a stored tensor may share its memory-mapped storage)
            return self.read(f"mtp_layers.{k - 1}.{rest}", rows, dtype=dtype, device=device).clone()
        h = self.config.hidden_size
        lo, hi = rows if rows is not None else (0, h)
        if rest.startswith("block."):
            return self.read(f"layers.{self.config.num_hidden_layers - 1}.{rest[len('block.'):]}", rows, dtype=dtype,
                             device=device).clone()
        if rest == "final_layernorm.weight":
            return self.read("norm.weight", rows, dtype=dtype, device=device).clone()
        if rest in ("hidden_layernorm.weight", "token_layernorm.weight"):
            return torch.ones(hi - lo, dtype=dtype, device=device)
        if rest == "input_proj.weight":  # [I ; 0]: row i has its 1 in column i
            proj = torch.zeros(hi - lo, 2 * h, dtype=dtype, device=device)
            proj[:, lo:hi] = torch.eye(hi - lo, dtype=dtype, device=device)
            return proj
        raise KeyError(name)


def check_against(reader: CheckpointReader, expected: set[str]) -> None:
    """ValueError naming what differs when the checkpoint (with fresh MTP layers) cannot fill ``expected``."""
    stored = reader.stored()
    fresh = {n for n in expected - stored  # the layers whose input projection is not stored are made whole
             if n.startswith("mtp_layers.") and f"mtp_layers.{n.split('.')[1]}.input_proj.weight" not in stored}
    missing, unexpected = expected - stored - fresh, stored - expected
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(reader.path)!r} does not match its config: missing {sorted(missing)[:8]}, "
                         f"unexpected {sorted(unexpected)[:8]}")


def load_config(path: str | os.PathLike, num_mtp_layers: int | None = None) -> ModelConfig:
    """The model config of an HF directory; num_mtp_layers as from_pretrained takes it."""
    config = config_from_hf(read_hf_config(path))
    if num_mtp_layers is not None:
        if num_mtp_layers < 0:
            raise ValueError(f"num_mtp_layers must be >= 0, got {num_mtp_layers}")
        config = config.replace(num_mtp_layers=num_mtp_layers)
    return config


def from_pretrained(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device="cpu",
                    num_mtp_layers: int | None = None) -> CausalLM:
    """Load an HF directory of a qwen2 / llama / qwen3 / mimo model.

    num_mtp_layers: None -> the checkpoint's own `num_nextn_predict_layers` (0 if absent); D -> exactly D MTP
    layers: extra checkpoint layers are dropped, missing ones freshly initialised (module docstring).
    Parameters are created directly from the checkpoint tensors, one at a time in ``dtype`` on ``device`` (no
    random init, no fp32 detour for a bf16 copy).
    """
    path = Path(path)
    config = load_config(path, num_mtp_layers)
    reader = CheckpointReader(path, config)
    with torch.device("meta"):
        model = CausalLM(config)
    names = list(model.state_dict())
    check_against(reader, set(names))
    try:
        state = {name: reader.read(name, dtype=dtype, device=device) for name in names}
    finally:
        reader.close()
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
