"""Reference decoding: the slow, obviously-correct path the engine is tested against (STYLE rule 7).

One sequence at a time, no cache: every new token re-runs the full-sequence forward `model(ids)` on the whole
prefix and samples from the last position (autoregressive sampling, the definition of the distribution
that plain and speculative decoding must both reproduce). Same sampling functions as the engine, and the
same order of random draws as the engine running one sequence at a time (max_num_seqs=1), so at any
temperature the two are token-identical for the same generator seed.
"""

from __future__ import annotations

import torch

from mtprl.rollout.sampling import processed_logprobs, sample_from_probs, temperature_logprobs
from mtprl.rollout.types import Completion, SamplingParams


@torch.inference_mode()
def reference_generate(model: torch.nn.Module, prompts: list[list[int]], params: SamplingParams,
                       generator: torch.Generator | None = None, max_seq_len: int | None = None) -> list[Completion]:
    """Completions in prompt-major order (prompt 0 samples 0..n-1, ...), as Engine.generate."""
    device = next(model.parameters()).device
    out = []
    for i, prompt in enumerate(prompts):
        limit = len(prompt) + params.max_new_tokens
        if max_seq_len is not None:
            limit = min(limit, max_seq_len)
        for j in range(params.n):
            out.append(_one(model, prompt, limit, params, generator, device, i, j))
    return out


def _one(model, prompt, limit, params, generator, device, prompt_index, sample_index) -> Completion:
    ids = list(prompt)
    tokens, logprobs, trunk_logprobs = [], [], []
    finish = "length"
    while len(ids) < limit:
        logits = model(torch.tensor([ids], device=device), compute_mtp=False).logits[:, -1]  # [1,V]
        lp = processed_logprobs(logits, params)
        tok = lp.argmax(-1) if params.greedy else sample_from_probs(lp.exp(), generator)
        t = int(tok)
        ids.append(t)
        tokens.append(t)
        logprobs.append(float(lp[0, t]))
        trunk_logprobs.append(float(temperature_logprobs(logits, params.temperature)[0, t]))
        if t in params.stop_token_ids:
            finish = "stop"
            break
    return Completion(token_ids=tokens, logprobs=logprobs, trunk_logprobs=trunk_logprobs, finish_reason=finish,
                      prompt_index=prompt_index, sample_index=sample_index)
