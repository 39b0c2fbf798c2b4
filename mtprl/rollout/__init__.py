"""mtprl.rollout."""
