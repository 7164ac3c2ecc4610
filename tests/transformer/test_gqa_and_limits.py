"""Grouped-query attention with four key/value groups per layer; no unit is ever left with zero channels."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from orprune.transformer import TransformerPruner, UnitUpdate, apply_updates, find_units, restore_widths
from tests.transformer.models import VOCAB, batches, llama, output

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)


def llama_gqa(seed: int = 0):
    """8 query heads sharing 4 key/value heads (2 query heads per group), head_dim 4."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_four_kv_groups_any_kept_subset():
    model = llama_gqa()
    units = find_units(model)
    heads = units[0]
    assert (heads.n_channels, heads.heads_per_channel, heads.head_dim, heads.group_size) == (4, 2, 4, 8)
    assert heads.rows == (("model.layers.0.self_attn.q_proj", 0, 8), ("model.layers.0.self_attn.k_proj", 0, 4),
                          ("model.layers.0.self_attn.v_proj", 0, 4))
    gen = np.random.default_rng(0)
    # non-contiguous groups in one layer, one group in the other: widths differ per layer
    updates = {units[0].name: UnitUpdate(np.array([0, 2, 3]), weight=gen.normal(size=(32, 32))),
               units[2].name: UnitUpdate(np.array([1]))}
    pruned = apply_updates(copy.deepcopy(model), units, updates)
    masked = apply_updates(copy.deepcopy(model), units, updates, mask=True)
    for layer, groups in zip(pruned.model.layers, (3, 1)):
        attention = layer.self_attn
        assert attention.q_proj.out_features == groups * 8 and attention.k_proj.out_features == groups * 4
        assert attention.v_proj.out_features == groups * 4 and attention.o_proj.in_features == groups * 8
        assert attention.num_key_value_groups == 2
    batch = batches("llama", n=1, seed=7)[0]
    torch.testing.assert_close(output(pruned, batch), output(masked, batch), rtol=1e-4, atol=1e-5)
    prompt = batch[:2, :4]
    with torch.no_grad():
        tokens = pruned.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0,
                                 attention_mask=torch.ones_like(prompt))
        logits = pruned(tokens[:, :-1]).logits
    assert torch.equal(logits[:, 3:].argmax(-1), tokens[:, 4:])  # cached generation == full forward


@pytest.mark.parametrize("method", ["orprune", "magnitude", "flap", "taylor"])
def test_four_kv_groups_pruned_equals_masked(method):
    pruner = TransformerPruner().fit(llama_gqa(), batches("llama"))
    batch = batches("llama", n=1, seed=7)[0]
    for fraction, kinds in ((0.9, ("heads",)), (0.6, ("heads", "neurons"))):
        result = pruner.prune(params=fraction, method=method, kinds=kinds)
        keep = {r.unit: r.channels_after for r in result.report}  # FLAP's added biases are not in the budget
        assert pruner.costs()["params"].evaluate(keep) <= fraction * result.params_before
        heads = [r.channels_after for r in result.report if r.kind == "heads"]
        assert all(1 <= k <= 4 for k in heads) and (min(heads) < 4 or kinds != ("heads",))
        masked = apply_updates(copy.deepcopy(pruner.model_), pruner.units_, result.updates, mask=True)
        torch.testing.assert_close(output(result.model, batch), output(masked, batch), rtol=1e-4, atol=1e-5)


def test_no_unit_is_left_empty():
    pruner = TransformerPruner().fit(llama(), batches("llama"))
    costs = pruner.costs()["params"]
    smallest = costs.evaluate({u.name: 1 for u in pruner.units_})
    # the tightest budget the allocation accepts keeps exactly one channel per unit, never zero
    result = pruner.prune(params=smallest)
    assert [r.channels_after for r in result.report] == [1] * len(pruner.units_)
    assert result.params_after == smallest
    with pytest.raises(ValueError, match="cannot be met"):
        pruner.prune(params=smallest - 1)
    for method in ("magnitude", "flap", "taylor"):  # the baselines stop at one channel per unit
        result = pruner.prune(params=0.01, method=method)
        assert min(r.channels_after for r in result.report) == 1 and not result.success
    wider = TransformerPruner(min_channels=2).fit(llama(), batches("llama")).prune(params=0.6)
    assert min(r.channels_after for r in wider.report) >= 2
    with pytest.raises(ValueError, match="`min_channels`"):
        TransformerPruner(min_channels=0).fit(llama(), batches("llama"))
    with pytest.raises(ValueError, match="`widths"):
        restore_widths(llama(), {pruner.units_[0].name: 0})


def test_taylor_scores_of_gpt2_fused_heads():
    """Taylor importance from plain backward(): GPT-2's fused c_attn thirds and Conv1D's (in, out) layout."""
    from orprune.transformer.baselines import channel_scores, next_token_loss, taylor_gradients
    from tests.transformer.models import gpt2

    model, data = gpt2(), batches("gpt2")
    units = find_units(model)
    taylor = taylor_gradients(model, units, data)
    assert all(p.grad is None for p in model.parameters())  # the model's .grad is left alone
    model.zero_grad()
    for batch in data:
        next_token_loss(model, batch).backward()
    attn = model.transformer.h[0].attn
    hd, width = 8, 32
    c_attn = (attn.c_attn.weight * attn.c_attn.weight.grad).abs().detach()  # (in, 3 * width)
    c_attn_bias = (attn.c_attn.bias * attn.c_attn.bias.grad).abs().detach()
    c_proj = (attn.c_proj.weight * attn.c_proj.weight.grad).abs().detach()  # (width, out)
    scores = channel_scores("taylor", model, units[0], None, taylor)
    for head in range(4):
        cols = torch.cat([third * width + head * hd + torch.arange(hd) for third in range(3)])
        expected = c_attn[:, cols].sum() + c_attn_bias[cols].sum() + c_proj[head * hd : (head + 1) * hd].sum()
        assert scores[head] == pytest.approx(float(expected), rel=1e-5)
