"""Typed configuration: verl's key tree (:mod:`.schema`), overrides and presets (:mod:`.loader`),
cross-field checks (:mod:`.validate`)."""

from mtprl.config.loader import (
    ConfigError,
    closest_key,
    from_dict,
    load_config,
    parse_override,
    preset_path,
    to_dict,
    to_yaml,
)
from mtprl.config.schema import MtprlConfig
from mtprl.config.validate import validate_config

__all__ = [
    "ConfigError",
    "MtprlConfig",
    "closest_key",
    "from_dict",
    "load_config",
    "parse_override",
    "preset_path",
    "to_dict",
    "to_yaml",
    "validate_config",
]
