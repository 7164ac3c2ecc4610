"""Partition pruning with data: balanced parts minimising the least-squares error after the per-output refit.

Given the input parts, output ``j`` refit over the inputs of part ``p`` recovers the gain
``g_j(S_p) = b_{j,S_p}^T (G_{S_p S_p} + rI)^{-1} b_{j,S_p}``; the best balanced output assignment is then a
transportation problem, solved exactly. :func:`partition_layer` enumerates the input partitions of tiny layers
(exact) or alternates input swaps with that exact output step. See ``formulations/partition_pruning.md``
section 4; the weight-energy criterion and :class:`Partition` live in :mod:`orprune.layer.partition`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from orprune._status import FEASIBLE, OPTIMAL
from orprune._validation import check_integer
from orprune.layer._partition_milp import balanced_assignment, part_sizes
from orprune.layer.nm import _solve
from orprune.layer.partition import Partition, _check_parts, _energy_heuristic
from orprune.layer.problem import LayerProblem
from orprune.layer.result import relative_gap

__all__ = ["balanced_partitions", "part_gains", "partition_layer", "partition_refit"]


def part_gains(prob: LayerProblem, input_parts: np.ndarray, P: int, only: Any = None,
               gains: np.ndarray | None = None, h: np.ndarray | None = None) -> np.ndarray:
    """``gains[j, p] = b_{j,S_p}^T H_{S_p S_p}^{-1} b_{j,S_p}``: what output ``j`` recovers from part ``p``'s inputs.

    With ``only``, just those parts' columns are recomputed, in a copy of ``gains``; ``h`` is ``G + rI`` if known.
    """
    h = prob.gram + prob.ridge * np.eye(prob.n_features) if h is None else h
    gains = np.zeros((prob.n_outputs, P)) if gains is None else gains.copy()
    for p in range(P) if only is None else only:
        cols = np.flatnonzero(input_parts == p)
        if cols.size:
            b = prob.cross[cols]
            gains[:, p] = np.sum(b * _solve(h[np.ix_(cols, cols)], b), axis=0)
    return gains


def partition_refit(prob: LayerProblem, input_parts: Any, output_parts: Any) -> tuple[np.ndarray, float]:
    """Least-squares weights of each output over the inputs of its part, and the summed error."""
    input_parts, output_parts = np.asarray(input_parts, int), np.asarray(output_parts, int)
    h = prob.gram + prob.ridge * np.eye(prob.n_features)
    weights = np.zeros_like(prob.cross)
    gain = []
    for p in np.unique(output_parts):
        cols, outs = np.flatnonzero(input_parts == p), np.flatnonzero(output_parts == p)
        if cols.size:
            b = prob.cross[np.ix_(cols, outs)]
            weights[np.ix_(cols, outs)] = _solve(h[np.ix_(cols, cols)], b)
            gain.append(float(np.sum(b * weights[np.ix_(cols, outs)])))
    return weights, prob.yy - math.fsum(gain)


def _best_outputs(prob: LayerProblem, input_parts: np.ndarray, P: int) -> tuple[np.ndarray, float]:
    """Exact output assignment given the input parts (a transportation problem on the gains)."""
    gains = part_gains(prob, input_parts, P)
    lo, hi = part_sizes(prob.n_outputs, P)
    parts_out = balanced_assignment(gains, lo, hi)
    return parts_out, prob.yy - float(gains[np.arange(prob.n_outputs), parts_out].sum())


def balanced_partitions(n_items: int, P: int) -> Iterator[np.ndarray]:
    """Every balanced partition of ``n_items`` into ``P`` parts once, parts numbered by their smallest item."""
    lo, hi = part_sizes(n_items, P)
    labels, sizes = np.zeros(n_items, int), np.zeros(P, int)

    def place(i: int, used: int) -> Iterator[np.ndarray]:
        if i == n_items:
            if used == P and np.all(sizes >= lo):
                yield labels.copy()
            return
        if n_items - i < np.maximum(lo - sizes[:used], 0).sum() + lo * (P - used):
            return  # too few items left to fill the parts up to lo
        for p in range(min(used + 1, P)):
            if sizes[p] < hi:
                labels[i] = p
                sizes[p] += 1
                yield from place(i + 1, max(used, p + 1))
                sizes[p] -= 1

    yield from place(0, 0)


def partition_layer(
    prob: LayerProblem,
    n_parts: int,
    *,
    solver: str = "alternate",
    max_partitions: int = 5000,
    max_rounds: int = 20,
    seed: int = 0,
) -> Partition:
    """Balanced partition minimising the least-squares reconstruction error after the per-output refit.

    .. math::

        \\min_{p, q}\\ \\sum_j \\min_{w_j} \\|y_j - X_{\\{i: p(i) = q(j)\\}} w_j\\|^2 + r \\|w_j\\|^2

    Parameters
    ----------
    prob : LayerProblem
        With ``group_size == 1``.
    n_parts : int
    solver : {"alternate", "exact"}, default "alternate"
        ``"exact"``: every balanced input partition (at most ``max_partitions``), each with its exact output
        assignment; ``"alternate"``: from the weight-energy partition of ``prob.weights`` (or of the full
        least-squares weights), alternate the exact output assignment with improving input swaps.
    max_partitions : int, default 5000
        ``"exact"`` refuses layers with more balanced input partitions.
    max_rounds : int, default 20
        Alternation rounds of ``"alternate"``.
    seed : int, default 0

    Returns
    -------
    Partition
        With ``criterion="reconstruction"`` and the refit weights.
    """
    start_time = time.perf_counter()
    if not isinstance(prob, LayerProblem):
        raise ValueError(f"`prob` must be a LayerProblem, got {type(prob).__name__}.")
    if prob.group_size != 1:
        raise ValueError(f"`prob` must have group_size 1 (one feature per input), got {prob.group_size}.")
    P = _check_parts(n_parts, prob.n_features, prob.n_outputs)
    if solver not in ("alternate", "exact"):
        raise ValueError(f"`solver` must be 'alternate' or 'exact', got {solver!r}.")
    max_partitions = check_integer(max_partitions, "max_partitions", 1, 10**9)
    max_rounds = check_integer(max_rounds, "max_rounds", 1, 10**6)
    info: dict[str, Any] = {}
    if solver == "exact":
        best, best_value, count = None, math.inf, 0
        for parts_in in balanced_partitions(prob.n_features, P):
            count += 1
            if count > max_partitions:
                raise ValueError(f"the layer has more than `max_partitions` = {max_partitions} balanced input "
                                 "partitions; raise it or use solver='alternate'.")
            parts_out, value = _best_outputs(prob, parts_in, P)
            if value < best_value:
                best, best_value = (parts_in, parts_out), value
        info["partitions"] = count
        status, message = OPTIMAL, f"enumerated {count} balanced input partitions, outputs assigned exactly"
    else:
        w = prob.weights if prob.weights is not None else prob.full_weights
        best = _energy_heuristic(w**2, P, restarts=2, seed=seed)
        best = (best[0], _best_outputs(prob, best[0], P)[0])
        best, rounds = _swap_search(prob, P, *best, max_rounds)
        info["rounds"] = rounds
        status, message = FEASIBLE, "alternating exact output assignment and input swaps; bound: every input kept"
    weights, objective = partition_refit(prob, *best)
    bound = objective if status == OPTIMAL else min(prob.full_objective, objective)
    return Partition(best[0].astype(int), best[1].astype(int), weights, objective, bound,
                     relative_gap(objective, bound, prob.yy), status, solver, "reconstruction",
                     time.perf_counter() - start_time, message, info)


def _swap_search(prob: LayerProblem, P: int, parts_in: np.ndarray, parts_out: np.ndarray,
                 max_rounds: int) -> tuple[tuple[np.ndarray, np.ndarray], int]:
    """Improving swaps of two inputs of different parts (outputs fixed), then the exact output assignment."""
    parts_in = parts_in.copy()
    value = partition_refit(prob, parts_in, parts_out)[1]
    tol = 1e-12 * max(prob.yy, 1.0)
    h = prob.gram + prob.ridge * np.eye(prob.n_features)
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        gains = part_gains(prob, parts_in, P, h=h)
        current = gains[np.arange(prob.n_outputs), parts_out]
        for i in range(prob.n_features):
            for k in range(i + 1, prob.n_features):
                a, b = parts_in[i], parts_in[k]
                if a == b:
                    continue
                parts_in[i], parts_in[k] = b, a
                outs = np.flatnonzero((parts_out == a) | (parts_out == b))
                trial = part_gains(prob, parts_in, P, only=(a, b), gains=gains, h=h)  # only parts a and b change
                change = trial[outs, parts_out[outs]].sum() - current[outs].sum()
                if change > tol:
                    gains, current = trial, trial[np.arange(prob.n_outputs), parts_out]
                else:
                    parts_in[i], parts_in[k] = a, b
        new_out, new_value = _best_outputs(prob, parts_in, P)
        if new_value >= value - tol:
            break
        parts_out, value = new_out, new_value
    return (parts_in, parts_out), rounds
