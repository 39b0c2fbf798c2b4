"""The run's reward manager from the config (``reward_model`` and ``custom_reward_function``). Kept out of
:mod:`mtprl.reward`'s package imports: scoring worker processes need neither the config nor this."""

from __future__ import annotations

from mtprl.config.loader import ConfigError
from mtprl.config.schema import MtprlConfig
from mtprl.reward.registry import RewardManager, build_reward_manager


def build_reward(cfg: MtprlConfig) -> RewardManager:
    """``reward_model.reward_manager`` (naive | dapo, with dapo's overlong shaping) scoring with the custom
    reward function when one is given; a set-up failure (missing file or function, bad option) is a
    ConfigError."""
    rm, custom = cfg.reward_model, cfg.custom_reward_function
    kwargs = dict(custom_reward_path=custom.path, custom_reward_name=custom.name, use_math_verify=rm.use_math_verify,
                  num_workers=rm.num_workers, timeout_s=rm.timeout_s, failure_score=rm.failure_score)
    if rm.reward_manager == "dapo":
        buf = rm.reward_kwargs.overlong_buffer_cfg
        kwargs.update(max_resp_len=rm.reward_kwargs.max_resp_len,
                      overlong_buffer_cfg=dict(enable=buf.enable, len=buf.len, penalty_factor=buf.penalty_factor, log=buf.log))
    try:
        return build_reward_manager(rm.reward_manager, **kwargs)
    except (FileNotFoundError, AttributeError, ImportError, ValueError) as e:
        raise ConfigError(f"reward set-up failed: {e}") from None
