"""Heads and neurons of Hugging Face models: physically pruned == masked, budgets, GQA, generation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from orprune.transformer import TransformerPruner, UnitUpdate, apply_updates, find_units, prune_transformer
from tests.transformer.models import BUILDERS, batches, llama, output

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def fitted():
    """One fitted pruner per architecture (curves are computed once)."""
    def hidden_loss(model, batch):  # BERT / ViT models without a head: the Taylor baseline's loss
        return model(batch).last_hidden_state.pow(2).mean()

    return {arch: TransformerPruner(loss=None if arch in ("llama", "gpt2") else hidden_loss).fit(build(), batches(arch))
            for arch, build in BUILDERS.items()}


def masked_model(pruner, result):
    """The original model with the dropped columns of o_proj / down_proj zeroed and the new weights written."""
    return apply_updates(copy.deepcopy(pruner.model_), pruner.units_, result.updates, mask=True)


@pytest.mark.parametrize("arch,heads,group,neurons", [("llama", 2, 16, 40), ("gpt2", 4, 8, 48),
                                                      ("bert", 4, 8, 48), ("vit", 4, 8, 48)])
def test_units_of_each_architecture(arch, heads, group, neurons):
    units = find_units(BUILDERS[arch]())
    assert [u.kind for u in units] == ["heads", "neurons"] * 2
    assert all(u.n_channels == heads and u.group_size == group for u in units[::2])
    assert all(u.n_channels == neurons and u.group_size == 1 for u in units[1::2])


@pytest.mark.parametrize("arch", list(BUILDERS))
@pytest.mark.parametrize("method", ["orprune", "magnitude", "wanda_sp", "flap", "taylor"])
def test_pruned_equals_masked(fitted, arch, method):
    pruner = fitted[arch]
    result = pruner.prune(params=0.75, method=method)
    assert result.success, result.message
    assert result.params_after < result.params_before
    assert any(r.channels_after < r.channels_before for r in result.report)
    batch = batches(arch, n=1, seed=7)[0]
    torch.testing.assert_close(output(result.model, batch), output(masked_model(pruner, result), batch),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sequential_refit_equals_masked(arch):
    pruner = TransformerPruner(sequential=True).fit(BUILDERS[arch](), batches(arch))
    result = pruner.prune(params=0.7)
    batch = batches(arch, n=1, seed=7)[0]
    torch.testing.assert_close(output(result.model, batch), output(masked_model(pruner, result), batch),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_params_budget_and_costs_match_the_model(fitted, arch):
    pruner = fitted[arch]
    for fraction in (0.9, 0.7, 0.5):
        result = pruner.prune(params=fraction)
        assert result.params_after <= fraction * result.params_before
        keep = {r.unit: r.channels_after for r in result.report}
        assert pruner.costs()["params"].evaluate(keep) == result.params_after  # the cost model is exact


def test_macs_budget(fitted):
    result = fitted["llama"].prune(macs=0.6, seq_len=12)
    assert result.macs_after <= 0.6 * result.macs_before


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_first_attention_refit_is_exact_for_the_layer(fitted, arch):
    # the first block's o_proj sees the same inputs before and after pruning its heads: the refit's
    # error is the error measured on the pruned model, and no lower for the old weights of the kept heads
    pruner = fitted[arch]
    unit = pruner.units_[0]
    kept = np.array([1])
    update, relative_error = pruner._refit(unit, pruner.statistics_[unit.name], kept)
    model = apply_updates(copy.deepcopy(pruner.model_), pruner.units_, {unit.name: update})
    outputs = []
    for net in (pruner.model_, model):
        store = []
        handle = net.get_submodule(unit.out).register_forward_hook(lambda m, a, y, s=store: s.append(y.detach()))
        for batch in pruner.batches_:
            output(net, batch)
        handle.remove()
        outputs.append(torch.cat(store).double().reshape(-1, 32))
    y, y_hat = outputs
    if unit.out.endswith("c_proj"):  # a bias: the problem is centred, the bias its intercept
        y = y - y.mean(0)
    prob = pruner.problems_[unit.name]
    penalty = prob.ridge * float(np.sum(update.weight**2)) / prob.yy  # f(S) includes r ||W||^2
    measured = float(((outputs[0] - y_hat) ** 2).sum() / (y**2).sum())
    assert measured == pytest.approx(relative_error - penalty, rel=1e-6)
    mask = np.zeros(unit.n_channels, dtype=bool)
    mask[kept] = True
    assert relative_error <= pruner._fixed_error(unit, pruner.problems_[unit.name], mask) + 1e-12


@pytest.mark.parametrize("kept", [[0], [1]])
def test_gqa_group_keeps_its_query_heads(kept):
    model = llama()
    units = find_units(model)
    gen = np.random.default_rng(0)
    unit = units[0]
    weight = gen.normal(size=(32, unit.n_channels * unit.group_size))
    updates = {unit.name: UnitUpdate(np.array(kept), weight=weight)}
    pruned = apply_updates(copy.deepcopy(model), units, updates)
    masked = apply_updates(copy.deepcopy(model), units, updates, mask=True)
    attention = pruned.model.layers[0].self_attn
    assert attention.q_proj.out_features == 16 and attention.k_proj.out_features == 8
    assert attention.v_proj.out_features == 8 and attention.o_proj.in_features == 16
    assert attention.num_key_value_groups == 2
    assert pruned.config.orprune_widths == {unit.name: 1}
    batch = batches("llama", n=1)[0]
    torch.testing.assert_close(output(pruned, batch), output(masked, batch), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generation_after_pruning(fitted, arch):
    result = fitted[arch].prune(params=0.6)
    prompt = batches(arch, n=1)[0][:2, :5]
    with torch.no_grad():
        tokens = result.model.generate(prompt, max_new_tokens=6, do_sample=False,
                                       pad_token_id=0, attention_mask=torch.ones_like(prompt))
    assert tokens.shape == (2, 11)
    # greedy decoding with the cache gives the tokens of a full forward pass without it
    with torch.no_grad():
        logits = result.model(tokens[:, :-1]).logits
    assert torch.equal(logits[:, 4:].argmax(-1), tokens[:, 5:])


def test_prune_transformer_one_call_and_bad_inputs():
    model, data = llama(), batches("llama")
    result = prune_transformer(model, data, params=0.7, swap=True)
    assert result.params_after <= 0.7 * result.params_before
    assert result.allocation is not None and result.allocation.success
    greedy = prune_transformer(model, data, params=0.7)  # same curves, same allocation, no polish
    assert [r.channels_after for r in greedy.report] == [r.channels_after for r in result.report]
    for polished, plain in zip(result.report, greedy.report):  # 1-swaps never worsen a selection
        assert polished.relative_error <= plain.relative_error + 1e-12
    assert find_units(model)[1].n_channels == 40  # the input model is untouched
    with pytest.raises(ValueError, match="`method`"):
        TransformerPruner().fit(model, data).prune(params=0.8, method="obs")
    with pytest.raises(ValueError, match="give a budget"):
        TransformerPruner().fit(model, data).prune()
    with pytest.raises(RuntimeError, match="not fitted"):
        TransformerPruner().prune(params=0.5)
    with pytest.raises(ValueError, match="`swap_time`"):
        TransformerPruner(swap_time=0).fit(model, data)
    with pytest.raises(ValueError, match="`errors`"):
        TransformerPruner(errors="sum").fit(model, data)
    with pytest.raises(ValueError, match="no recognised transformer block"):
        find_units(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="`calibration` is empty"):
        TransformerPruner().fit(model, [])


@pytest.mark.parametrize("method", ["orprune", "magnitude", "flap"])
def test_mlp_only_keeps_every_head(fitted, method):
    pruner = fitted["gpt2"]
    result = pruner.prune(params=0.8, method=method, kinds=("neurons",))
    assert result.params_after <= 0.8 * result.params_before
    assert all(r.channels_after == r.channels_before for r in result.report if r.kind == "heads")
    batch = batches("gpt2", n=1, seed=7)[0]
    torch.testing.assert_close(output(result.model, batch), output(masked_model(pruner, result), batch),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="`kinds`"):
        pruner.prune(params=0.8, kinds=("layers",))
