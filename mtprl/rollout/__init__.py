"""mtprl.rollout: batched generation with a static KV cache, continuous batching and exact speculative
decoding with the policy's MTP layers.

    engine = Engine(model, max_num_seqs=64, max_seq_len=2048)
    completions = engine.generate(prompts, SamplingParams(temperature=1.0, n=8), SpeculativeConfig(num_steps=3))
"""

from mtprl.rollout.decode import reference_generate
from mtprl.rollout.engine import Engine
from mtprl.rollout.types import Completion, GenerateOutput, RolloutMetrics, SamplingParams, SpeculativeConfig

__all__ = ["Completion", "Engine", "GenerateOutput", "RolloutMetrics", "SamplingParams", "SpeculativeConfig",
           "reference_generate"]
