"""mtp_loss on a hand-computed tiny case; gradient routing of detach_encoder / detach_head."""

import math

import pytest
import torch

from mtprl.model import CausalLM, ModelConfig, mtp_loss, mtp_valid_counts

LN2, LN3 = math.log(2.0), math.log(3.0)
GARBAGE = [50.0, -50.0, 7.0]  # values at positions that must not count


def _case():
    """B=1, T=4, V=3, D=2. ids = [0, 1, 2, 1], loss_mask = [0, 1, 1, 1].
    Depth 1 counts i=0 (target ids[2]=2) and i=1 (target ids[3]=1); depth 2 counts i=0 (target ids[3]=1)."""
    ids = torch.tensor([[0, 1, 2, 1]])
    loss_mask = torch.tensor([[0, 1, 1, 1]])
    d1 = torch.tensor([[[0.0, 0.0, LN2],   # p = [1/4, 1/4, 1/2], target 2: CE = ln 2, argmax hit
                        [0.0, 0.0, 0.0],   # p = uniform, target 1: CE = ln 3, argmax 0 -> miss
                        GARBAGE, GARBAGE]])
    d2 = torch.tensor([[[0.0, LN3, 0.0],   # p = [1/5, 3/5, 1/5], target 1: CE = ln(5/3), hit
                        GARBAGE, GARBAGE, GARBAGE]])
    trunk = torch.tensor([[GARBAGE,
                           [0.0, 0.0, LN2],  # position 1 predicts ids[2]: same as depth 1 @ i=0
                           [LN2, 0.0, 0.0],  # position 2 predicts ids[3]: p = [1/2, 1/4, 1/4]
                           GARBAGE]])
    return [d1, d2], ids, loss_mask, trunk


def test_ce_hand_computed():
    logits, ids, loss_mask, _ = _case()
    loss, metrics = mtp_loss(logits, ids, loss_mask, scaling_factor=0.1)
    mean1, mean2 = (LN2 + LN3) / 2, math.log(5 / 3)  # 0.895880, 0.510826
    assert loss.item() == pytest.approx(0.1 / 2 * (mean1 + mean2), abs=1e-6)  # 0.0703353
    assert loss.item() == pytest.approx(0.0703353, abs=1e-6)
    assert metrics["mtp_losses/mtp_1_loss"] == pytest.approx(mean1, abs=1e-6)
    assert metrics["mtp_losses/mtp_2_loss"] == pytest.approx(mean2, abs=1e-6)
    assert metrics["mtp/acc_1"] == pytest.approx(0.5)
    assert metrics["mtp/acc_2"] == pytest.approx(1.0)


def test_kl_and_tv_hand_computed():
    logits, ids, loss_mask, trunk = _case()
    # depth 1: i=0 identical to trunk@1 (KL = TV = 0); i=1: p_trunk = [1/2,1/4,1/4] vs uniform
    kl11 = 0.5 * math.log(1.5) + 0.5 * math.log(0.75)  # 0.058892
    tv11 = 0.5 * (1 / 6 + 2 * (1 / 12))  # 1/6
    # depth 2: i=0, p_trunk@2 = [1/2,1/4,1/4] vs [1/5,3/5,1/5]
    kl2 = 0.5 * math.log(2.5) + 0.25 * math.log(5 / 12) + 0.25 * math.log(1.25)  # 0.295064
    tv2 = 0.5 * (0.3 + 0.35 + 0.05)  # 0.35
    kl, m_kl = mtp_loss(logits, ids, loss_mask, loss_type="kl", trunk_logits=trunk)
    tv, m_tv = mtp_loss(logits, ids, loss_mask, loss_type="tv", trunk_logits=trunk)
    assert kl.item() == pytest.approx(0.05 * ((0 + kl11) / 2 + kl2), abs=1e-6)  # 0.0162255
    assert tv.item() == pytest.approx(0.05 * ((0 + tv11) / 2 + tv2), abs=1e-6)  # 0.0216667
    assert m_kl["mtp_losses/mtp_2_loss"] == pytest.approx(kl2, abs=1e-6)
    assert m_tv["mtp_losses/mtp_1_loss"] == pytest.approx(tv11 / 2, abs=1e-6)
    assert m_tv["mtp/acc_1"] == pytest.approx(0.5)  # accuracy is always against the actual token


def test_kl_does_not_send_gradient_to_trunk_logits():
    logits, ids, loss_mask, trunk = _case()
    logits = [x.clone().requires_grad_() for x in logits]
    trunk = trunk.clone().requires_grad_()
    loss, _ = mtp_loss(logits, ids, loss_mask, loss_type="kl", trunk_logits=trunk)
    loss.backward()
    assert trunk.grad is None
    assert logits[1].grad[0, 0].abs().sum() > 0 and logits[1].grad[0, 1:].abs().sum() == 0


def test_short_sequences_and_attention_mask():
    logits, ids, loss_mask, _ = _case()
    # T=2: no depth has a target inside the sequence -> loss exactly 0, finite gradient
    short = [x[:, :2].clone().requires_grad_() for x in logits]
    loss, metrics = mtp_loss(short, ids[:, :2], loss_mask[:, :2])
    loss.backward()
    assert loss.item() == 0.0 and metrics["mtp/acc_1"] == 0.0
    assert all(torch.isfinite(x.grad).all() for x in short)
    # attention_mask removes input position 0: only depth 1 @ i=1 counts
    attention_mask = torch.tensor([[0, 1, 1, 1]])
    loss, metrics = mtp_loss(logits, ids, loss_mask, attention_mask=attention_mask, scaling_factor=1.0)
    assert loss.item() == pytest.approx(LN3 / 2, abs=1e-6)
    assert metrics["mtp_losses/mtp_2_loss"] == 0.0


def test_bad_arguments_raise():
    logits, ids, loss_mask, _ = _case()
    with pytest.raises(ValueError, match="trunk_logits"):
        mtp_loss(logits, ids, loss_mask, loss_type="kl")
    with pytest.raises(ValueError, match="loss_type"):
        mtp_loss(logits, ids, loss_mask, loss_type="mse")
    with pytest.raises(ValueError, match="empty"):
        mtp_loss([], ids, loss_mask)


def test_batch_counts_make_the_parts_add_up_to_the_whole():
    """Split over parts, each part's loss with the whole batch's per-depth counts sums to the whole batch's
    loss, metrics too. Weighting the parts' own means by their share of loss tokens would not: row 1's first
    response token (position 2) counts at depth 1 but not at depth 2 (its anchor would be position -1)."""
    logits, ids, loss_mask, _ = _case()  # row 0: the hand-computed case (3 loss tokens; 2 counted at depth 1)
    ids = torch.cat([ids, torch.tensor([[2, 0, 1, 2]])])
    loss_mask = torch.cat([loss_mask, torch.tensor([[0, 0, 1, 1]])])
    gen = torch.Generator().manual_seed(0)
    logits = [torch.cat([x, torch.randn(1, 4, 3, generator=gen)]) for x in logits]
    assert mtp_valid_counts(loss_mask, 2) == [2 + 2, 1 + 1]  # hand count: depth 1 i=0,1 | i=0,1; depth 2 i=0 | i=0
    assert mtp_valid_counts(loss_mask, 2, torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])) == [2 + 1, 1 + 0]
    whole, whole_m = mtp_loss(logits, ids, loss_mask, scaling_factor=1.0)
    counts = mtp_valid_counts(loss_mask, 2)
    parts = [mtp_loss([x[r:r + 1] for x in logits], ids[r:r + 1], loss_mask[r:r + 1], scaling_factor=1.0,
                      num_valid=counts) for r in (0, 1)]
    assert sum(p[0] for p in parts).item() == pytest.approx(whole.item(), abs=1e-6)
    for k, v in whole_m.items():
        assert parts[0][1][k] + parts[1][1][k] == pytest.approx(v, abs=1e-6), k
    with pytest.raises(ValueError, match="num_valid"):
        mtp_loss(logits, ids, loss_mask, num_valid=[1])


def _grads_after_mtp_loss(tied: bool, detach_encoder: bool, detach_head: bool) -> dict:
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.tiny(tie_word_embeddings=tied))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    out = model(ids, mtp_detach_encoder=detach_encoder, mtp_detach_head=detach_head)
    loss, _ = mtp_loss(out.mtp_logits, ids, torch.ones_like(ids))
    loss.backward()
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [False, True])
def test_detach_encoder_and_head_keep_mtp_loss_off_the_trunk(tied):
    grads = _grads_after_mtp_loss(tied, detach_encoder=True, detach_head=True)
    for name, grad in grads.items():
        if name.startswith("mtp_layers."):
            assert grad.abs().sum() > 0, f"MTP parameter {name} got no gradient"
        else:
            assert torch.count_nonzero(grad) == 0, f"trunk parameter {name} got gradient from the MTP loss"


def test_detach_encoder_only_trains_the_untied_head_and_no_detach_trains_the_trunk():
    grads = _grads_after_mtp_loss(tied=False, detach_encoder=True, detach_head=False)
    assert grads["lm_head.weight"].abs().sum() > 0
    assert torch.count_nonzero(grads["embed_tokens.weight"]) == 0
    assert torch.count_nonzero(grads["layers.0.self_attn.q_proj.weight"]) == 0
    grads = _grads_after_mtp_loss(tied=False, detach_encoder=False, detach_head=False)
    trunk_names = ("embed_tokens.weight", "layers.0.self_attn.q_proj.weight", "layers.1.mlp.down_proj.weight",
                   "norm.weight")
    for name in trunk_names:
        assert grads[name].abs().sum() > 0, name


def test_detach_encoder_alone_keeps_mtp_loss_off_a_tied_head():
    # tied: the head IS embed_tokens.weight, so detach_encoder must also detach the MTP path's head
    grads = _grads_after_mtp_loss(tied=True, detach_encoder=True, detach_head=False)
    for name, grad in grads.items():
        if name.startswith("mtp_layers."):
            assert grad.abs().sum() > 0, f"MTP parameter {name} got no gradient"
        else:
            assert torch.count_nonzero(grad) == 0, f"trunk / embedding parameter {name} got MTP gradient"


def test_detach_head_alone_with_tied_embeddings_still_trains_the_embedding_lookup():
    # detach_lm_head only stops the head path; the MTP layers' token lookup Emb(t_{i+k}) still trains the table
    grads = _grads_after_mtp_loss(tied=True, detach_encoder=False, detach_head=True)
    assert grads["embed_tokens.weight"].abs().sum() > 0
    assert grads["layers.0.self_attn.q_proj.weight"].abs().sum() > 0


# ----- recursive depths (mtp.recursive_steps): the last MTP layer reused on its own output -----------------------

def test_recursion_mask_hand_written():
    from mtprl.model.mtp import recursion_mask

    # n = 3 levels, T = 3 positions, index s*T + j. Query (s, j): level 0 at <= j - s, level u at j - (s - u).
    expected = torch.tensor([
        # level 0 keys | level 1 keys | level 2 keys
        [1, 0, 0, 0, 0, 0, 0, 0, 0],  # (0, 0)
        [1, 1, 0, 0, 0, 0, 0, 0, 0],  # (0, 1)
        [1, 1, 1, 0, 0, 0, 0, 0, 0],  # (0, 2)
        [0, 0, 0, 1, 0, 0, 0, 0, 0],  # (1, 0): no committed key, itself
        [1, 0, 0, 0, 1, 0, 0, 0, 0],  # (1, 1): level 0 at 0, itself
        [1, 1, 0, 0, 0, 1, 0, 0, 0],  # (1, 2)
        [0, 0, 0, 0, 0, 0, 1, 0, 0],  # (2, 0)
        [0, 0, 0, 1, 0, 0, 0, 1, 0],  # (2, 1): level 1 at 0, itself
        [1, 0, 0, 0, 1, 0, 0, 0, 1],  # (2, 2): level 0 at 0, level 1 at 1, itself
    ], dtype=torch.bool)
    assert torch.equal(recursion_mask(3, None, 3)[0, 0], expected)
    # a padding key (position 0 of row 1) is hidden from every query but itself
    padded = recursion_mask(3, torch.tensor([[1, 1, 1], [0, 1, 1]]), 3)
    assert torch.equal(padded[0, 0], expected)
    assert not padded[1, 0, 4, 0] and not padded[1, 0, 8, 0] and padded[1, 0, 0, 0] and padded[1, 0, 8, 4]


def _recursive_model(tied: bool = True, num_mtp_layers: int = 1):
    torch.manual_seed(0)
    return CausalLM(ModelConfig.tiny(tie_word_embeddings=tied, num_mtp_layers=num_mtp_layers))


def test_recursive_steps_add_depths_only_beyond_the_layers():
    model = _recursive_model(num_mtp_layers=2)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    plain = model(ids)
    for k in (0, 1, 2):
        assert len(model(ids, mtp_recursive_steps=k).mtp_logits) == 2
    out = model(ids, mtp_recursive_steps=4)
    assert len(out.mtp_logits) == len(out.mtp_hidden_states) == 4
    for a, b in zip(plain.mtp_logits, out.mtp_logits[:2]):  # the layers' own depths are unchanged
        torch.testing.assert_close(a, b)
    assert model(ids, compute_mtp=False, mtp_recursive_steps=4).mtp_logits == []


def test_recursive_depth_two_by_hand():
    # D = 1, T = 4: depth 2 at anchor a runs the layer at j = a + 1 on (h^1_a, Emb(t_{a+2})), attending to the
    # layer's ordinary keys at positions <= a and to itself. Rebuild that for anchor a = 1 from the pieces.
    from mtprl.model.trunk import AttnInputs

    model = _recursive_model()
    ids = torch.tensor([[5, 17, 42, 9]])
    out = model(ids, mtp_recursive_steps=2)
    layer, a = model.mtp_layers[0], 1
    emb = model.embed_tokens.weight
    x_ordinary = layer.project(out.hidden_states[:, : a + 1], emb[ids[:, 1:a + 2]])  # positions 0..a, tokens t_{j+1}
    x_draft = layer.project(out.mtp_hidden_states[0][:, a:a + 1], emb[ids[:, a + 2:a + 3]])  # position a+1
    pos = torch.tensor([[0, 1, a + 1]])
    cos, sin = model._rope(pos, x_draft.dtype)
    mask = torch.tensor([[True, False, False], [True, True, False], [True, True, True]])[None, None]
    h = layer.final_layernorm(layer.block(torch.cat([x_ordinary, x_draft], 1), AttnInputs(cos, sin, mask), 0))[:, -1]
    torch.testing.assert_close(out.mtp_hidden_states[1][:, a], h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.mtp_logits[1][:, a], h @ model.head_weight().T, atol=1e-5, rtol=1e-5)


def test_recursive_depths_ignore_left_padding():
    model = _recursive_model()
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    a = model(ids, mtp_recursive_steps=3)
    b = model(padded, attention_mask=mask, mtp_recursive_steps=3)
    for k in range(3):  # anchors whose target lies inside the sequence
        torch.testing.assert_close(a.mtp_logits[k][:, : 9 - k - 1], b.mtp_logits[k][:, 3: 12 - k - 1], atol=1e-5, rtol=1e-5)


def test_right_padding_runs_causal_attention_and_matches_unpadded_rows():
    """A right-padded batch drops the padding mask (plain causal attention: a real query's keys are all real);
    every depth at the real anchors, and the gradients of a loss over them, equal those of the rows alone."""
    from mtprl.model.trunk import is_right_padded

    assert is_right_padded(torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]]))
    assert not is_right_padded(torch.tensor([[1, 1, 1], [0, 1, 1]]))  # left padding keeps the mask
    assert not is_right_padded(torch.tensor([[1, 0, 1]]))
    model = _recursive_model()
    gen = torch.Generator().manual_seed(5)
    rows = [torch.randint(3, 128, (1, n), generator=gen) for n in (9, 6)]
    ids = torch.cat([rows[0], torch.cat([rows[1], torch.zeros(1, 3, dtype=torch.long)], 1)])
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])

    def loss_of(out, lengths):  # every depth at the anchors whose target is real
        return sum(out.mtp_logits[k][r, : n - k - 1].logsumexp(-1).sum() for k in range(3)
                   for r, n in enumerate(lengths)) + sum(out.logits[r, :n].logsumexp(-1).sum()
                                                          for r, n in enumerate(lengths))

    batch = model(ids, attention_mask=mask, mtp_recursive_steps=3)
    loss_of(batch, (9, 6)).backward()
    batch_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone = [model(r, mtp_recursive_steps=3) for r in rows]
    sum(loss_of(o, (r.shape[1],)) for o, r in zip(alone, rows)).backward()
    for r, (o, n) in enumerate(zip(alone, (9, 6))):
        torch.testing.assert_close(batch.logits[r, :n], o.logits[0], atol=1e-5, rtol=1e-5)
        for k in range(3):
            torch.testing.assert_close(batch.mtp_logits[k][r, : n - k - 1], o.mtp_logits[k][0, : n - k - 1],
                                       atol=1e-5, rtol=1e-5)
    assert all(torch.isfinite(x).all() for x in [batch.logits, *batch.mtp_logits])
    for got, want in zip(batch_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_recursive_depth_loss_counts_only_anchors_with_a_target():
    model = _recursive_model()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(3))
    loss_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 0]])
    out = model(ids, mtp_recursive_steps=3)
    logits = [x.detach().requires_grad_() for x in out.mtp_logits]
    loss, metrics = mtp_loss(logits, ids, loss_mask, scaling_factor=0.3)
    loss.backward()
    assert set(metrics) == {f"mtp_losses/mtp_{k}_loss" for k in (1, 2, 3)} | {f"mtp/acc_{k}" for k in (1, 2, 3)}
    for k in (1, 2, 3):  # depth k at anchor i counts iff i + k + 1 < T and loss_mask[i + k + 1]
        touched = logits[k - 1].grad.abs().sum(-1) > 0
        expected = torch.zeros_like(touched)
        expected[:, : 8 - k - 1] = loss_mask[:, k + 1:].bool()
        assert torch.equal(touched, expected), k
    per_depth = sum(metrics[f"mtp_losses/mtp_{k}_loss"] for k in (1, 2, 3))
    assert loss.item() == pytest.approx(0.3 / 3 * per_depth, rel=1e-5)  # lambda / K over the K trained depths


def test_recursive_depth_gradient_flows_back_through_the_recursion():
    model = _recursive_model()
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(4))
    out = model(ids, mtp_recursive_steps=3, mtp_detach_encoder=True)
    out.mtp_hidden_states[0].retain_grad()
    loss, _ = mtp_loss(out.mtp_logits[2:], ids, torch.ones_like(ids), scaling_factor=1.0)  # depth 3 alone
    loss.backward()
    # depth 3 reads h^1 only through depth 2's output (the layer's input hidden and the keys of its level), so
    # a gradient on h^1 is one that went back through the recursion (h^0 is detached here)
    assert out.mtp_hidden_states[0].grad.abs().sum() > 0


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("loss_type", ["ce", "kl", "tv"])
def test_recursive_depths_keep_detach_rules(tied, loss_type):
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.tiny(tie_word_embeddings=tied, num_mtp_layers=1))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    out = model(ids, mtp_detach_encoder=True, mtp_detach_head=True, mtp_recursive_steps=3)
    loss, _ = mtp_loss(out.mtp_logits[1:], ids, torch.ones_like(ids), loss_type=loss_type, trunk_logits=out.logits)
    loss.backward()  # the recursive depths alone
    for name, p in model.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        if name.startswith("mtp_layers."):
            assert grad.abs().sum() > 0, f"MTP parameter {name} got no gradient from the recursive depths"
        else:
            assert torch.count_nonzero(grad) == 0, f"trunk parameter {name} got gradient from the recursive depths"
    # without detach_encoder the recursive depths train the trunk too (through h^0 and the embedding lookup)
    model.zero_grad(set_to_none=True)
    out = model(ids, mtp_recursive_steps=3)
    mtp_loss(out.mtp_logits[1:], ids, torch.ones_like(ids), loss_type=loss_type, trunk_logits=out.logits)[0].backward()
    assert model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.embed_tokens.weight.grad.abs().sum() > 0
