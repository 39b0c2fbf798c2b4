"""mtprl.distributed."""
