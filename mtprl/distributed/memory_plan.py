"""What each GPU of a run holds, planned from the config alone: ``mtprl plan``.

The model is built on the meta device from ``actor_rollout_ref.model.path``'s config.json (shapes only: no
weights are read, so a directory with just the config.json plans a 7B run on a laptop), and every term below
is counted from it, per rank of ``trainer.nnodes x trainer.n_gpus_per_node`` under FSDP2. GiB = 2^30 B.

  states       fp32 master weights (4 B x P) + gradients and AdamW's two moments (12 B x trainable P), / W;
               on the host instead under ``fsdp_config.param_offload`` / ``optimizer_offload`` (FSDP2's
               CPUOffloadPolicy moves all of it)
  reference    fp32 weights / W, only with a KL term (``ref.fsdp_config.param_offload``: on the host)
  units        the unsharded FSDP units in the compute dtype: the root (embedding, head, final norm), live
               through the whole forward and backward, and two blocks (the one running, the one prefetched)
  activations  micro-batch of N tokens (``ppo_max_token_len_per_gpu`` with ``use_dynamic_bsz``, else
               ``ppo_micro_batch_size_per_gpu`` x max_seq_len), L' = trunk blocks + trained MTP depths;
               gradient checkpointing on: each block's input (N x H) x L' + one block recomputed; off: every
               block's saved tensors, (6H + 2 n_kv d_h + 4I) elements per token per block
  head         the chunked head (``mtprl.model.head``): the final hidden states of every scored depth (N x H
               fp32 each) + a few [chunk, V] fp32 buffers (CHUNK_BUFFERS x CHUNK_ELEMENTS x 4 B)
  rollout      the engine's full weight copy in the compute dtype (several ranks; one process decodes from the
               policy's weights) and its packed copy in the compute dtype (``mtprl.model.packed``, counted on the
               meta device)
  kv cache     rows x (slots x bytes per slot + the row's other bytes) as the engine plans it at its first
               allocation (``mtprl.rollout.build.plan_kv_cache``): ``rollout.gpu_memory_utilization`` x the memory
               free then (usable minus the master weights, reference and rollout copy: no gradients or moments
               yet), less the packed copy and AdamW's moments still to come
  (``rollout.name=vllm``: vLLM's share, ``gpu_memory_utilization`` x the card, holds its weights, activations
  and KV cache; no packed copy; with several ranks the trainer's full bf16 copy stays beside it)

Phases: rollout = states + reference + rollout weights + packed + KV; update = states + reference + units +
activations + head, plus the engine when ``rollout.free_cache_engine`` is off (one process: the packed copy and
KV; several ranks: also its weight copy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mtprl.config.schema import MtprlConfig

GiB = 2 ** 30
CHUNK_BUFFERS = 3  # [chunk, V] fp32 buffers alive at once in the chunked head (logits, softmax, gradient)


@dataclass
class Term:
    name: str
    bytes: int
    formula: str

    @property
    def gib(self) -> float:
        return self.bytes / GiB


@dataclass
class MemoryPlan:
    world: int
    params: int  # P, every parameter (MTP layers included)
    terms: dict[str, Term]
    phases: dict[str, list[str]]  # phase -> the terms it holds
    usable_bytes: int  # per GPU
    host_bytes_per_node: int  # offloaded states of a node's ranks
    kv_rows: int
    sequences_per_rank: int
    notes: list[str] = field(default_factory=list)

    def total(self, phase: str) -> int:
        return sum(self.terms[t].bytes for t in self.phases[phase])

    def describe(self) -> str:
        lines = [f"memory plan per GPU: {self.world} rank(s), P = {self.params:,} parameters, "
                 f"{self.usable_bytes / GiB:.2f} GiB usable (--gpu-memory-gib)"]
        width = max(len(t.name) for t in self.terms.values())
        for t in self.terms.values():
            lines.append(f"  {t.name:<{width}}  {t.gib:8.2f} GiB  {t.formula}")
        for phase, names in self.phases.items():
            total = self.total(phase) / GiB
            fits = "fits" if self.total(phase) <= self.usable_bytes else "DOES NOT FIT"
            lines.append(f"  {phase:<{width}}  {total:8.2f} GiB  = {' + '.join(names)}: {fits}")
        if self.host_bytes_per_node:
            lines.append(f"  host RAM per node for offloaded states: {self.host_bytes_per_node / GiB:.2f} GiB (pinned)")
        lines.append(f"  KV cache rows {self.kv_rows} for {self.sequences_per_rank} sequences per rank")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def plan_memory(cfg: MtprlConfig, *, usable_gib: float = 78.5) -> MemoryPlan:
    """The plan of ``cfg`` (see the module docstring); nothing is allocated."""
    from mtprl.model import CausalLM
    from mtprl.model.hf_io.checkpoint import load_config
    from mtprl.model.head import chunk_rows
    from mtprl.trainer.policy import compute_dtype

    ar, tr = cfg.actor_rollout_ref, cfg.trainer
    model_cfg, actor, rollout, mtp = ar.model, ar.actor, ar.rollout, ar.model.mtp
    mc = load_config(model_cfg.path, mtp.num_layers if mtp.enable else None)
    with torch.device("meta"):
        model = CausalLM(mc)
    world, per_node = tr.nnodes * tr.n_gpus_per_node, tr.n_gpus_per_node
    dtype = compute_dtype(model_cfg)
    db = dtype.itemsize
    params = _numel(model)
    mtp_params = sum(_numel(m) for m in model.mtp_layers)
    train_mtp = mtp.enable and mtp.enable_train
    trainable = params if train_mtp else params - mtp_params
    h, v = mc.hidden_size, mc.vocab_size
    kv_dim = mc.num_key_value_heads * mc.resolved_head_dim
    terms: dict[str, Term] = {}

    def add(key: str, nbytes: float, formula: str) -> None:
        terms[key] = Term(key, int(nbytes), formula)

    fsdp = actor.fsdp_config
    offload = fsdp.param_offload or fsdp.optimizer_offload
    states = (4 * params + 12 * trainable) / world
    add("states", 0 if offload else states,
        f"(4 B x {params:,} + 12 B x {trainable:,} trainable) / {world}" + (" -> host (offload)" if offload else ""))
    host = states * per_node if offload else 0
    with_ref = actor.use_kl_loss or cfg.algorithm.use_kl_in_reward
    ref_bytes = 4 * params / world if with_ref else 0
    ref_offload = with_ref and ar.ref.fsdp_config.param_offload
    add("reference", 0 if ref_offload else ref_bytes,
        "no KL term" if not with_ref else f"4 B x P / {world}" + (" -> host (offload)" if ref_offload else ""))
    host += ref_bytes * per_node if ref_offload else 0
    root = _numel(model.embed_tokens) + _numel(model.norm) + (_numel(model.lm_head) if model.lm_head is not None else 0)
    block = max([_numel(model.layers[0])] + [_numel(m) for m in model.mtp_layers])
    add("units", (root + 2 * block) * db, f"(root {root:,} + 2 x block {block:,}) x {db} B")
    max_seq = cfg.data.max_prompt_length + cfg.data.max_response_length
    if actor.use_dynamic_bsz:
        tokens, how = actor.ppo_max_token_len_per_gpu, "ppo_max_token_len_per_gpu"
    else:
        micro = actor.ppo_micro_batch_size_per_gpu or actor.ppo_mini_batch_size * rollout.n
        tokens, how = micro * max_seq, f"{micro} x max_seq_len {max_seq}"
    depths = max(mc.num_mtp_layers, mtp.recursive_steps) if train_mtp else 0
    layers = mc.num_hidden_layers + depths
    per_block = (6 * h + 2 * kv_dim + 4 * mc.intermediate_size) * db
    if model_cfg.enable_gradient_checkpointing:
        add("activations", tokens * layers * h * db + tokens * per_block,
            f"N {tokens:,} ({how}) x ({layers} x H {h} x {db} B + one block {per_block:,} B), checkpointing")
    else:
        add("activations", tokens * layers * per_block,
            f"N {tokens:,} ({how}) x {layers} blocks x {per_block:,} B (enable_gradient_checkpointing=False)")
    rows = chunk_rows(v)
    add("head", tokens * h * 4 * (1 + depths) + CHUNK_BUFFERS * min(rows, tokens) * v * 4,
        f"N x H x 4 B x {1 + depths} depths + {CHUNK_BUFFERS} x [{min(rows, tokens)}, V {v:,}] fp32")
    usable = int(usable_gib * GiB)
    gen = cfg.data.gen_batch_size or cfg.data.train_batch_size
    sequences = math.ceil(gen * rollout.n / world)
    notes = []
    rollout_terms = _vllm_engine if rollout.name == "vllm" else _native_engine
    kv_rows, engine = rollout_terms(add, terms, cfg, mc, model, params, world, dtype, usable, max_seq)
    phases = {"rollout": ["states", "reference", "rollout weights", "packed", "kv cache"],
              "update": ["states", "reference", "units", "activations", "head"]
              + ([] if rollout.free_cache_engine else engine)}
    if kv_rows < sequences:
        notes.append(f"{sequences} sequences per rank but {kv_rows} KV rows: the rest wait for free rows")
    if not rollout.free_cache_engine:
        notes.append("rollout.free_cache_engine=False: the engine stays resident during the update")
    return MemoryPlan(world=world, params=params, terms=terms, phases=phases, usable_bytes=usable,
                      host_bytes_per_node=int(host), kv_rows=kv_rows, sequences_per_rank=sequences, notes=notes)


def _vllm_engine(add, terms, cfg, mc, model, params, world, dtype, usable, max_seq) -> tuple[int, list[str]]:
    """vLLM's terms: it takes gpu_memory_utilization of the card for its weights, activations and KV cache (its
    sleep mode, free_cache_engine, drops the KV cache and moves its weights to the host during the update); with
    several ranks the trainer also keeps its own full copy beside it (the HF export's source, refreshed by the
    sync). Returns (full-length KV rows its pool holds, the engine's terms)."""
    from mtprl.rollout.kv_cache import kv_bytes_per_slot

    rollout, db = cfg.actor_rollout_ref.rollout, dtype.itemsize
    add("rollout weights", params * db if world > 1 else 0,
        f"P x {db} B (the trainer's full copy beside vLLM)" if world > 1 else "one process: none beside vLLM")
    add("packed", 0, "vLLM: no packed copy")
    pool = rollout.gpu_memory_utilization * usable
    add("kv cache", pool, f"vLLM's share: {rollout.gpu_memory_utilization} x {usable / GiB} GiB (its bf16 weights "
        f"{params * db / GiB:.2f} GiB, activations and KV cache)")
    rows = int((pool - params * db) // (max_seq * kv_bytes_per_slot(mc, dtype, with_mtp=True)))
    return rows, ["rollout weights", "kv cache"]


def _native_engine(add, terms, cfg, mc, model, params, world, dtype, usable, max_seq) -> tuple[int, list[str]]:
    """The native engine's terms (its weight copy with several ranks - one process decodes from the fp32 policy -
    its packed copy in the compute dtype and its KV cache as it plans it at its first allocation, see
    ``mtprl.rollout.build``); returns (KV rows, the engine's terms)."""
    from mtprl.rollout.build import packed_copy_bytes
    from mtprl.rollout.kv_cache import plan_engine_cache
    from mtprl.trainer.samples import speculative_config

    ar = cfg.actor_rollout_ref
    rollout, db = ar.rollout, dtype.itemsize
    copy = params * db if world > 1 else 0
    add("rollout weights", copy, f"P x {db} B (the engine's copy)" if world > 1 else "one process: the policy's own")
    packed = packed_copy_bytes(mc, dtype)
    add("packed", packed, f"the engine's fused weights in {str(dtype).removeprefix('torch.')}")
    spec = speculative_config(cfg)
    # at the first allocation (the first generate call, before the first optimizer step) the fp32 master weights
    # are resident, gradients and AdamW's moments are not: the engine reserves the moments and its packed copy
    offload = ar.actor.fsdp_config.param_offload or ar.actor.fsdp_config.optimizer_offload
    trainable = params if ar.model.mtp.enable and ar.model.mtp.enable_train else params - sum(
        _numel(m) for m in model.mtp_layers)
    master, pending = (0, 0) if offload else (4 * params / world, 8 * trainable / world)
    free = usable - master - terms["reference"].bytes - copy
    limit = int(free * rollout.gpu_memory_utilization - packed - pending)
    kv = plan_engine_cache(mc, spec, max_seq, max_num_seqs=rollout.max_num_seqs, dtype=dtype, limit_bytes=limit,
                           limit_name="rollout.gpu_memory_utilization")
    add("kv cache", kv.bytes,
        f"{kv.rows} rows x ({kv.slots:,} slots x {kv.bytes_per_slot:,} B + {kv.row_bytes:,} B) "
        f"({rollout.gpu_memory_utilization} x {free / GiB:.2f} GiB free at the first allocation, less packed and "
        f"{pending / GiB:.2f} GiB of moments to come)")
    return kv.rows, ["packed", "kv cache"] + (["rollout weights"] if world > 1 else [])
