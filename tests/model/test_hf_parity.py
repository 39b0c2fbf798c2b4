"""Our logits == transformers' logits for checkpoints transformers wrote (fp32, 1e-5), padded batches included."""

import json

import pytest
import torch

from mtprl.model import from_pretrained

TOL = dict(atol=1e-5, rtol=1e-5)


def _padded_batch(vocab: int, left: bool):
    """Three rows of lengths 23, 9, 30 padded to 30 on the left or the right; returns ids, mask, position_ids."""
    gen = torch.Generator().manual_seed(11)
    lengths, t = [23, 9, 30], 30
    ids = torch.zeros(3, t, dtype=torch.long)
    mask = torch.zeros(3, t, dtype=torch.long)
    for r, n in enumerate(lengths):
        sl = slice(t - n, t) if left else slice(0, n)
        ids[r, sl] = torch.randint(0, vocab, (n,), generator=gen)
        mask[r, sl] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, position_ids


@torch.no_grad()
def test_logits_equal_transformers_on_padded_batches(hf_case, hf_checkpoints):
    import transformers

    case = hf_case
    path = hf_checkpoints[case]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = from_pretrained(path)
    assert ours.config.tie_word_embeddings == (case == "qwen2_tied")
    for left in (False, True):
        ids, mask, pos = _padded_batch(ours.config.vocab_size, left)
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, position_ids=pos, attention_mask=mask).logits
        real = mask.bool()
        torch.testing.assert_close(got[real], ref[real], **TOL)
        # default position_ids for a padded batch are cumsum(mask) - 1
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits[real], ref[real], **TOL)
    # long positions (RoPE scaling matters past original_max_position_embeddings)
    ids = torch.randint(0, ours.config.vocab_size, (1, 200), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours(ids).logits, hf(input_ids=ids).logits, **TOL)


@pytest.mark.parametrize("case", ["qwen2_tied", "llama3_rope_bias", "qwen3_qknorm"])
@torch.no_grad()
def test_our_save_is_loaded_by_transformers_with_equal_logits(case, hf_checkpoints, tmp_path):
    import transformers

    ours = from_pretrained(hf_checkpoints[case])
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    source = json.loads((hf_checkpoints[case] / "config.json").read_text())
    assert saved["architectures"] == source["architectures"] and saved["model_type"] == source["model_type"]
    assert (tmp_path / "tokenizer_config.json").read_text() == '{"model_max_length": 512}\n'
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 80), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(hf(input_ids=ids).logits, ours(ids).logits, **TOL)
