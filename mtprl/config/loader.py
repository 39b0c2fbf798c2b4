"""Build a resolved :class:`MtprlConfig` from a preset and verl/Hydra-style command-line overrides.

Override grammar (what a verl user types):

* ``key=value``     set an existing key (``actor_rollout_ref.actor.optim.lr=1e-6``)
* ``+key=value``    Hydra's "add"; accepted for keys the schema already has (verl scripts use it for
                    ``reward_model.reward_kwargs.*``) and for new entries under open dicts such as
                    ``actor_rollout_ref.model.override_config``
* ``++key=value``   set or add
* values are YAML: ``True``, ``1e-6``, ``null``, ``'["console","tensorboard"]'``, ``$((1024*2))`` is
  the shell's job, not ours.

Every error is a :class:`ConfigError` whose message is one line per problem.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mtprl.config.schema import OPEN_DICT_PATHS, MtprlConfig

PRESET_DIR = Path(__file__).parent / "presets"
_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class ConfigError(ValueError):
    """A configuration problem; ``str(err)`` is one line per problem."""


@dataclass(frozen=True)
class Override:
    key: str  # dotted path
    value: Any  # parsed YAML value
    add: bool  # written with a leading + or ++
    source: str  # where it came from, for error messages


# ------------------------------------------------------------------------------ schema reflection
def _leaf_types(cls: type = MtprlConfig, prefix: str = "") -> dict[str, Any]:
    """Map every leaf path of the schema to its annotated type (nested dataclasses are walked)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_leaf_types(tp, path + "."))
        else:
            out[path] = tp
    return out


LEAF_TYPES: dict[str, Any] = _leaf_types()
NODE_PATHS: frozenset[str] = frozenset(
    ".".join(p.split(".")[:i]) for p in LEAF_TYPES for i in range(1, p.count(".") + 1)
)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin in (list, typing.List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict, typing.Dict):
        return "mapping"
    if tp is Any:
        return "any value"
    return getattr(tp, "__name__", str(tp))


def closest_key(key: str) -> str | None:
    """The schema path a mistyped ``key`` most likely meant (full path first, then last segment)."""
    paths = list(LEAF_TYPES) + sorted(NODE_PATHS)
    hit = difflib.get_close_matches(key, paths, n=1, cutoff=0.6)
    if hit:
        return hit[0]
    by_leaf: dict[str, str] = {}
    for p in paths:
        by_leaf.setdefault(p.rsplit(".", 1)[-1], p)
    hit = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(by_leaf), n=1, cutoff=0.75)
    return by_leaf[hit[0]] if hit else None


def _unknown_key_error(key: str, source: str) -> ConfigError:
    guess = closest_key(key)
    hint = f"; did you mean '{guess}'?" if guess else "; run `mtprl config show` to list the keys"
    return ConfigError(f"unknown config key '{key}' ({source}){hint}")


# ------------------------------------------------------------------------------------- parsing
def parse_value(text: str) -> Any:
    """YAML value as Hydra reads it, with ``1e-6`` read as a float (YAML 1.1 would keep a string)."""
    if text == "":
        return ""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _FLOAT_RE.match(value):
        return float(value)
    return value


def parse_override(text: str, source: str = "command line") -> Override:
    add = text.startswith("+")
    body = text.lstrip("+")
    if "=" not in body:
        raise ConfigError(f"override '{text}' ({source}) is not of the form key=value")
    key, raw = body.split("=", 1)
    key = key.strip()
    if not key or not re.fullmatch(r"[A-Za-z_][\w\-]*(\.[A-Za-z_][\w\-]*)*", key):
        raise ConfigError(f"override '{text}' ({source}) has a malformed key '{key}'")
    return Override(key=key, value=parse_value(raw.strip()), add=add, source=source)


def _flatten(tree: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """Dotted (path, value) pairs of a nested mapping; open dicts and non-dict values are leaves."""
    if isinstance(tree, dict) and prefix.rstrip(".") not in OPEN_DICT_PATHS and prefix.rstrip(".") not in LEAF_TYPES:
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), tree


def preset_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"preset file '{name_or_path}' does not exist")
        return p
    p = PRESET_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        names = sorted(q.stem for q in PRESET_DIR.glob("*.yaml"))
        guess = difflib.get_close_matches(name_or_path, names, n=1)
        hint = f"; did you mean '{guess[0]}'?" if guess else ""
        raise ConfigError(f"unknown preset '{name_or_path}' (available: {', '.join(names)}){hint}")
    return p


def preset_overrides(name_or_path: str) -> list[Override]:
    path = preset_path(name_or_path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"preset '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"preset '{path}' must be a mapping of config keys")
    return [Override(k, v, add=False, source=f"preset {path.name}") for k, v in _flatten(tree)]


# ------------------------------------------------------------------------------------ applying
def _open_dict_root(key: str) -> str | None:
    return next((p for p in OPEN_DICT_PATHS if key == p or key.startswith(p + ".")), None)


def _coerce(key: str, value: Any) -> Any:
    tp = LEAF_TYPES.get(key)
    if tp is not None and typing.get_origin(tp) in (list, typing.List) and isinstance(value, (str, int, float)):
        return [value]  # trainer.logger=console -> [console]
    return value


def apply_override(cfg: DictConfig, ov: Override) -> None:
    key = ov.key
    if key not in LEAF_TYPES and _open_dict_root(key) is None:
        if key in NODE_PATHS and isinstance(ov.value, dict):
            for sub, v in _flatten(ov.value, key + "."):
                apply_override(cfg, Override(sub, v, ov.add, ov.source))
            return
        raise _unknown_key_error(key, ov.source)
    root = _open_dict_root(key)
    if root is not None and key != root:
        if not ov.add:
            present = OmegaConf.select(cfg, key, default=None) is not None
            if not present:
                raise ConfigError(
                    f"'{key}' ({ov.source}) is a new entry of the mapping '{root}': write it as +{key}=..."
                )
        OmegaConf.update(cfg, key, ov.value, merge=True, force_add=True)
        return
    try:
        OmegaConf.update(cfg, key, _coerce(key, ov.value), merge=False)
    except OmegaConfBaseException:
        raise ConfigError(
            f"{key}: expected {_type_name(LEAF_TYPES[key])}, got {ov.value!r} ({ov.source})"
        ) from None


def load_config(preset: str | None = None, overrides: Sequence[str] = (), *, validate: bool = True) -> MtprlConfig:
    """The resolved, validated config: schema defaults <- preset <- command-line overrides."""
    from mtprl.config.validate import resolve, validate_config

    cfg = OmegaConf.structured(MtprlConfig)
    applied: list[Override] = preset_overrides(preset) if preset else []
    applied += [parse_override(o) for o in overrides]
    for ov in applied:
        apply_override(cfg, ov)
    try:
        obj: MtprlConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(f"config could not be resolved: {str(e).splitlines()[0]}") from None
    resolve(obj, explicitly_set={ov.key for ov in applied})
    if validate:
        validate_config(obj)
    return obj


def to_yaml(cfg: MtprlConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: MtprlConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def from_dict(tree: dict) -> MtprlConfig:
    """Rebuild a config saved with :func:`to_dict` (checkpoints); unknown keys still fail loudly."""
    cfg = OmegaConf.structured(MtprlConfig)
    for key, value in _flatten(tree):
        apply_override(cfg, Override(key, value, add=True, source="saved config"))
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]
