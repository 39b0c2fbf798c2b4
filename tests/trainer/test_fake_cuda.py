"""The training path on a fake CUDA device, so that a tensor created without ``device=`` fails CI on a CPU-only
machine instead of a user's first GPU step.

PyTorch's ``FakeTensorMode`` gives tensors on device ``cuda`` on this CPU-only build (no memory, no kernels: shapes,
dtypes and devices only) and raises (``FakeTensorDeviceMismatchError``, a RuntimeError) when a CUDA tensor meets a
CPU one, as a real GPU would. On a CPU-only build three things do not work under it, and the test works around or leaves out each:

* Python indexing (``t[..]``, ``t[..] = v``) and ``Tensor.contiguous`` ask for a CUDA device guard, which a
  CPU-only build does not have: ``FakeCudaIndexing`` below routes them through the equivalent aten ops (select /
  slice / unsqueeze / index / copy_ / clone), which fake tensors handle.
* Autograd on CUDA tensors needs the CUDA device guard too (the engine's device threads): the fake-CUDA part runs
  under ``torch.no_grad()`` - the forwards of the rollout, old-log-prob and reference passes, the losses' values,
  the optimizer step and the grad-norm clip - and the backward runs on the ``meta`` device instead, which has the
  same rule (a meta tensor meeting a CPU tensor raises) and runs autograd: forward, losses, backward, clip and
  optimizer step there.
* Data-dependent calls cannot run on either (no values): ``.item()`` / ``float(t)`` / ``.tolist()`` /
  ``nonzero`` / boolean-mask indexing. Not covered here, each a host-device sync on a GPU:
  ``trunk.is_right_padded`` (the padding-mask choice of every forward with an attention mask: the test passes
  position ids instead), the metrics ``update._micro_loss`` and ``mtp_loss`` read with ``float()``,
  ``optim.clip_and_check``'s ``float(norm)`` (its norm and clip run here without it), ``trim_padding`` /
  ``split_by_tokens`` (lengths read on the host), the chunked head's selection of the scored rows
  (``hidden[mask]`` in ``model.head.token_scores``: the head itself runs here on given rows) and the rollout
  engine's step (``engine.py``, ``#26``).
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode

from mtprl.algorithms import aggregate_loss, entropy_from_logits, logprobs_from_logits
from mtprl.algorithms.kl import kl_loss
from mtprl.algorithms.policy_loss import policy_loss
from mtprl.config.schema import OptimConfig
from mtprl.model import CausalLM, ModelConfig
from mtprl.trainer.optim import build_optimizer, build_scheduler

aten = torch.ops.aten
CFG = ModelConfig.tiny(vocab_size=64, hidden_size=32, intermediate_size=64, num_mtp_layers=1,
                       max_position_embeddings=128)


def _index(x: torch.Tensor, idx) -> torch.Tensor:
    """``x[idx]`` through aten ops (basic indexing: ints, slices, None, Ellipsis; tensors as advanced indices)."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(i is Ellipsis for i in idx):
        k = idx.index(Ellipsis)
        used = sum(1 for i in idx if i is not None and i is not Ellipsis)
        idx = idx[:k] + (slice(None),) * (x.dim() - used) + idx[k + 1:]
    out, dim, advanced = x, 0, {}
    for i in idx:
        if i is None:
            out, dim = aten.unsqueeze.default(out, dim), dim + 1
        elif isinstance(i, bool):
            raise NotImplementedError("bool index")
        elif isinstance(i, int):
            out = aten.select.int(out, dim, i)
        elif isinstance(i, slice):
            out, dim = aten.slice.Tensor(out, dim, i.start, i.stop, i.step or 1), dim + 1
        elif isinstance(i, torch.Tensor):
            if i.dtype == torch.bool:
                raise NotImplementedError("boolean-mask indexing is data-dependent")
            advanced[dim], dim = i, dim + 1
        else:
            raise NotImplementedError(f"index {type(i)}")
    if advanced:
        out = aten.index.Tensor(out, [advanced.get(d) for d in range(max(advanced) + 1)])
    return out


class FakeCudaIndexing(TorchFunctionMode):
    """Python indexing of fake tensors through aten ops (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__ and isinstance(args[0], FakeTensor):
            return _index(*args)
        if func is torch.Tensor.__setitem__ and isinstance(args[0], FakeTensor):
            x, idx, value = args
            if not isinstance(value, torch.Tensor):
                value = aten.full.default([], value, dtype=x.dtype, device=x.device)
            if any(isinstance(i, torch.Tensor) for i in (idx if isinstance(idx, tuple) else (idx,))):
                raise NotImplementedError("advanced index assignment")
            aten.copy_.default(_index(x, idx), value)
            return None
        if func is torch.Tensor.contiguous and isinstance(args[0], FakeTensor):  # (decompositions call it)
            return args[0] if args[0].is_contiguous() else aten.clone.default(args[0],
                                                                                memory_format=torch.contiguous_format)
        return func(*args, **kwargs)


def _to_device(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """Every parameter and buffer replaced by an empty one on ``device`` (under the active fake mode)."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                                              requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)
    return model


@pytest.fixture
def fake_cuda():
    if torch.version.cuda is not None and not torch.cuda.is_available():
        pytest.skip("a CUDA build of torch without a GPU driver cannot make fake CUDA tensors (the CPU build can)")
    with FakeTensorMode(allow_non_fake_inputs=False), FakeCudaIndexing():
        yield torch.device("cuda", 0)


def test_the_fake_device_catches_a_cpu_tensor(fake_cuda):
    """The harness itself: a tensor made without device= meets a CUDA one and fails, as on a GPU."""
    x = torch.ones(3, device=fake_cuda)
    with pytest.raises(RuntimeError, match="devices? cuda:0, cpu|device"):  # FakeTensorDeviceMismatchError (torch 2.9+)
        x + torch.ones(3)
    assert x[None, 1:].shape == (1, 2) and x[torch.tensor([0, 2], device=fake_cuda)].device == fake_cuda


def _batch(device, b=2, t=10):
    ids = torch.randint(0, CFG.vocab_size, (b, t), device=device)
    positions = torch.arange(t, device=device)[None].expand(b, t)
    mask = torch.ones(b, t, device=device)
    return ids, positions, mask


def _losses(model, ids, positions, mask, recursive=2):
    """The policy update's losses on a forward: sampled tokens' log-probs, entropy, DAPO policy loss with KL, and
    the MTP cross-entropy per depth (the maths of update._micro_loss without its float() metrics)."""
    out = model(ids, position_ids=positions, mtp_recursive_steps=recursive)
    logits = out.logits[:, :-1].contiguous()  # (a decomposition's own contiguous() would need the device guard)
    logp = logprobs_from_logits(logits, ids[:, 1:])
    entropy = entropy_from_logits(logits, chunk_size=4)
    resp = mask[:, 1:]
    pg, pg_metrics = policy_loss(logp.detach(), logp, torch.ones_like(logp), resp, 0.2, 0.28, 10.0, "token-mean")
    loss = pg + kl_loss(logp, logp.detach(), resp, "low_var_kl") - 0.01 * aggregate_loss(entropy, resp, "token-mean")
    for k, logits in enumerate(out.mtp_logits, start=1):
        target = ids[:, k + 1:]
        mtp_logp = torch.log_softmax(logits[:, : ids.shape[1] - k - 1].float().contiguous(), -1)
        loss = loss - 0.1 * mtp_logp.gather(-1, target[..., None]).mean()
    return loss, out, pg_metrics


def test_forward_losses_optimizer_step_on_fake_cuda(fake_cuda):
    model = _to_device(CausalLM(CFG), "cuda")
    ids, positions, mask = _batch(fake_cuda)
    with torch.no_grad():
        loss, out, pg_metrics = _losses(model, ids, positions, mask)
    assert loss.device == fake_cuda and out.logits.shape == (2, 10, 64) and len(out.mtp_logits) == 2
    assert all(v.device == fake_cuda for v in pg_metrics.values())
    optim = OptimConfig(lr=1e-3, weight_decay=0.1)
    optimizer = build_optimizer(model, optim, mtp_lr=1e-2)
    scheduler = build_scheduler(optimizer, optim, total_steps=10)
    with torch.no_grad():
        for p in model.parameters():
            p.grad = torch.empty_like(p)
        params = list(model.parameters())
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        torch.nn.utils.clip_grads_with_norm_(params, 1.0, norm)
    assert norm.device == fake_cuda
    optimizer.step()
    scheduler.step()
    state = optimizer.state[model.embed_tokens.weight]
    assert state["exp_avg"].device == fake_cuda and state["exp_avg_sq"].device == fake_cuda


def _head_scores(device, mode, entropy):
    """The chunked head (model.head.linear_scores, what CausalLM.forward(scoring=...) runs on the scored rows) in
    chunks of 3 rows: log-probs or KL / TV to reference rows, with an entropy."""
    from mtprl.model.head import linear_scores

    weight = torch.empty(CFG.vocab_size, CFG.hidden_size, device=device, requires_grad=device != "cuda")
    hidden = torch.empty(7, CFG.hidden_size, device=device, requires_grad=device != "cuda")
    targets = torch.zeros(7, dtype=torch.long, device=device)
    ref = dict(ref_hidden=torch.empty(7, CFG.hidden_size, device=device), ref_weight=weight) if mode != "logprob" else {}
    score, ent, correct = linear_scores(hidden, weight, targets, mode=mode, temperature=0.7, entropy=entropy,
                                        want_correct=True, chunk_size=3, **ref)
    return hidden, weight, score, ent, correct


@pytest.mark.parametrize("mode", ["logprob", "kl", "tv"])
def test_chunked_head_on_fake_cuda(fake_cuda, mode):
    with torch.no_grad():
        _, _, score, ent, correct = _head_scores("cuda", mode, "detached")
    assert score.device == ent.device == correct.device == fake_cuda and score.shape == (7,)


@pytest.mark.parametrize("mode, entropy", [("logprob", "grad"), ("kl", "detached"), ("tv", "none")])
def test_chunked_head_backward_on_the_meta_device(mode, entropy):
    """The chunked head's own backward (each chunk's logits recomputed) makes its tensors on the input's device."""
    hidden, weight, score, ent, _ = _head_scores("meta", mode, entropy)
    (score.sum() + (ent.sum() if entropy == "grad" else 0)).backward()
    assert hidden.grad.is_meta and weight.grad.is_meta and hidden.grad.shape == hidden.shape


def test_forward_backward_and_step_on_the_meta_device():
    """Autograd does not run on fake CUDA on a CPU-only build: the same step with its backward on ``meta``, which
    refuses a CPU tensor just as CUDA does."""
    with torch.device("meta"):
        model = CausalLM(CFG)
    with pytest.raises(RuntimeError, match="device"):
        torch.ones(3, device="meta") + torch.ones(3)
    ids, positions, mask = _batch("meta")
    loss, _, _ = _losses(model, ids, positions, mask)
    loss.backward()
    assert model.embed_tokens.weight.grad.is_meta and model.mtp_layers[0].input_proj.weight.grad.is_meta
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3), None)
    params = [p for p in model.parameters() if p.grad is not None]
    torch.nn.utils.clip_grads_with_norm_(params, 1.0, torch.nn.utils.get_total_norm([p.grad for p in params]))
    optimizer.step()
