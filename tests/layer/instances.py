"""Small layer problems with known optima, shared by every solver's tests."""

from __future__ import annotations

import itertools

import numpy as np

from orprune import LayerProblem


def random_arrays(rng: np.random.Generator, n_channels: int, group_size: int, n_samples: int,
                  n_outputs: int = 3, correlated: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``X`` (N, C*g) and ``Y = X W + noise``; ``correlated`` mixes channels through shared factors."""
    n_features = n_channels * group_size
    X = rng.normal(size=(n_samples, n_features))
    if correlated:
        factors = rng.normal(size=(n_samples, max(2, n_features // 3)))
        X = 0.4 * X + factors @ rng.normal(size=(factors.shape[1], n_features))
    W = rng.normal(size=(n_features, n_outputs)) * (rng.random(n_features) < 0.6)[:, None]
    Y = X @ W + 0.3 * rng.normal(size=(n_samples, n_outputs))
    return X, Y


def random_problem(seed: int, n_channels: int, group_size: int, *, n_samples: int | None = None,
                   ridge: float = 0.0, correlated: bool = False, n_outputs: int = 3) -> LayerProblem:
    rng = np.random.default_rng(seed)
    n_samples = n_samples or 3 * n_channels * group_size
    X, Y = random_arrays(rng, n_channels, group_size, n_samples, n_outputs, correlated)
    return LayerProblem.from_arrays(X, Y, group_size=group_size, ridge=ridge)


def brute_force(prob: LayerProblem, k: int) -> tuple[float, np.ndarray]:
    """Optimum over all subsets of ``k`` channels and one optimal mask."""
    best, best_mask = np.inf, None
    for kept in itertools.combinations(range(prob.n_channels), k):
        mask = np.zeros(prob.n_channels, dtype=bool)
        mask[list(kept)] = True
        value = prob.objective(mask)
        if value < best:
            best, best_mask = value, mask
    return best, best_mask
