"""Metrics: trackers (console, JSONL, TensorBoard), progress bars."""

from mtprl.metrics.tracking import Tracker, progress_bar

__all__ = ["Tracker", "progress_bar"]
