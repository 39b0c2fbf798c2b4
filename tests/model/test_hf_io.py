"""Checkpoint IO: round trips, shards, MiMo names (checked against transformers' Qwen2 modules), fresh MTP layers."""

import json

import pytest
import torch

from mtprl.model import CausalLM, ModelConfig, from_pretrained
from mtprl.model.hf_io.keymaps import from_hf_name, to_hf_name

TOL = dict(atol=1e-5, rtol=1e-5)


def _assert_same_model(a: CausalLM, b: CausalLM) -> None:
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


def _tiny_mimo(seed: int = 0, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig.tiny(**overrides)).eval()
    with torch.no_grad():  # random norms and biases too, so that every tensor matters
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def test_load_save_load_is_bit_exact(hf_case, hf_checkpoints, tmp_path):
    first = from_pretrained(hf_checkpoints[hf_case])
    first.save_pretrained(tmp_path / "a")
    second = from_pretrained(tmp_path / "a")
    _assert_same_model(first, second)
    second.save_pretrained(tmp_path / "b")
    assert json.loads((tmp_path / "a/config.json").read_text()) == json.loads((tmp_path / "b/config.json").read_text())


def test_mimo_round_trip_sharded_and_bf16(tmp_path):
    model = _tiny_mimo()
    model.save_pretrained(tmp_path / "single")
    first = from_pretrained(tmp_path / "single")
    first.save_pretrained(tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded/model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert any(k.startswith("model.mtp_layers.1.self_attn.") for k in index["weight_map"])
    _assert_same_model(first, from_pretrained(tmp_path / "sharded"))
    # saving single-file into the sharded dir removes the stale index
    first.save_pretrained(tmp_path / "sharded")
    assert not (tmp_path / "sharded/model.safetensors.index.json").exists()
    bf16 = from_pretrained(tmp_path / "single", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    bf16.save_pretrained(tmp_path / "bf16")
    _assert_same_model(bf16, from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16))
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(bf16(ids).logits.float(), first(ids).logits, atol=0.1, rtol=0.1)


@torch.no_grad()
def test_transformers_sharded_checkpoint_loads(hf_checkpoints, tmp_path):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_checkpoints["llama_untied"]).eval()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = from_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 16))
    torch.testing.assert_close(ours(ids).logits, hf(input_ids=ids).logits, **TOL)


@torch.no_grad()
def test_mimo_save_loads_in_transformers_qwen2_with_equal_trunk_logits(tmp_path):
    import transformers

    model = _tiny_mimo()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mimo" and config["architectures"] == ["MiMoForCausalLM"]
    assert config["num_nextn_predict_layers"] == 2
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 128, (3, 20))
    torch.testing.assert_close(hf(input_ids=ids).logits, model(ids).logits, **TOL)


def _mimo_reference_mtp_logits(hf_trunk, mtp_state: dict, ids: torch.Tensor, depth_count: int) -> list:
    """MiMo's MiMoMTPLayers.forward written with transformers' Qwen2 modules (slow reference):
    h' = input_proj(cat[hidden_layernorm(h), token_layernorm(emb(ids shifted by k))]); block; final_layernorm."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm

    cfg = hf_trunk.config
    out = hf_trunk(input_ids=ids, output_hidden_states=True)
    hidden = out.hidden_states[-1]  # after the final norm
    pos = torch.arange(ids.shape[1])[None]
    rope = hf_trunk.model.rotary_emb(hidden, pos)
    logits = []
    for k in range(depth_count):
        layer = Qwen2DecoderLayer(cfg, layer_idx=0).eval()
        norms = {n: Qwen2RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps) for n in
                 ("token_layernorm", "hidden_layernorm", "final_layernorm")}
        proj = torch.nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        prefix = f"model.mtp_layers.{k}."
        layer.load_state_dict({n[len(prefix):]: t for n, t in mtp_state.items() if n.startswith(prefix)
                               and n[len(prefix):].split(".")[0] in ("self_attn", "mlp", "input_layernorm",
                                                                     "post_attention_layernorm")})
        for n, norm in norms.items():
            norm.weight.data.copy_(mtp_state[prefix + n + ".weight"])
        proj.weight.data.copy_(mtp_state[prefix + "input_proj.weight"])
        shifted = torch.roll(ids, -(k + 1), dims=1)
        emb = hf_trunk.model.embed_tokens(shifted)
        x = proj(torch.cat([norms["hidden_layernorm"](hidden), norms["token_layernorm"](emb)], -1))
        hidden = norms["final_layernorm"](layer(x, attention_mask=None, position_ids=pos, position_embeddings=rope))
        logits.append(hf_trunk.lm_head(hidden))
    return logits


@torch.no_grad()
def test_mtp_logits_match_mimo_reference_built_from_transformers_modules(tmp_path):
    import transformers
    from safetensors.torch import load_file

    model = _tiny_mimo(seed=3)
    model.save_pretrained(tmp_path)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 128, (2, 15), generator=torch.Generator().manual_seed(9))
    ref = _mimo_reference_mtp_logits(hf, load_file(str(tmp_path / "model.safetensors")), ids, 2)
    ours = model(ids).mtp_logits
    for k in range(2):
        valid = ids.shape[1] - (k + 1)  # positions whose input token exists
        torch.testing.assert_close(ours[k][:, :valid], ref[k][:, :valid], **TOL)


@torch.no_grad()
def test_fresh_mtp_layers_warm_start(hf_checkpoints, tmp_path):
    plain = from_pretrained(hf_checkpoints["qwen2_tied"])
    assert plain.config.num_mtp_layers == 0 and len(plain.mtp_layers) == 0
    model = from_pretrained(hf_checkpoints["qwen2_tied"], num_mtp_layers=2)
    h = model.config.hidden_size
    for k in range(2):
        layer = model.mtp_layers[k]
        torch.testing.assert_close(layer.input_proj.weight[:, :h], torch.eye(h), atol=0, rtol=0)
        assert torch.count_nonzero(layer.input_proj.weight[:, h:]) == 0
        assert torch.equal(layer.hidden_layernorm.weight, torch.ones(h))
        assert torch.equal(layer.final_layernorm.weight, model.norm.weight)
        for name, param in layer.block.named_parameters():
            assert torch.equal(param, model.layers[-1].get_parameter(name)), name
    ids = torch.randint(0, 128, (2, 10))
    out = model(ids)
    torch.testing.assert_close(out.logits, plain(ids).logits, atol=0, rtol=0)
    assert len(out.mtp_logits) == 2 and all(torch.isfinite(x).all() for x in out.mtp_logits)
    # saved with MiMo names next to the qwen2 trunk; qwen2 model_type kept; reload gives the same model
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["num_nextn_predict_layers"] == 2
    _assert_same_model(model, from_pretrained(tmp_path))
    # a third layer is a copy of the checkpoint's last MTP layer; fewer layers drop the extra ones
    three = from_pretrained(tmp_path, num_mtp_layers=3)
    for (n2, p2), (n1, p1) in zip(three.mtp_layers[2].named_parameters(), three.mtp_layers[1].named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert from_pretrained(tmp_path, num_mtp_layers=1).config.num_mtp_layers == 1


def test_key_maps_round_trip_every_parameter_name():
    model = CausalLM(ModelConfig.tiny(model_type="qwen3", qk_norm=True, attention_bias=True, attention_out_bias=True))
    for name in model.state_dict():
        assert from_hf_name(to_hf_name(name)) == name
    assert to_hf_name("mtp_layers.1.block.self_attn.q_norm.weight") == "model.mtp_layers.1.self_attn.q_norm.weight"
    assert from_hf_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None


def test_bad_checkpoints_raise(hf_checkpoints, tmp_path):
    with pytest.raises(ValueError, match="missing.*: no such directory"):
        from_pretrained(tmp_path / "missing")
    source = json.loads((hf_checkpoints["llama_untied"] / "config.json").read_text())
    cases = [({"model_type": "gpt2"}, "model_type"),
             ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "rope_type"),
             ({"hidden_act": "gelu"}, "hidden_act"),
             ({"use_sliding_window": True}, "sliding")]
    for i, (change, match) in enumerate(cases):
        path = tmp_path / f"bad{i}"
        path.mkdir()
        (path / "config.json").write_text(json.dumps({**source, **change}))
        with pytest.raises(ValueError, match=match):
            from_pretrained(path)
    (tmp_path / "bad0/config.json").write_text(json.dumps(source))
    with pytest.raises(ValueError, match="safetensors"):
        from_pretrained(tmp_path / "bad0")
