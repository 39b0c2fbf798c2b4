"""mtprl: RL post-training for LLM reasoning with native multi-token prediction."""

__version__ = "0.1.0"
