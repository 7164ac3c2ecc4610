"""Whole-network factorization: budgets met exactly as counted, factorized == reconstructed, optimal ranks."""

import itertools
import warnings

import numpy as np
import pytest
import torch

import orprune
from orprune.factorize import factorization_options
from orprune.layer.low_rank import map_objective
from tests.models import calibrate_batchnorm, one_thread, resnet20  # noqa: F401  (one_thread: fixture)


def calibration(example, n_batches=3, batch=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *example.shape[1:], generator=gen) for _ in range(n_batches)]


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    example = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return calibrate_batchnorm(resnet20(width=0.5), example), example


@pytest.mark.parametrize("sequential", [False, True])
def test_budget_met_as_counted_and_factorized_equals_reconstructed(resnet, sequential):
    model, example = resnet
    result = orprune.factorize(model, calibration(example), macs=0.5, positions_per_image=8, sequential=sequential)
    assert result.macs_after <= 0.5 * result.macs_before
    # the MILP's cost model is exactly torch-pruning's count of the factorized model
    assert result.allocation.costs["macs"] == result.macs_after
    assert result.allocation.costs["params"] == result.params_after
    assert result.allocation.status == "optimal"
    ranks = {n: r for n, r in result.ranks.items() if r is not None}
    assert ranks and set(ranks) == set(result.factors)
    for name, r in ranks.items():
        assert result.model.get_submodule(name)[0].weight.shape[0] == r
    norms = orprune.following_norms(model, example[:1])
    reconstructed = orprune.reconstructed_copy(model, result.factors, norms)
    with torch.no_grad():
        torch.testing.assert_close(result.model(example), reconstructed(example), rtol=1e-4, atol=1e-4)
    assert all(isinstance(m, torch.nn.Conv2d) for n, m in model.named_modules() if n in ranks)  # untouched


def test_errors_are_the_certified_curves_and_the_maps_their_optima(resnet):
    model, example = resnet
    result = orprune.factorize(model, calibration(example), macs=0.6, positions_per_image=8, sequential=False)
    stats = orprune.collect_statistics(model, list(result.curves), calibration(example), positions_per_image=8,
                                       progress=False)
    for layer in result.layers:
        curve = result.curves[layer.name]
        if layer.rank is None:
            assert layer.relative_error == 0 and layer.macs_after == layer.macs_before
            continue
        gram, cross, yy = stats[layer.name].statistics(center=True)
        prob = orprune.LayerProblem(gram, cross, yy, ridge=1e-4 * float(np.mean(np.diag(gram))))
        w = result.factors[layer.name].weights.numpy()
        assert map_objective(prob, w) / yy == pytest.approx(layer.relative_error, rel=1e-6, abs=1e-12)
        assert layer.relative_error == pytest.approx(curve.relative_errors[layer.rank])
        assert layer.macs_after < layer.macs_before


def test_allocation_is_the_brute_force_optimum_over_the_options():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 6)).eval()
    example = torch.randn(2, 3, 6, 6)
    result = orprune.factorize(net, calibration(example), macs=0.55, max_options=4, positions_per_image=None)
    names = [layer.name for layer in result.layers]
    options = {}
    for layer in result.layers:
        prob_n, prob_m = orprune.network.graph.weight_matrix(net.get_submodule(layer.name)).shape
        ranks, macs = factorization_options(prob_n, prob_m, layer.macs_before // (prob_n * prob_m), 4)
        errs = np.r_[result.curves[layer.name].relative_errors[ranks[:-1]], 0.0]
        options[layer.name] = list(zip(macs, errs))
    rest = result.macs_before - sum(layer.macs_before for layer in result.layers)
    best = min(sum(e for _, e in combo) for combo in itertools.product(*(options[n] for n in names))
               if rest + sum(m for m, _ in combo) <= 0.55 * result.macs_before)
    assert result.allocation.objective == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_a_loose_budget_keeps_every_layer(resnet):
    model, example = resnet
    result = orprune.factorize(model, calibration(example, 1), macs=1.0, positions_per_image=8)
    assert all(layer.rank is None for layer in result.layers) and not result.factors
    with torch.no_grad():
        torch.testing.assert_close(result.model(example), model(example))


def test_options_are_the_ranks_that_save_macs():
    ranks, macs = factorization_options(16 * 9, 16, positions=10, max_options=100)
    assert ranks[-1] == -1 and macs[-1] == 10 * 144 * 16
    assert ranks[:-1].tolist() == list(range(1, 15))  # 14 * 160 = 2240 < 2304 <= 15 * 160
    assert np.all(np.diff(macs) > 0)
    ranks, _ = factorization_options(2, 2, positions=1)
    assert ranks.tolist() == [-1]  # a 2x2 map cannot be cheaper factorized


def test_bad_inputs(resnet):
    model, example = resnet
    with pytest.raises(ValueError, match="give a budget"):
        orprune.factorize(model, calibration(example, 1))
    with pytest.raises(ValueError, match="`macs` must be a fraction"):
        orprune.factorize(model, calibration(example, 1), macs=1.5)
    with pytest.raises(ValueError, match="`calibration` is empty"):
        orprune.factorize(model, [], macs=0.5)
    with pytest.raises(ValueError, match="`min_rank` must be a positive integer"):
        orprune.factorize(model, calibration(example, 1), macs=0.5, min_rank=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="cannot be met"):
            orprune.factorize(model, calibration(example, 1), macs=0.01, positions_per_image=4)


def test_wide_layers_are_left_whole_with_a_warning(resnet):
    model, example = resnet
    with pytest.warns(UserWarning, match="max_features"):
        result = orprune.factorize(model, calibration(example, 1), macs=1.0, max_features=100, positions_per_image=4)
    assert "fc" not in orprune.factorize(model, calibration(example, 1), macs=1.0, positions_per_image=4,
                                             ignored_layers=[model.fc]).curves
    widths = [orprune.network.graph.weight_matrix(model.get_submodule(layer.name)).shape[0] for layer in result.layers]
    assert widths and max(widths) <= 100
