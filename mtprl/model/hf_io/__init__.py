"""mtprl.model.hf_io: HF checkpoint directories in and out; parameter-name maps as dicts (keymaps.py)."""

from mtprl.model.hf_io.checkpoint import from_pretrained, save_pretrained
from mtprl.model.hf_io.config_map import config_from_hf, config_to_hf
from mtprl.model.hf_io.keymaps import KEY_MAP, from_hf_name, to_hf_name

__all__ = ["KEY_MAP", "config_from_hf", "config_to_hf", "from_hf_name", "from_pretrained", "save_pretrained",
           "to_hf_name"]
