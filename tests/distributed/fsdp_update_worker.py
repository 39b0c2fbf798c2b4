"""One rank of the FSDP2 parity test: 3 DAPO updates (MTP loss on, dynamic batch size on) of a tiny
model on fixed global batches; the full parameters are written to argv[1] by rank 0."""

import sys

import torch

from mtprl.config import load_config
from mtprl.distributed.env import destroy_distributed, init_distributed
from mtprl.distributed.parallelize import apply_fsdp, full_state_dict
from mtprl.model import CausalLM, ModelConfig
from mtprl.trainer.update import TrainBatch, actor_update, compute_logprobs

torch.set_num_threads(1)


def batch(step: int, n: int = 8, prompt: int = 3, vocab: int = 64) -> TrainBatch:
    g = torch.Generator().manual_seed(100 + step)
    lengths = torch.randint(1, 9, (n,), generator=g)
    width = prompt + int(lengths.max())
    ids = torch.randint(1, vocab, (n, width), generator=g)
    attn = torch.zeros(n, width, dtype=torch.long)
    resp = torch.zeros(n, width, dtype=torch.long)
    for i, r in enumerate(lengths.tolist()):
        attn[i, : prompt + r] = 1
        resp[i, prompt: prompt + r] = 1
    scores = torch.randn(n, generator=g)
    return TrainBatch(ids * attn, attn, resp, torch.arange(n) // 2, scores, torch.zeros(n, width),
                      advantages=(scores[:, None] * resp).float())


def main(out_path: str) -> None:
    env = init_distributed("cpu", timeout_s=120)
    cfg = load_config(None, ["actor_rollout_ref.rollout.n=2", "data.train_batch_size=4",
                             "actor_rollout_ref.actor.ppo_mini_batch_size=2", "actor_rollout_ref.actor.shuffle=True",
                             "actor_rollout_ref.model.mtp.enable=True", "actor_rollout_ref.model.mtp.enable_train=True",
                             "actor_rollout_ref.actor.use_dynamic_bsz=True",
                             "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=24",
                             "actor_rollout_ref.actor.optim.clip_grad=0.5",
                             "data.max_prompt_length=4", "data.max_response_length=8"])
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.tiny(vocab_size=64, num_mtp_layers=2))
    dp = env if env.distributed else None
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if dp is not None:
        apply_fsdp(model, env)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        b = batch(step)
        b.old_logprobs = compute_logprobs(model, b, cfg, dp=dp) + 0.05 * b.response_mask
        metrics, skipped = actor_update(model, opt, b, cfg, gen, dp=dp)
        assert skipped == 0
    state = full_state_dict(model)
    if env.is_main:
        torch.save({"state": state, "initial": initial, "metrics": metrics}, out_path)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
