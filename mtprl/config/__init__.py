"""mtprl.config."""
