"""Channel pruning and factorization in one allocation: exact costs, brute-force optimum, supersets, surgery."""

import dataclasses
import itertools
import math
import warnings

import numpy as np
import pytest
import torch

import orprune
from orprune.mixed import MixedPruner, rank_unit
from orprune.network.surgery import masked_copy
from tests.models import TinyNet, calibrate_batchnorm, one_thread, resnet20  # noqa: F401  (one_thread: fixture)


def calibration(shape, n_batches=3, batch=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape, generator=gen) for _ in range(n_batches)]


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    example = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    model = calibrate_batchnorm(resnet20(width=0.5), example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = MixedPruner(positions_per_image=8, solver="greedy", max_options=6, max_ranks=6,
                             progress=False).fit(model, calibration((3, 16, 16)))
    return fitted, example


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = TinyNet().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = MixedPruner(positions_per_image=None, solver="exact", max_options=4, max_ranks=4,
                             sequential=False, progress=False).fit(model, calibration((2, 5, 5)))
    return fitted


def reconstructed(fitted, result):
    """The original architecture: dropped channels zero (masked), factorized layers' products written back."""
    p = fitted.pruner_
    return orprune.reconstructed_copy(masked_copy(p.model_, p.graph_, result.pruning.plan), result.factors,
                                      fitted.norms_)


def brute_force(fitted, mode, macs, rank_weight=1.0):
    """Minimum objective over every combination of options allowed in ``mode`` that meets the links and ``macs``."""
    problem, costs = fitted.allocation_problem("mixed", rank_weight)
    full = fitted.pruner_.costs_.evaluate()["macs"]
    allowed = {}
    for key, options in problem.options.items():
        is_rank = isinstance(key, tuple)
        if (mode == "channels" and is_rank) or (mode == "factorize" and not is_rank):
            options = options[-1:]  # whole layer / full width
        allowed[key] = options
    best = math.inf
    for combo in itertools.product(*allowed.values()):
        choice = dict(zip(allowed, combo))
        if all(c.evaluate(choice) <= 1 for name, c in costs.items() if name.startswith("link:")) and \
                costs["macs"].evaluate(choice) <= macs * full * (1 + 1e-12):
            best = min(best, problem.objective(choice))
    return best


@pytest.mark.parametrize("macs", [0.9, 0.7, 0.5, 0.35])
def test_allocation_is_the_brute_force_optimum_and_mixed_is_never_worse(tiny, macs):
    found = {}
    for mode in ("mixed", "channels", "factorize"):
        best = brute_force(tiny, mode, macs)
        if math.isinf(best):
            with pytest.raises(ValueError, match="cannot be met"):
                tiny.prune(macs=macs, mode=mode)
            continue
        result = tiny.prune(macs=macs, mode=mode)
        assert result.allocation.objective == pytest.approx(best, rel=1e-9, abs=1e-12)
        assert result.allocation.costs["macs"] == result.macs_after <= macs * result.macs_before
        found[mode] = result.objective
    assert "mixed" in found
    # the mixed options are a superset of either pure option set, under the same objective and budget
    for mode in ("channels", "factorize"):
        if mode in found:
            assert found["mixed"] <= found[mode] + 1e-12


def test_given_mix_costs_are_counted_and_outputs_equal_the_reconstruction(resnet):
    fitted, example = resnet
    p = fitted.pruner_
    # stage 3 factorized (its stream and internal units full), the first stage's internal units pruned
    ranks = {n: int(fitted.rank_options_[n][0][1]) for n in fitted.rank_options_ if n.startswith("layer3.")}
    internal = [u for u in p.graph_.names if u.startswith("layer1.") and u.endswith("conv1")]
    keep = {u: int(p.curves_[u].keep_counts[1]) for u in internal}
    result = fitted.apply(keep, ranks)
    assert set(result.factors) == set(ranks) and any(k < p.graph_[u].n_channels for u, k in result.keep.items())
    choice = {**result.keep, **fitted.labels(ranks)}
    _, costs = fitted.allocation_problem()
    # the MILP's linear cost model is torch-pruning's count of the built model
    assert costs["macs"].evaluate(choice) == result.macs_after
    assert costs["params"].evaluate(choice) == result.params_after
    assert result.allocation.costs["macs"] == result.macs_after
    with torch.no_grad():
        torch.testing.assert_close(result.model(example), reconstructed(fitted, result)(example), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="are pruned"):
        fitted.apply({"layer3.0.conv1": int(p.curves_["layer3.0.conv1"].keep_counts[0])}, ranks)
    with pytest.raises(ValueError, match="not one of the layer's rank options"):
        fitted.apply({}, {"layer3.0.conv1": 10_000})


@pytest.mark.parametrize("macs", [0.5])
def test_budget_met_as_counted_and_superset_on_a_resnet(resnet, macs):
    fitted, example = resnet
    results = {mode: fitted.prune(macs=macs, mode=mode) for mode in ("mixed", "channels", "factorize")}
    for mode, result in results.items():
        assert result.allocation.status == "optimal"
        assert result.macs_after <= macs * result.macs_before
        assert result.allocation.costs["macs"] == result.macs_after
        assert result.allocation.costs["params"] == result.params_after
        if mode == "channels":
            assert not result.factors
        if mode == "factorize":
            assert all(k == fitted.pruner_.graph_[u].n_channels for u, k in result.keep.items())
    assert results["mixed"].objective <= min(results["channels"].objective, results["factorize"].objective) + 1e-12
    mixed = results["mixed"]
    with torch.no_grad():
        torch.testing.assert_close(mixed.model(example), reconstructed(fitted, mixed)(example), rtol=1e-4, atol=1e-4)
    for n, r in mixed.ranks.items():  # a factorized layer's units keep their full width
        if r is not None:
            assert all(mixed.keep[u] == fitted.pruner_.graph_[u].n_channels for u in fitted.touching_[n])
            assert mixed.allocation.keep[rank_unit(n)] < fitted.rank_options_[n][1][-1]


def test_channel_mode_is_the_pruners_allocation(resnet):
    fitted, _ = resnet
    ours = fitted.prune(macs=0.5, mode="channels")
    theirs = fitted.pruner_.prune(macs=0.5)
    assert ours.objective == pytest.approx(theirs.allocation.objective, rel=1e-9, abs=1e-12)
    assert ours.macs_after == theirs.macs_after


def test_bad_inputs(tiny):
    with pytest.raises(ValueError, match="`mode` must be one of"):
        tiny.prune(macs=0.5, mode="both")
    with pytest.raises(ValueError, match="give a budget"):
        tiny.prune()
    with pytest.raises(ValueError, match="`max_ranks` must be a positive integer"):
        MixedPruner(max_ranks=0)
    with pytest.raises(RuntimeError, match="not fitted"):
        MixedPruner().prune(macs=0.5)
    with pytest.raises(ValueError, match="`macs` must be a fraction"):
        orprune.prune_and_factorize(TinyNet(), calibration((2, 5, 5)), macs=2.0)


def test_output_errors_price_units_and_ranks_alike():
    torch.manual_seed(0)
    model = TinyNet().eval()
    cal = calibration((2, 5, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = MixedPruner(positions_per_image=None, solver="exact", max_options=4, max_ranks=4, sequential=False,
                             errors="output", probe_images=16, progress=False).fit(model, cal)
    problem, _ = fitted.allocation_problem()
    probe = torch.cat(cal)[:16]
    with torch.no_grad():
        ref = model(probe)
    for n, (ranks, _) in fitted.rank_options_.items():
        errs = problem.errors[rank_unit(n)]
        assert errs[-1] == 0.0 and np.all(errs[:-1] > 0)
        r = int(ranks[0])  # the layer alone factorized at its smallest rank, through the public surgery
        one = fitted.apply({}, {n: r})
        with torch.no_grad():
            measured = float((one.model(probe) - ref).double().square().sum() / ref.double().square().sum())
        assert errs[0] == pytest.approx(measured, rel=1e-4)
    for u in fitted.pruner_.curves_:
        np.testing.assert_array_equal(problem.errors[u], fitted.pruner_.output_errors_[u])
    result = fitted.prune(macs=0.6)
    assert result.allocation.objective == pytest.approx(brute_force(fitted, "mixed", 0.6), rel=1e-9, abs=1e-12)


def test_pruned_consumers_after_factorized_layers_are_refitted_on_the_factorized_network(resnet):
    fitted, example = resnet
    p = fitted.pruner_
    # stage 1 factorized, stage 3's internal units pruned: the pruned consumers run after the factorized layers
    ranks = {n: int(fitted.rank_options_[n][0][1]) for n in fitted.rank_options_ if n.startswith("layer1.")}
    internal = [u for u in p.graph_.names if u.startswith("layer3.") and u.endswith("conv1")]
    keep = {u: int(p.curves_[u].keep_counts[1]) for u in internal}
    result = fitted.apply(keep, ranks)
    assert set(result.factors) == set(ranks) and set(result.pruning.plan.keep) == set(internal)
    final = reconstructed(fitted, result)  # the original architecture: dropped channels zero, products written
    with torch.no_grad():
        torch.testing.assert_close(result.model(example), final(example), rtol=1e-4, atol=1e-4)
    # the last pruned consumer's refit is the least squares on its inputs in the *final* network (every
    # factorized layer before it in place), targets from the original (the pruner's cache, which also holds the
    # original operands of the residual correction)
    last = [c for c in p.consumer_order_ if c.name in result.pruning.plan.updates][-1]
    target = p.residual_targets_.get(last.name)
    acc = orprune.collect_statistics(final, [last], p.batches_, reference=p.targets_,  # the original's cached outputs
                                     offsets=None if target is None else {last.name: target.offset(p.model_)},
                                     positions_per_image=p.positions_per_image, seed=p.seed, progress=False)[last.name]
    expected = p._update(last, dict(result.pruning.plan.keep), acc, p._problem(acc, last, p.model_, check=False))
    np.testing.assert_allclose(result.pruning.plan.updates[last.name].weight, expected.weight, rtol=1e-3, atol=1e-6)
    # channels first (the consumer refitted without the factorization upstream) gives other weights
    alone = p.apply(dataclasses.replace(result.allocation, keep=dict(result.keep)))
    assert not np.allclose(alone.plan.updates[last.name].weight, expected.weight, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("rank_weight", [0.05, 20.0])
def test_weighted_rank_errors_are_the_brute_force_optimum(tiny, rank_weight):
    unweighted, _ = tiny.allocation_problem()
    problem, _ = tiny.allocation_problem(rank_weight=rank_weight)
    for key, errors in problem.errors.items():
        np.testing.assert_allclose(errors, unweighted.errors[key] * (rank_weight if isinstance(key, tuple) else 1.0))
    for macs in (0.7, 0.5):
        keep, ranks, allocation, _ = tiny.choose(macs=macs, rank_weight=rank_weight)
        assert allocation.objective == pytest.approx(brute_force(tiny, "mixed", macs, rank_weight), rel=1e-9,
                                                     abs=1e-12)
        assert allocation.objective == pytest.approx(problem.objective(dict(allocation.keep)), rel=1e-9, abs=1e-12)
