"""mtprl.reward."""
