"""N:M semi-structured selection: keep exactly ``n`` of every ``m`` consecutive inputs, per output.

For a Linear layer (``group_size == 1``) with inputs split into blocks
``I_b = {b m, ..., b m + m - 1}``, output column ``j`` keeps a set ``S_j`` with
``|S_j \\cap I_b| = n`` for every block, and its weights are refit by least squares:

.. math::

    \\min_{S_1..S_{n_{out}}} \\sum_j \\min_{w} \\|y_j - X_{S_j} w\\|^2 + r \\|w\\|^2
    = yy - \\sum_j \\max_{S_j} b_{j,S_j}^T (G_{S_j S_j} + r I)^{-1} b_{j,S_j}.

The output columns decouple (they share ``G`` but not their kept sets); the blocks within one
column couple through ``G``. ``"exact"`` solves each column by depth-first branch and bound over
the blocks (the bound keeps every undecided block whole, which can only lower the error);
``"greedy"`` is block-coordinate descent with exact enumeration of one block given the others;
``"magnitude"`` keeps the ``n`` largest weights of each block and refits. See
``formulations/nm_sparsity.md``.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg

from orprune._status import FEASIBLE, OPTIMAL, TIME_LIMIT
from orprune._validation import check_integer
from orprune.layer.problem import LayerProblem
from orprune.layer.result import SolverResult, relative_gap

__all__ = ["NMSelection", "select_nm"]

NM_SOLVERS = ("exact", "greedy", "magnitude")


@dataclass(frozen=True)
class NMSelection(SolverResult):
    """An N:M mask of one layer, its refit weights and the certificate the solver gives.

    Attributes
    ----------
    mask : ndarray of bool, shape (inputs, outputs)
        ``mask[i, j]``: weight from input ``i`` to output ``j`` kept; exactly ``n`` of every ``m``
        consecutive inputs per output.
    weights : ndarray, shape (inputs, outputs)
        Least-squares weights of each output column over its kept inputs; zero where ``mask`` is False.
    objective : float
        Summed reconstruction error ``sum_j ||y_j - X w_j||^2 + r ||w_j||^2``.
    bound : float
        A proven lower bound on the optimum over all N:M masks.
    gap : float
        ``(objective - bound) / objective``.
    status : str
        ``"optimal"`` (exact, every column certified), ``"time_limit"`` or ``"feasible"``.
    solver : str
        ``"exact"``, ``"greedy"`` or ``"magnitude"``.
    solve_time : float
        Wall time in seconds.
    n, m : int
        Kept inputs per block and block length.
    message : str
    info : mapping
        ``nodes`` (branch-and-bound nodes), ``sweeps`` (coordinate-descent sweeps), ``certified``
        (output columns proven optimal).
    """

    mask: np.ndarray
    weights: np.ndarray
    objective: float
    bound: float
    gap: float
    status: str
    solver: str
    solve_time: float
    n: int
    m: int
    message: str = ""
    info: Mapping[str, Any] = field(default_factory=dict)


def select_nm(
    prob: LayerProblem,
    n: int = 2,
    m: int = 4,
    *,
    solver: str = "exact",
    time_limit: float | None = None,
    max_sweeps: int = 50,
) -> NMSelection:
    """Choose an N:M mask (``n`` of every ``m`` consecutive inputs, per output) minimising the refit error.

    .. math::

        \\min_{S_j:\\ |S_j \\cap I_b| = n\\ \\forall b, j}\\ \\sum_j \\min_w \\|y_j - X_{S_j} w\\|^2 + r\\|w\\|^2

    Parameters
    ----------
    prob : LayerProblem
        With ``group_size == 1`` (one feature per input) and a number of inputs divisible by ``m``.
    n, m : int, default 2, 4
        Keep ``n`` of every ``m`` consecutive inputs, ``1 <= n <= m``.
    solver : {"exact", "greedy", "magnitude"}, default "exact"
        ``"exact"``: branch and bound per output column, warm-started by ``"greedy"`` (block-coordinate
        descent, exact per block given the rest); ``"magnitude"``: largest ``|W|`` of ``prob.weights``
        (or of the full least-squares weights) per block, then refit.
    time_limit : float, optional
        Seconds for ``"exact"``; columns not certified by then keep the greedy mask and status
        ``"time_limit"`` is returned with a valid bound.
    max_sweeps : int, default 50
        Upper limit on coordinate-descent sweeps per column.

    Returns
    -------
    NMSelection
    """
    start = time.perf_counter()
    if not isinstance(prob, LayerProblem):
        raise ValueError(f"`prob` must be a LayerProblem, got {type(prob).__name__}.")
    if prob.group_size != 1:
        raise ValueError(f"`prob` must have group_size 1 (one feature per input), got {prob.group_size}.")
    m = check_integer(m, "m", 1, prob.n_features)
    n = check_integer(n, "n", 1, m)
    if prob.n_features % m:
        raise ValueError(f"`m` must divide the number of inputs {prob.n_features}, got {m}.")
    if solver not in NM_SOLVERS:
        raise ValueError(f"`solver` must be one of {NM_SOLVERS}, got {solver!r}.")
    if time_limit is not None and not (np.isfinite(time_limit) and time_limit > 0):
        raise ValueError(f"`time_limit` must be a positive number of seconds or None, got {time_limit}.")
    max_sweeps = check_integer(max_sweeps, "max_sweeps", 1, 10**9)

    core = _Core(prob, n, m)
    deadline = math.inf if time_limit is None else start + float(time_limit)
    choices, bounds, nodes, sweeps = [], [], 0, 0
    done = np.zeros(prob.n_outputs, bool)
    for j in range(prob.n_outputs):
        if solver == "magnitude":
            choice, upper = core.magnitude(j), core.full_gain(j)
        else:
            choice, used = core.descent(j, max_sweeps)
            sweeps += used
            upper = core.full_gain(j)
            done[j] = solver == "exact" and n == m
        choices.append(choice)
        bounds.append(upper)
    if solver == "exact" and n < m:
        # Two passes: every column gets an equal share of the time left; the time columns did not need goes
        # to a second search (from its incumbent) of those that ran out. Both bounds of a column are valid.
        for _ in range(2):
            pending = np.flatnonzero(~done)
            for rank, j in enumerate(pending):
                now = time.perf_counter()
                if now >= deadline:
                    break
                share = deadline if math.isinf(deadline) else now + (deadline - now) / (len(pending) - rank)
                choices[j], upper, count, done[j] = core.branch_and_bound(j, choices[j], share)
                bounds[j] = min(bounds[j], upper)
                nodes += count
            if done.all() or time.perf_counter() >= deadline:
                break
    certified = int(done.sum()) if solver == "exact" else 0

    mask = np.zeros((prob.n_features, prob.n_outputs), dtype=bool)
    for j, choice in enumerate(choices):
        mask[core.kept(choice), j] = True
    weights, objective = nm_refit(prob, mask)
    if solver == "exact":
        # Per column, the bound is the gain no N:M mask can exceed; the constant yy is shared.
        bound = min(objective, max(prob.full_objective, prob.yy - math.fsum(bounds)))
        status = OPTIMAL if certified == prob.n_outputs else TIME_LIMIT
    else:
        bound, status = prob.full_objective, FEASIBLE
    gap = relative_gap(objective, bound, prob.yy)
    message = {
        OPTIMAL: f"every output column certified by branch and bound ({nodes} nodes)",
        TIME_LIMIT: f"time limit: {certified} of {prob.n_outputs} output columns certified ({nodes} nodes)",
        FEASIBLE: f"{solver} N:M mask; bound is the error with every input kept",
    }[status]
    info = {"nodes": nodes, "sweeps": sweeps, "certified": certified}
    return NMSelection(mask, weights, objective, bound, gap, status, solver, time.perf_counter() - start,
                       n, m, message, info)


def nm_refit(prob: LayerProblem, mask: Any) -> tuple[np.ndarray, float]:
    """Least-squares weights of each output column over its own kept inputs, and the summed error.

    Parameters
    ----------
    prob : LayerProblem
        With ``group_size == 1``.
    mask : array_like of bool, shape (inputs, outputs)

    Returns
    -------
    weights : ndarray, shape (inputs, outputs)
    objective : float
        ``yy - sum_j b_{j,S_j}^T (G_{S_j S_j} + r I)^{-1} b_{j,S_j}``.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (prob.n_features, prob.n_outputs):
        raise ValueError(f"`mask` must have shape {(prob.n_features, prob.n_outputs)}, got {mask.shape}.")
    h = prob.gram + prob.ridge * np.eye(prob.n_features)
    weights = np.zeros_like(prob.cross)
    gains = []
    for j in range(prob.n_outputs):
        cols = np.flatnonzero(mask[:, j])
        if cols.size:
            b = prob.cross[cols, j]
            weights[cols, j] = _solve(h[np.ix_(cols, cols)], b)
            gains.append(float(b @ weights[cols, j]))
    return weights, prob.yy - math.fsum(gains)


def _solve(h: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    try:
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(h), rhs)
    except np.linalg.LinAlgError:  # singular only without ridge: any least-squares solution has the same error
        return scipy.linalg.lstsq(h, rhs, cond=1e-12)[0]


class _Core:
    """Per-column gains ``b_S^T H_SS^{-1} b_S`` of N:M sets; a set is one pattern index per block."""

    def __init__(self, prob: LayerProblem, n: int, m: int) -> None:
        self.prob = prob
        self.h = prob.gram + prob.ridge * np.eye(prob.n_features)
        self.blocks = np.arange(prob.n_features).reshape(-1, m)
        self.patterns = np.array(list(itertools.combinations(range(m), n)), dtype=int)
        # Schur complements of directions already covered are rounding noise; cut them at the data's scale.
        self.threshold = 1e-10 * max(float(np.max(np.diag(self.h))), np.finfo(float).tiny)
        self.atol = 1e-9 * max(prob.yy, np.finfo(float).tiny)

    def kept(self, choice: Any) -> np.ndarray:
        """Inputs kept by one pattern index per block for the first ``len(choice)`` blocks."""
        return np.concatenate([np.zeros(0, int)] + [self.blocks[b, self.patterns[p]] for b, p in enumerate(choice)])

    def full_gain(self, j: int) -> float:
        return float(self.prob.cross[:, j] @ _solve(self.h, self.prob.cross[:, j]))

    def pattern_gains(self, j: int, base: np.ndarray, block: int) -> np.ndarray:
        """Gain of ``base`` plus each pattern of ``block``, through the Schur complement of ``base``."""
        b, cols = self.prob.cross[:, j], self.blocks[block]
        if base.size:
            sol = _solve(self.h[np.ix_(base, base)], np.column_stack([self.h[np.ix_(base, cols)], b[base]]))
            base_gain = float(b[base] @ sol[:, -1])
            schur = self.h[np.ix_(cols, cols)] - self.h[np.ix_(cols, base)] @ sol[:, :-1]
            residual = b[cols] - self.h[np.ix_(cols, base)] @ sol[:, -1]
        else:
            base_gain, schur, residual = 0.0, self.h[np.ix_(cols, cols)], b[cols]
        p = self.patterns
        sub = 0.5 * (schur[p[:, :, None], p[:, None, :]] + schur[p[:, None, :], p[:, :, None]])
        values, vectors = np.linalg.eigh(sub)
        proj = np.einsum("kij,ki->kj", vectors, residual[p])
        inverse = np.where(values > self.threshold, 1.0 / np.where(values > self.threshold, values, 1.0), 0.0)
        return base_gain + np.einsum("kj,kj->k", proj * inverse, proj)

    def magnitude(self, j: int) -> list[int]:
        w = self.prob.weights if self.prob.weights is not None else self.prob.full_weights
        scores = np.abs(w[self.blocks, j])[:, self.patterns].sum(axis=2)
        return [int(p) for p in np.argmax(scores, axis=1)]

    def descent(self, j: int, max_sweeps: int) -> tuple[list[int], int]:
        """Fix the blocks in order (undecided ones whole), then sweep: each block's best pattern given the rest."""
        n_blocks = len(self.blocks)
        choice: list[int] = []
        for block in range(n_blocks):
            base = np.concatenate([self.kept(choice), self.blocks[block + 1:].ravel()])
            choice.append(int(np.argmax(self.pattern_gains(j, base.astype(int), block))))
        sweeps = 0
        if len(self.patterns) == 1 or n_blocks == 1:
            return choice, sweeps
        while sweeps < max_sweeps:
            sweeps += 1
            improved = False
            for block in range(n_blocks):
                base = np.concatenate([self.blocks[b, self.patterns[p]] for b, p in enumerate(choice) if b != block])
                gains = self.pattern_gains(j, base, block)
                best = int(np.argmax(gains))
                if gains[best] > gains[choice[block]] + self.atol:
                    choice[block], improved = best, True
            if not improved:
                break
        return choice, sweeps

    def branch_and_bound(self, j: int, incumbent: list[int], deadline: float) -> tuple[list[int], float, int, int]:
        """Depth-first over the blocks; a node's bound keeps its undecided blocks whole.

        Returns the best choice, an upper bound on the column's gain over all N:M sets, the node count and
        1 if the column was certified (0 when stopped by ``deadline``).
        """
        n_blocks = len(self.blocks)
        best = list(incumbent)
        best_gain = self._gain(j, best)
        stack: list[tuple[float, list[int]]] = [(self.full_gain(j), [])]
        nodes = 0
        while stack:
            if time.perf_counter() > deadline:
                return best, max([best_gain] + [ub for ub, _ in stack]), nodes, 0
            upper, chosen = stack.pop()
            if upper <= best_gain + self.atol:
                continue
            nodes += 1
            depth = len(chosen)
            base = np.concatenate([self.kept(chosen), self.blocks[depth + 1:].ravel()]).astype(int)
            gains = self.pattern_gains(j, base, depth)
            if depth + 1 == n_blocks:  # children are complete sets: their gains are exact
                top = int(np.argmax(gains))
                if gains[top] > best_gain + self.atol:
                    best, best_gain = chosen + [top], float(gains[top])
                continue
            for p in np.argsort(gains):  # the most promising child is popped first
                if gains[p] > best_gain + self.atol:
                    stack.append((float(gains[p]), chosen + [int(p)]))
        return best, best_gain, nodes, 1

    def _gain(self, j: int, choice: list[int]) -> float:
        cols = self.kept(choice)
        b = self.prob.cross[cols, j]
        return float(b @ _solve(self.h[np.ix_(cols, cols)], b))
