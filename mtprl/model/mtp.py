"""Multi-token prediction (MTP) layers and their loss.

Architecture (DeepSeek-V3 §2.2 "Multi-Token Prediction", MiMo-7B report §2; SPEC §5). For depth k = 1..D at
position i, with h^0 the trunk's final-normed hidden state and t the token ids:

    h'_i^k = W_proj [ RMSNorm_h(h_i^{k-1}) ; RMSNorm_e(Emb(t_{i+k})) ]        (hidden FIRST: MiMo order)
    h_i^k  = FinalNorm_k( Block_k(h'^k)_i )                                  (causal block of the trunk's type)
    logits = LMHead(h_i^k)                  -> predicts t_{i+k+1}             (Emb and LMHead shared with trunk)

Positions: the depth-k layer at sequence index i uses the trunk's RoPE position of index i (as Megatron's MTP
and SGLang/vLLM's MiMo drafters do: the inputs are shifted, the positions are not).

Recursive depths (EAGLE-3's "training-time test", Li et al. 2025 §3.3; `recursive_steps` K > D). The rollout
engine drafts depths D+1..K by reusing the last layer on its OWN output: for the draft anchored at position a
(the last trunk hidden state the step knows), depth r > D runs the layer at position j = a + r - D on

    g^r_j = FinalNorm_D( Block_D( W_proj [ RMSNorm_h(g^{r-1}_{j-1}) ; RMSNorm_e(Emb(t_{j+D})) ] ) ),  g^D = h^D

with attention over layer D's K/V of positions <= a (from true trunk inputs) and the K/V of the draft's own
earlier recursive levels at a+1..j (see `recursion_mask`); it predicts t_{a+r+1}. Trained on a full sequence,
every position is an anchor at once (one block call per level over the levels so far, under that mask), and
the depth-r output is indexed by its anchor, so depth r follows the depth-k convention above (position i
predicts t_{i+r+1}) and `mtp_loss` treats it like any depth. The token input is the sequence's own token,
which is the drafted token whenever depth r is drafted with a chance to count (drafts 1..r-1 accepted); the
hidden input is the layer's own earlier output, and the gradient flows back through the recursion, as in
EAGLE-3.
Where we differ from DeepSeek-V3: its projection input is [emb ; hidden] (we follow MiMo); DeepSeek-V3 has
a separate shared_head.norm, MiMo (and we) a final_layernorm per MTP layer.

Loss (DeepSeek-V3 eq. 24-25): L_MTP = lambda / D * sum_k mean_i CE(p^k_i, t_{i+k+1}), with lambda the
`mtp_loss_scaling_factor`. Beyond the papers we offer two targets aimed at speculative acceptance: `kl`
= KL(p_trunk || p_mtp) to the detached trunk distribution that predicts the same token, and `tv` = total
variation 0.5 * sum |p_trunk - p_mtp| (1 - TV is exactly the acceptance probability of one draft token
under speculative sampling, Leviathan et al. 2023, so minimising TV maximises acceptance).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtprl.model.config import ModelConfig
from mtprl.model.head import linear_scores
from mtprl.model.trunk import AttnInputs, DecoderBlock, RMSNorm

MTP_LOSS_TYPES = ("ce", "kl", "tv")


class MTPLayer(nn.Module):
    """One MTP depth: norms + input_proj + a trunk-type DecoderBlock + final_layernorm (no head of its own)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.hidden_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.token_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.input_proj = nn.Linear(2 * h, h, bias=False)
        self.block = DecoderBlock(config)
        self.final_layernorm = RMSNorm(h, config.rms_norm_eps)

    def project(self, prev_hidden: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
        """The block's input h' = W_proj [RMSNorm_h(prev_hidden) ; RMSNorm_e(token_embeds)], all [B,T,H]."""
        return self.input_proj(torch.cat([self.hidden_layernorm(prev_hidden), self.token_layernorm(token_embeds)], dim=-1))

    def forward(self, prev_hidden: torch.Tensor, token_embeds: torch.Tensor, attn: AttnInputs, layer: int,
                recursion: "Recursion | None" = None) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """prev_hidden h^{k-1} [B,T,H], token_embeds Emb(t_{i+k}) [B,T,H] -> h^k [B,T,H] (final-normed).
        `layer` indexes attn.cache (the MTP cache) on the incremental path.

        recursion (full-sequence path, last layer only): also this layer reused on its own output for
        `recursion.levels` more depths (module docstring, "Recursive depths"); returns (h^D, [hidden of depth
        D+1, ...]), each [B,T,H] indexed by its anchor (entry s-1 at position i predicts t_{i+D+s+1}). It runs
        inside this call so that a wrapper hooking the layer's call (FSDP2 gathers a unit's shards there)
        covers every use of its weights."""
        x = self.project(prev_hidden, token_embeds)
        h = self.final_layernorm(self.block(x, attn, layer))
        if recursion is None:
            return h
        return h, self._recursive_depths(x, h, token_embeds, recursion, layer)

    def _recursive_depths(self, x0: torch.Tensor, last: torch.Tensor, token_embeds: torch.Tensor, rec: "Recursion",
                          layer: int) -> list[torch.Tensor]:
        """x0: the block's ordinary input, last = h^D its output. Level s runs the block on its own T positions,
        attending to the keys and values of levels 0..s-1 (past_kv) and its own under recursion_mask's last T
        rows."""
        t = last.shape[1]
        attention = self.block.self_attn

        def key_values(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return attention.key_values(self.block.input_layernorm(x), rec.cos, rec.sin)

        past = [key_values(x0)]  # level 0: the layer's ordinary inputs
        out, g = [], last  # g^{D+s}_j, position-indexed
        for s in range(1, rec.levels + 1):
            x = self.project(shift_right(g), token_embeds)  # g^{D+s-1}_{j-1} with t_{j+D}
            mask = recursion_mask(s + 1, rec.attention_mask, t, device=last.device)[:, :, s * t:]  # [B|1,1,T,(s+1)T]
            past_kv = (torch.cat([k for k, _ in past], dim=2), torch.cat([v for _, v in past], dim=2))
            g = self.final_layernorm(self.block(x, AttnInputs(cos=rec.cos, sin=rec.sin, mask=mask, past_kv=past_kv),
                                                layer))
            out.append(torch.cat([g[:, s:], torch.zeros_like(g[:, :s])], dim=1))  # anchor a = j - s
            if s < rec.levels:
                past.append(key_values(x))
        return out


@dataclass(frozen=True)
class Recursion:
    """What MTPLayer.forward needs for the recursive depths: how many (K - D), the RoPE tables [B|1,1,T,Dh] of
    the sequence and its padding mask [B,T] (None: no padding that any real query could see)."""

    levels: int
    cos: torch.Tensor
    sin: torch.Tensor
    attention_mask: torch.Tensor | None


def recursion_mask(num_levels: int, attention_mask: torch.Tensor | None, t: int,
                   device: torch.device | None = None) -> torch.Tensor:
    """Attention mask [B|1, 1, n*T, n*T] (True = may attend) of a block call over n = num_levels levels laid out
    level-major (index s*T + j = level s at position j; level 0 = the last layer's ordinary outputs, level s its
    s-th recursive reuse). Query (s, j) sees what the rollout engine's draft at that position sees: level 0 at
    positions <= j - s (the committed cache) and, for 1 <= u <= s, level u at position j - (s - u) (the draft's
    own earlier levels; u = s is itself). With attention_mask [B,T] (1 = real token) padding keys are hidden;
    every query still sees itself."""
    idx = torch.arange(t, device=device)
    blocks = []
    for s in range(num_levels):
        row = [idx[None, :] <= idx[:, None] - s]  # level 0 keys, [T(query), T(key)]
        row += [idx[None, :] == idx[:, None] - (s - u) for u in range(1, s + 1)]
        row += [torch.zeros(t, t, dtype=torch.bool, device=device)] * (num_levels - 1 - s)
        blocks.append(torch.cat(row, dim=1))
    mask = torch.cat(blocks, dim=0)[None]  # [1, nT, nT]
    if attention_mask is not None:
        mask = mask & attention_mask.bool().repeat(1, num_levels)[:, None, :]
        mask = mask | torch.eye(num_levels * t, dtype=torch.bool, device=device)[None]
    return mask[:, None]


def shift_right(x: torch.Tensor, k: int = 1) -> torch.Tensor:
    """[B,T,...] -> out[:, i] = x[:, i-k]; the first k positions are zeros (garbage inputs)."""
    return torch.cat([torch.zeros_like(x[:, :k]), x[:, : x.shape[1] - k]], dim=1)


def shift_left(input_ids: torch.Tensor, k: int, fill: int = 0) -> torch.Tensor:
    """[B,T] -> [B,T] with out[:, i] = input_ids[:, i+k]; the last k positions get `fill` (garbage inputs)."""
    if k == 0:
        return input_ids
    out = torch.full_like(input_ids, fill)
    if k < input_ids.shape[1]:
        out[:, : input_ids.shape[1] - k] = input_ids[:, k:]
    return out


def _depth_valid(loss_mask: torch.Tensor, k: int, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """valid [B,T] bool for depth k (1-based): position i counts iff i+k+1 < T and loss_mask[i+k+1] == 1
    (and attention_mask[i] == 1 when given)."""
    b, t = loss_mask.shape
    valid = torch.zeros(b, t, dtype=torch.bool, device=loss_mask.device)
    if k + 1 < t:
        valid[:, : t - k - 1] = loss_mask[:, k + 1:].bool()
    if attention_mask is not None:
        valid &= attention_mask.bool()
    return valid


def _masked_mean(values: torch.Tensor, valid: torch.Tensor, count: float | None = None) -> torch.Tensor:
    """mean of values[valid] (0 when nothing is valid, with a graph so backward still works); with `count`, the
    sum over valid divided by that count instead (a part of a larger batch's mean)."""
    weights = valid.to(values.dtype)
    denom = weights.sum() if count is None else torch.tensor(float(count), dtype=values.dtype, device=values.device)
    return (values * weights).sum() / denom.clamp(min=1.0)


def mtp_valid_counts(loss_mask: torch.Tensor, num_depths: int,
                     attention_mask: torch.Tensor | None = None) -> list[int]:
    """How many positions count at each depth 1..num_depths (mtp_loss's masks) in loss_mask [B,T]. Computed over a
    whole (mini-)batch and passed to mtp_loss of each of its micro-batches (`num_valid`), the parts sum to the
    batch's per-depth means, however the batch is split over micro-batches and ranks. (A micro-batch's share of
    the batch's loss tokens is not the same weight: depth k does not count a target whose anchor i+k+1 positions
    earlier falls before the sequence start, so the depths' counts differ, by a sequence's first k tokens.)"""
    return [int(_depth_valid(loss_mask, k, attention_mask).sum()) for k in range(1, num_depths + 1)]


def mtp_loss(
    mtp_logits: list[torch.Tensor],
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    scaling_factor: float = 0.1,
    loss_type: str = "ce",
    trunk_logits: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    num_valid: list[int] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """MTP loss lambda/D * sum_k mean_k and per-depth metrics, from full logits: the slow reference of
    `mtp_token_scores` + `mtp_loss_from_scores` (what the trainer runs, one chunk of logits at a time).

    mtp_logits: D tensors [B,T,V], one per trained depth (the MTP layers, then any recursive depths of
        `CausalLM.forward(mtp_recursive_steps=K)`, D = K then); mtp_logits[k-1][:, i] predicts token i+k+1.
    input_ids: [B,T] the sequence (targets are read from it).
    loss_mask: [B,T] 1 = this position's token is a training target (e.g. response tokens in RL, 0 on padding).
    Masks used: depth k at position i counts iff i+k+1 < T and loss_mask[:, i+k+1] == 1 (the mask of the
    TARGET token), and additionally attention_mask[:, i] == 1 when attention_mask [B,T] is given (the input
    position must be a real token; matters for left padding). Sequences shorter than k+2 contribute nothing
    to depth k; a depth with no counted position has mean 0 (never NaN).
    loss_type: "ce" hard cross-entropy on the actual token; "kl" KL(p_trunk || p_mtp) and "tv"
    0.5 * sum_v |p_trunk - p_mtp|, where p_trunk = softmax(trunk_logits[:, i+k]).detach() predicts the same
    token i+k+1 (trunk_logits [B,T,V] required for kl / tv).
    num_valid: the counted positions per depth of the whole batch these rows are part of (mtp_valid_counts);
    each depth's sum is then divided by those counts, so the losses and metrics of a batch's parts add up to
    the whole batch's. None: these rows' own counts.
    Returns (loss, metrics) with metrics `mtp_losses/mtp_{k}_loss` (the per-depth mean, before scaling) and
    `mtp/acc_{k}` (fraction of counted positions whose argmax equals the target token), k 1-based.
    All maths in fp32.
    """
    _check_loss_args(len(mtp_logits), input_ids, loss_mask, loss_type, trunk_logits is not None)
    b, t = input_ids.shape
    losses, correct = [], []
    for k, logits in enumerate(mtp_logits, start=1):
        if logits.shape[:2] != (b, t):
            raise ValueError(f"mtp_logits[{k - 1}] has shape {tuple(logits.shape)}, expected [B,T,V] with B,T={b},{t}")
        per_pos, hit = _depth_scores_from_logits(logits, input_ids, k, loss_type, trunk_logits)
        losses.append(per_pos)
        correct.append(hit)
    return mtp_loss_from_scores(losses, correct, loss_mask, scaling_factor=scaling_factor,
                                attention_mask=attention_mask, num_valid=num_valid)


def _depth_scores_from_logits(logits: torch.Tensor, input_ids: torch.Tensor, k: int, loss_type: str,
                              trunk_logits: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth k's per-position loss [B,T] and argmax hits [B,T] at every position, from its logits [B,T,V]."""
    t = input_ids.shape[1]
    target = shift_left(input_ids, k + 1)  # [B,T] token i+k+1
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B,T,V]
    if loss_type == "ce":
        per_pos = -logp.gather(-1, target[..., None]).squeeze(-1)
    else:
        ref = trunk_logits.detach().float()
        shifted = torch.zeros_like(ref)
        if k < t:
            shifted[:, : t - k] = ref[:, k:]  # trunk logits at i+k predict token i+k+1
        ref_logp = torch.log_softmax(shifted, dim=-1)
        if loss_type == "kl":
            per_pos = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
        else:
            per_pos = 0.5 * (ref_logp.exp() - logp.exp()).abs().sum(-1)
    return per_pos, logits.detach().argmax(-1) == target


def reference_mtp_token_scores(mtp_hidden_states: list[torch.Tensor], head: torch.Tensor, input_ids: torch.Tensor,
                               loss_mask: torch.Tensor, *, loss_type: str = "ce",
                               trunk_hidden: torch.Tensor | None = None, trunk_head: torch.Tensor | None = None,
                               attention_mask: torch.Tensor | None = None) -> tuple[list[torch.Tensor],
                                                                                    list[torch.Tensor]]:
    """mtp_token_scores from each depth's full logits F.linear(h^k, head) [B,T,V] (mtp_loss's maths): the slow
    reference of the chunked path."""
    trunk_logits = None if trunk_hidden is None else F.linear(trunk_hidden, trunk_head)
    losses, correct = [], []
    for k, hidden in enumerate(mtp_hidden_states, start=1):
        valid = _depth_valid(loss_mask, k, attention_mask)
        per_pos, hit = _depth_scores_from_logits(F.linear(hidden, head), input_ids, k, loss_type, trunk_logits)
        losses.append(per_pos * valid)
        correct.append(hit & valid)
    return losses, correct


def _check_loss_args(num_depths: int, input_ids: torch.Tensor, loss_mask: torch.Tensor, loss_type: str,
                     has_trunk: bool) -> None:
    if loss_type not in MTP_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {MTP_LOSS_TYPES}")
    if loss_type != "ce" and not has_trunk:
        raise ValueError(f"loss_type={loss_type!r} needs trunk_logits (the trunk's [B,T,V] logits)")
    if num_depths == 0:
        raise ValueError("mtp_logits is empty: the model has no MTP layers (num_mtp_layers=0)")
    if input_ids.shape != loss_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and loss_mask {tuple(loss_mask.shape)} differ in shape")


def mtp_token_scores(mtp_hidden_states: list[torch.Tensor], head: torch.Tensor, input_ids: torch.Tensor,
                     loss_mask: torch.Tensor, *, loss_type: str = "ce", trunk_hidden: torch.Tensor | None = None,
                     trunk_head: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                     head_mm: torch.Tensor | None = None,
                     chunk_size: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per depth k (mtp_hidden_states[k-1] = h^k [B,T,H]): (per-position loss [B,T] fp32, correct [B,T] bool) at
    mtp_loss's counted positions (0 / False elsewhere), through the head [V,H] a chunk of positions at a time
    (model.head.linear_scores): never a [B,T,V] tensor. For kl / tv the reference distribution is the trunk's at
    i+k, from trunk_hidden h^0 [B,T,H] under trunk_head [V,H], detached (mtp_loss's trunk_logits). head_mm: the
    head detached in the compute dtype, shared (head.head_for_matmul). Reduce with mtp_loss_from_scores; together
    they equal mtp_loss on the logits (tested)."""
    _check_loss_args(len(mtp_hidden_states), input_ids, loss_mask, loss_type, trunk_hidden is not None)
    t = input_ids.shape[1]
    losses, correct = [], []
    for k, hidden in enumerate(mtp_hidden_states, start=1):
        valid = _depth_valid(loss_mask, k, attention_mask)  # [B,T]; only i + k + 1 < T
        target = shift_left(input_ids, k + 1)[valid]  # [N] token i+k+1
        ref = None if loss_type == "ce" else trunk_hidden[:, k:][valid[:, : max(t - k, 0)]]  # [N,H] h^0 at i+k
        score, _, hit = linear_scores(hidden[valid], head, target, mode="logprob" if loss_type == "ce" else loss_type,
                                      ref_hidden=ref, ref_weight=trunk_head, want_correct=True, weight_mm=head_mm,
                                      chunk_size=chunk_size)
        losses.append(score.new_zeros(valid.shape).masked_scatter(valid, -score if loss_type == "ce" else score))
        correct.append(torch.zeros_like(valid).masked_scatter(valid, hit))
    return losses, correct


def mtp_loss_from_scores(token_losses: list[torch.Tensor], token_correct: list[torch.Tensor], loss_mask: torch.Tensor,
                         *, scaling_factor: float = 0.1, attention_mask: torch.Tensor | None = None,
                         num_valid: list[int] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """mtp_loss from its per-depth, per-position losses [B,T] and argmax hits [B,T] (mtp_token_scores): the
    masked means over the counted positions (or sums over num_valid), scaled by lambda / D, and the metrics."""
    num_depths = len(token_losses)
    if num_valid is not None and len(num_valid) != num_depths:
        raise ValueError(f"num_valid has {len(num_valid)} counts for {num_depths} depths")
    total = token_losses[0].new_zeros((), dtype=torch.float32)
    metrics: dict[str, float] = {}
    for k, (per_pos, hit) in enumerate(zip(token_losses, token_correct), start=1):
        valid = _depth_valid(loss_mask, k, attention_mask)  # [B,T]
        count = None if num_valid is None else num_valid[k - 1]
        depth_loss = _masked_mean(per_pos, valid, count)
        total = total + depth_loss
        with torch.no_grad():
            acc = _masked_mean(hit.float(), valid, count)
        metrics[f"mtp_losses/mtp_{k}_loss"] = float(depth_loss.detach())
        metrics[f"mtp/acc_{k}"] = float(acc)
    return total * (scaling_factor / num_depths), metrics
