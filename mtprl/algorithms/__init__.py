"""mtprl.algorithms."""
