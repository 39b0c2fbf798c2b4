"""mtprl.metrics."""
