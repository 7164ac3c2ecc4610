"""UCP in the pipeline: one width per stage (ties), channels from given scores (SE), pruned == masked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orprune.network.stages import stage_ties
from orprune.network.surgery import masked_copy
from orprune.ucp import se_importance
from tests.models import fitted_greedy_pruner, one_thread  # noqa: F401  (one_thread: module fixture)


@pytest.fixture(scope="module")
def fitted():
    return fitted_greedy_pruner("resnet20", n_batches=3)


def assert_pruned_equals_masked(model, example, pruner, result):
    with torch.no_grad():
        pruned = result.model(example)
        masked = masked_copy(model, pruner.graph_, result.plan).eval()(example)
    torch.testing.assert_close(pruned, masked, rtol=1e-4, atol=1e-4 * float(masked.abs().max()))


def test_stage_ties_give_one_width_per_stage(fitted):
    model, example, pruner = fitted
    groups = stage_ties(pruner.graph_)
    assert [len(g) for g in groups] == [3, 3, 3]  # ResNet-20: three stages of three basic blocks
    free = pruner.prune(macs=0.5)
    tied = pruner.prune(macs=0.5, ties="stages")
    for group in groups:
        assert len({tied.allocation.keep[u] for u in group}) == 1
    assert tied.macs_after <= 0.5 * tied.macs_before
    assert free.allocation.objective <= tied.allocation.objective + 1e-12  # a constraint never helps
    assert_pruned_equals_masked(model, example, pruner, tied)
    same = pruner.prune(macs=0.5, ties=groups)  # explicit groups: the same model
    assert dict(same.allocation.keep) == dict(tied.allocation.keep)


def test_scores_choose_the_channels_and_pruned_equals_masked(fitted):
    model, example, pruner = fitted
    rng = np.random.default_rng(0)
    scores = {u.name: rng.random(u.n_channels) for u in pruner.graph_.units}
    result = pruner.prune(macs=0.5, scores=scores)
    plain = pruner.prune(macs=0.5)
    assert dict(result.allocation.keep) == dict(plain.allocation.keep)  # the counts come from the curves
    for report in result.report:
        k = report.channels_after
        kept = result.plan.keep.get(report.unit, np.arange(report.channels_before))
        assert sorted(np.asarray(kept).tolist()) == sorted(np.argsort(-scores[report.unit])[:k].tolist())
        mask = np.zeros(report.channels_before, dtype=bool)
        mask[np.asarray(kept)] = True
        assert report.solver == "scores"
        assert report.relative_error == pytest.approx(pruner.unit_problems_[report.unit].objective(mask), rel=1e-9)
        # the curve's channels are the best the solver found for the count; random ones are rarely better
        assert report.bound <= report.relative_error + 1e-12
    assert_pruned_equals_masked(model, example, pruner, result)


def test_se_scores_with_stage_ties_prune_to_the_masked_model(fitted):
    model, example, pruner = fitted
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, *example.shape[1:], generator=gen)
    y = torch.randint(0, 10, (16,), generator=gen)
    se = se_importance(model, x, y, graph=pruner.graph_, epochs=1, batch_size=8, freeze=True)
    result = pruner.prune(macs=0.4, scores=se.scores, ties="stages")
    assert result.macs_after <= 0.4 * result.macs_before
    for unit, kept in result.plan.keep.items():
        assert sorted(np.asarray(kept).tolist()) == sorted(se.top(unit, len(kept)).tolist())
    assert_pruned_equals_masked(model, example, pruner, result)


def test_bad_scores_and_ties(fitted):
    _, _, pruner = fitted
    unit = pruner.graph_.units[0]
    with pytest.raises(ValueError, match="`scores` names"):
        pruner.prune(macs=0.5, scores={"nope": np.ones(3)})
    with pytest.raises(ValueError, match="finite scores"):
        pruner.prune(macs=0.5, scores={unit.name: np.ones(unit.n_channels + 1)})
    with pytest.raises(ValueError, match="`scores` must be a mapping"):
        pruner.prune(macs=0.5, scores=[1, 2])
    with pytest.raises(ValueError, match="`ties` must be"):
        pruner.prune(macs=0.5, ties="blocks")
    with pytest.raises(ValueError, match="`ties` names"):
        pruner.prune(macs=0.5, ties=[("nope", unit.name)])
