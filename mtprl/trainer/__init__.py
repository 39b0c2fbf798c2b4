"""mtprl.trainer."""
