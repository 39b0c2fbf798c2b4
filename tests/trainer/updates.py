"""Helpers shared by the actor-update tests (imported as ``tests.trainer.updates``; not a test module): a random
TrainBatch, the small update config, and the parameter change of one SGD(lr=1) update."""

import copy

import torch

from mtprl.config import load_config
from mtprl.config.schema import MtprlConfig
from mtprl.trainer.update import TrainBatch, actor_update


def train_batch(n=6, prompt=3, vocab=64, seed=0, *, lengths=None, min_len=1, max_len=6,
                shared_prompts=False) -> TrainBatch:
    """n right-padded samples of a ``prompt``-token prompt and a response of ``lengths`` tokens (default: random in
    min_len..max_len), group ids 0, 0, 1, 1, ...; advantages = the sample's random score on its response tokens.
    shared_prompts: the two samples of a group share their prompt (as rollout.n = 2 makes them)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g) if lengths is None else torch.tensor(lengths)
    width = prompt + int(lengths.max())
    if shared_prompts:
        prompts = torch.randint(1, vocab, (n // 2, prompt), generator=g).repeat_interleave(2, 0)
        ids = torch.cat([prompts, torch.randint(1, vocab, (n, width - prompt), generator=g)], 1)
    else:
        ids = torch.randint(1, vocab, (n, width), generator=g)
    attn = (torch.arange(width)[None] < (prompt + lengths)[:, None]).long()
    resp = attn.clone()
    resp[:, :prompt] = 0
    scores = torch.randn(n, generator=g)
    return TrainBatch(ids * attn, attn, resp, torch.arange(n) // 2, scores, torch.zeros(n, width),
                      advantages=(scores[:, None] * resp).float())


def update_cfg(*extra: str) -> MtprlConfig:
    """3 prompts x rollout.n 2 = one mini-batch of 6 samples, MTP trained, no gradient clipping in effect; prompts
    up to 4 tokens, responses up to 6 (``extra`` overrides any of these)."""
    return load_config(None, ["actor_rollout_ref.rollout.n=2", "data.train_batch_size=3",
                              "actor_rollout_ref.actor.ppo_mini_batch_size=3",
                              "actor_rollout_ref.model.mtp.enable=True", "actor_rollout_ref.model.mtp.enable_train=True",
                              "actor_rollout_ref.actor.optim.clip_grad=1e9", "data.max_prompt_length=4",
                              "data.max_response_length=6", *extra])


def sgd_delta(model, batch: TrainBatch, cfg: MtprlConfig) -> tuple[dict[str, torch.Tensor], dict[str, float], int]:
    """(before - after for every parameter of one actor update with SGD(lr=1) on a copy of ``model``: minus the
    update's gradient, summed over its optimizer steps; the update's metrics; its skipped optimizer steps)."""
    model = copy.deepcopy(model)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    metrics, skipped = actor_update(model, torch.optim.SGD(model.parameters(), lr=1.0), batch, cfg,
                                    torch.Generator().manual_seed(0))
    return {k: before[k] - v.detach() for k, v in model.named_parameters()}, metrics, skipped
