"""Wide consumers (``orprune.layer.wide``): the compressed problem bounds the exact one from above, equals it
when nothing is compressed, and the refit from stored rows is the exact problem's (brute force over masks)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from orprune.layer.problem import StatisticsAccumulator
from orprune.layer.selection import select
from orprune.layer.wide import WideAccumulator, WideProblem, channel_projection, project_weights, sketch_size

C, G, N_OUT = 5, 6, 3


def data(n_rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(C * G, C * G)) / np.sqrt(C * G)  # correlated columns
    x = rng.normal(size=(n_rows, C * G)) @ (np.eye(C * G) + mixing) + 0.5
    weights = rng.normal(size=(C * G, N_OUT))
    y = x @ weights + 0.3 * rng.normal(size=(n_rows, N_OUT)) + 1.0
    return x, y, weights


def problems(n_rows: int, sketch: int, center: bool, ridge: float = 0.2, method: str = "weights"):
    x, y, weights = data(n_rows)
    wide = WideAccumulator(channel_projection(weights, C, G, sketch, method), N_OUT)
    half = n_rows // 2  # one NumPy batch and one torch batch
    wide.update(x[:half], y[:half]).update(torch.tensor(x[half:]), torch.tensor(y[half:]))
    exact = StatisticsAccumulator(C * G, N_OUT).update(x, y)
    return (wide.to_problem(ridge=ridge, weights=weights, center=center),
            exact.to_problem(group_size=G, ridge=ridge, center=center), wide, exact)


def masks():
    for bits in itertools.product([False, True], repeat=C):
        yield np.array(bits)


@pytest.mark.parametrize("n_rows", [8, 200])  # fewer rows than kept columns (sample space) and more
@pytest.mark.parametrize("center", [False, True])
def test_refit_is_the_exact_problems_for_every_mask(n_rows, center):
    wide, exact, *_ = problems(n_rows, sketch=2, center=center)
    assert wide.exact and wide.n_channels == C and wide.group_size == 2
    for mask in masks():
        weights, value = wide.refit(mask)
        expected_weights, expected = exact.refit(mask)
        assert value == pytest.approx(expected, rel=1e-9, abs=1e-9 * exact.yy)
        assert wide.exact_objective(mask) == pytest.approx(expected, rel=1e-9, abs=1e-9 * exact.yy)
        np.testing.assert_allclose(weights, expected_weights, atol=1e-8 * np.abs(expected_weights).max() + 1e-12)
        # the compressed problem restricts the weights to range(P_c): an upper bound on the exact error
        assert wide.objective(mask) >= expected - 1e-9 * exact.yy


@pytest.mark.parametrize("method", ["weights", "pool"])
def test_without_compression_the_selection_problem_is_the_exact_one(method):
    wide, exact, *_ = problems(60, sketch=G, center=True, method=method)
    for mask in masks():
        assert wide.objective(mask) == pytest.approx(exact.objective(mask), rel=1e-9, abs=1e-9 * exact.yy)
    # the same greedy path, hence the same masks
    assert np.array_equal(select(wide.selection, 2, solver="greedy").mask, select(exact, 2, solver="greedy").mask)


def test_ridge_scale_and_means_are_the_exact_statistics():
    _, exact_problem, wide, exact = problems(40, sketch=1, center=True)
    for center in (False, True):
        gram = exact.statistics(center=center)[0]
        assert wide.mean_diagonal(center=center) == pytest.approx(np.mean(np.diag(gram)), rel=1e-12)
    for ours, theirs in zip(wide.means(), exact.means()):
        np.testing.assert_allclose(ours, theirs, rtol=1e-12)
    assert wide.to_problem(center=True).yy == pytest.approx(exact_problem.yy, rel=1e-12)


def test_past_the_row_budget_the_refit_is_restricted_to_the_compressed_columns():
    x, y, weights = data(50)
    projection = channel_projection(weights, C, G, 2)
    acc = WideAccumulator(projection, N_OUT, max_bytes=x[:30].nbytes + y[:30].nbytes)
    acc.update(x[:30], y[:30])
    assert acc.exact
    acc.update(x[30:], y[30:])
    assert not acc.exact
    with pytest.warns(RuntimeWarning, match="exceed `max_bytes`"):
        prob = acc.to_problem(ridge=0.1, center=True)
    assert not prob.exact
    mask = np.array([True, False, True, True, False])
    weights, value = prob.refit(mask)
    assert value == pytest.approx(prob.objective(mask), rel=1e-12)
    blocks = weights.reshape(C, G, N_OUT)
    assert np.all(blocks[~mask] == 0)
    for c in np.flatnonzero(mask):  # each kept block lies in range(P_c)
        inside = projection[c] @ (projection[c].T @ blocks[c])
        np.testing.assert_allclose(inside, blocks[c], atol=1e-10)
    # and its error on the data is the compressed objective (evaluated directly)
    xc, yc = x - x.mean(0), y - y.mean(0)
    direct = np.sum((yc - xc @ weights) ** 2) + 0.1 * np.sum(weights ** 2)
    assert direct == pytest.approx(value, rel=1e-8)


def test_float32_torch_rows_agree_with_float64():
    x, y, weights = data(64)
    projection = channel_projection(weights, C, G, 3)
    a = WideAccumulator(projection, N_OUT).update(x.astype(np.float32).astype(float), y)
    b = WideAccumulator(projection, N_OUT).update(torch.tensor(x, dtype=torch.float32), torch.tensor(y))
    pa, pb = a.to_problem(ridge=0.1, center=True), b.to_problem(ridge=0.1, center=True)
    assert pb.rows[0].dtype == np.float32  # the rows are kept in the model's dtype (exactly)
    mask = np.array([True, True, False, True, False])
    assert pb.refit(mask)[1] == pytest.approx(pa.refit(mask)[1], rel=1e-9)


def test_projection_and_sketch_size():
    rng = np.random.default_rng(1)
    weights = rng.normal(size=(C * G, N_OUT))
    for method in ("weights", "pool"):
        p = channel_projection(weights, C, G, 3, method)
        assert p.shape == (C, G, 3)
        np.testing.assert_allclose(np.einsum("cgs,cgt->cst", p, p), np.broadcast_to(np.eye(3), (C, 3, 3)), atol=1e-12)
    # torch weights (any dtype) give the same directions, chunk by chunk
    np.testing.assert_allclose(np.abs(channel_projection(torch.tensor(weights), C, G, 3)),
                               np.abs(channel_projection(weights, C, G, 3)), atol=1e-10)
    np.testing.assert_allclose(project_weights(channel_projection(weights, C, G, 3), torch.tensor(weights)),
                               np.einsum("cgs,cgo->cso", channel_projection(weights, C, G, 3),
                                         weights.reshape(C, G, N_OUT)).reshape(C * 3, N_OUT), atol=1e-12)
    # the weight directions hold each block's top singular vectors: the projected weights keep their top energy
    p = channel_projection(weights, C, G, N_OUT)
    blocks = weights.reshape(C, G, N_OUT)
    np.testing.assert_allclose(np.linalg.norm(np.einsum("cgs,cgo->cso", p, blocks), axis=(1, 2)),
                               np.linalg.norm(blocks, axis=(1, 2)), rtol=1e-12)
    assert sketch_size(512, 49, 4608) == 9 and sketch_size(512, 9, 4608) == 9 and sketch_size(11008, 1, 4608) == 1
    assert sketch_size(10_000, 9, 4608) == 1
    with pytest.raises(ValueError, match="`method`"):
        channel_projection(weights, C, G, 2, "random")
    with pytest.raises(ValueError, match="`sketch`"):
        channel_projection(weights, C, G, G + 1)
    with pytest.raises(ValueError, match="`weights`"):
        channel_projection(weights[:-1], C, G, 2)
    with pytest.raises(ValueError, match="`projection`"):
        WideAccumulator(np.zeros((C, 2, 3)), N_OUT)
    with pytest.raises(ValueError, match="batch shape"):
        WideAccumulator(p, N_OUT).update(np.zeros((2, 7)), np.zeros((2, N_OUT)))
    with pytest.raises(ValueError, match="`rows`"):
        WideProblem(np.eye(C), np.zeros((C, N_OUT)), 1.0, projection=np.ones((C, 2, 1)) / np.sqrt(2),
                    rows=(np.zeros((4, 3)), np.zeros((4, N_OUT))))


def test_the_accumulator_reads_like_a_statistics_accumulator():
    x, y, weights = data(30)
    acc = WideAccumulator(channel_projection(weights, C, G, 2), N_OUT).update(x, y)
    gram, cross, yy = acc.statistics(center=True)
    prob = acc.to_problem(group_size=G, ridge=0.1, center=True)
    np.testing.assert_array_equal(prob.gram, gram)
    assert prob.yy == yy and cross.shape == (C * 2, N_OUT)
    with pytest.raises(ValueError, match="`group_size`"):
        acc.to_problem(group_size=2)
    acc.release()
    with pytest.raises(ValueError, match="released"):
        acc.statistics()
