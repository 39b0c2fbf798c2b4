"""Tiny random checkpoints written by transformers itself, shared by the model tests."""

import pytest
import torch

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)

# name -> (transformers class name, config kwargs)
HF_CASES = {
    "qwen2_tied": ("Qwen2", dict(tie_word_embeddings=True, rope_theta=1000.0)),
    "llama_untied": ("Llama", dict(tie_word_embeddings=False)),
    "qwen3_qknorm": ("Qwen3", dict(head_dim=16, tie_word_embeddings=False)),
    "llama3_rope_bias": ("Llama", dict(rope_scaling=LLAMA3_ROPE, attention_bias=True)),
    "qwen2_linear_rope": ("Qwen2", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
}


def make_hf_model(case: str, seed: int = 0):
    """A transformers model with every parameter random (biases and norm weights included), eval mode, fp32."""
    import transformers

    family, kwargs = HF_CASES[case]
    config = getattr(transformers, f"{family}Config")(**COMMON, **kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)
    return model


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """case -> directory of a checkpoint saved by transformers' save_pretrained (plus a tokenizer file)."""
    dirs = {}
    for case in HF_CASES:
        path = tmp_path_factory.mktemp(case)
        make_hf_model(case).save_pretrained(path)
        (path / "tokenizer_config.json").write_text('{"model_max_length": 512}\n')
        dirs[case] = path
    return dirs


@pytest.fixture(params=list(HF_CASES))
def hf_case(request):
    """Each HF_CASES name in turn."""
    return request.param
