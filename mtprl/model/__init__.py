"""mtprl.model."""
