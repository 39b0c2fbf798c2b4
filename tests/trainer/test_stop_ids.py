"""Rollout and validation stop at every eos id of the policy: the tokenizer's, config.json's and
generation_config.json's (verl's rollouts take the generation config's; Qwen / MiMo base tokenizers end
with <|endoftext|> where a chat turn ends with <|im_end|>)."""

import json
import shutil

import torch

from mtprl.config import load_config
from mtprl.rollout import Engine, SamplingParams
from mtprl.trainer.policy import load_policy, load_policy_tokenizer
from mtprl.trainer.samples import sampling_params


def test_sampling_params_stop_at_the_generation_config_eos(tiny_world, tmp_path):
    model_dir = tmp_path / "policy"
    shutil.copytree(tiny_world.model, model_dir)  # (the session's policy stays as it is)
    cfg = load_config(None, [f"data.train_files={tiny_world.data.train}", f"data.val_files={tiny_world.data.val}",
                             f"actor_rollout_ref.model.path={model_dir}", "data.max_response_length=10",
                             "actor_rollout_ref.rollout.val_kwargs.temperature=0"])
    tok = load_policy_tokenizer(cfg.actor_rollout_ref.model)
    model = load_policy(cfg.actor_rollout_ref.model, torch.device("cpu")).eval()
    prompt = [tok.bos_token_id or 1, 5, 6, 7]
    engine = Engine(model, max_num_seqs=1, max_seq_len=32)
    gen = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=10))[0].token_ids
    cut = next(i for i in range(2, len(gen)) if gen[i] not in gen[:i] and gen[i] != tok.eos_token_id)
    assert sampling_params(cfg, tok).stop_token_ids == (tok.eos_token_id,)  # no eos in this config.json
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [gen[cut], tok.eos_token_id]}))
    for validation in (False, True):
        params = sampling_params(cfg, tok, validation=validation)
        assert params.stop_token_ids == (tok.eos_token_id, gen[cut])
    out = engine.generate([prompt], params)[0]  # validation: greedy (val_kwargs.temperature=0)
    assert out.token_ids == gen[:cut + 1] and out.finish_reason == "stop"
