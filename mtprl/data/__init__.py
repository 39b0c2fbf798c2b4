"""mtprl.data."""
