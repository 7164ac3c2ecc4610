"""Certified channel selection by a combinatorial branch and bound: ``select(prob, k, solver="bnb")``.

.. math::

    \\min_{S,\\ |S| = k}\\ f(S) = \\|Y\\|_F^2 - \\operatorname{tr}\\left(B_S^T (G_{SS} + rI)^{-1} B_S\\right)

No MILP is formed: the search branches on channel indicators, each node carries the Schur complement
of its kept channels and the inverse on its superset, both updated by rank-``g`` blocks
(:mod:`orprune.layer.solvers._tree`), and is bounded by the superset value, single-removal costs,
separable removal / keep bounds of the root's precision split and the perspective relaxation with that
split (:mod:`orprune.layer.solvers._tree_search`). The incumbent comes from ``swap`` (greedy and
backward elimination polished by 1-swap search). See ``formulations/branch_and_bound.md``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from orprune._status import OPTIMAL
from orprune._validation import check_integer
from orprune.layer.problem import LayerProblem
from orprune.layer.solvers._perspective import perspective_split
from orprune.layer.solvers._tree_search import BRANCHING, RELAXATION_MODES, TreeSearch
from orprune.layer.solvers.exact import _thread_limit
from orprune.layer.solvers.local_search import polished_start, swap_local_search
from orprune.layer.solvers.registry import certified_selection, make_selection, register_solver

__all__ = ["solve_bnb"]

# Below this smallest eigenvalue of (G + rI) / mean diagonal the rank-g updates are not trusted and
# nodes are bounded by direct evaluation of subsets instead.
_SINGULAR = 1e-8
_PERSPECTIVE_START_CHANNELS = 16


def _check(mip_rel_gap, relaxation, relax_iter, initial, n_channels, k):
    if isinstance(mip_rel_gap, bool) or not (isinstance(mip_rel_gap, (int, float)) and 0 <= mip_rel_gap < 1):
        raise ValueError(f"`mip_rel_gap` must be a number in [0, 1), got {mip_rel_gap!r}.")
    if relaxation not in RELAXATION_MODES:
        raise ValueError(f"`relaxation` must be one of {RELAXATION_MODES}, got {relaxation!r}.")
    check_integer(relax_iter, "relax_iter", 1, 10**6)
    if initial is not None:
        initial = np.asarray(initial)
        if initial.shape != (n_channels,) or initial.dtype != bool or int(initial.sum()) != k:
            raise ValueError(f"`initial` must be a boolean mask of shape ({n_channels},) with {k} entries set.")
    return initial


@register_solver("bnb", exact=True,
                 description="certified optimum: combinatorial branch and bound with rank-g node updates")
def solve_bnb(
    prob: LayerProblem,
    k: int,
    *,
    time_limit: float | None = None,
    mip_rel_gap: float = 1e-4,
    relaxation: str = "nodes",
    relax_iter: int = 20,
    local_search: bool = True,
    initial: Any | None = None,
    perspective_start: bool | None = None,
    log_every: float = 5.0,
    node_split: bool = True,
    branching: str = "removal",
):
    """Certified optimal selection of ``k`` channels (a :class:`~orprune.layer.result.Selection`).

    Parameters
    ----------
    prob : LayerProblem
    k : int
        Channels to keep, ``0 < k < C`` (``orprune.select`` handles the trivial counts).
    time_limit : float, optional
        Seconds. When reached, the incumbent is returned with status ``"time_limit"``, the proven
        bound (the smallest bound of any open or closed node) and the gap, with a ``RuntimeWarning``.
    mip_rel_gap : float, default 1e-4
        Nodes whose bound is within ``mip_rel_gap`` (relative) of the incumbent are closed.
    relaxation : {"nodes", "root", "never"}, default "nodes"
        Where the perspective relaxation (root precision split) bounds nodes the cheap bounds left
        open: every such node, the root only, or nowhere.
    relax_iter : int, default 20
        Alternating-minimisation iterations of the relaxation per node (200 at the root).
    local_search : bool, default True
        Polish the starts and every new incumbent by swap local search.
    initial : array_like of bool, optional
        A warm-start mask with ``k`` channels.
    perspective_start : bool, optional
        Also start from the ``perspective`` solver's rounding (default: layers of more than 16 channels).
    log_every : float, default 5.0
        Seconds between progress lines of the proof log ``info["log"]``.
    node_split : bool, default True
        Recompute the precision split after every removal (one eigenvalue problem per such node; a kept
        channel only restricts it); ``False`` restricts the root's split everywhere.
    branching : {"removal", "bounds"}, default "removal"
        Branch on the free channel most expensive to drop (exact single-removal cost), or on the one
        whose weaker child bound is largest.

    Returns
    -------
    Selection
        ``info`` holds ``nodes``, ``leaves``, ``restarts``, ``pruned`` (by the bound that closed the
        node), ``fixed_in`` / ``fixed_out`` (screening), ``relaxation_iterations``, ``root_bound``,
        ``root_superset``, ``root_relaxation``, ``open_nodes``, ``cpu_time`` and ``log`` (the proof
        log: root bounds, incumbents, progress and the final bound).
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    C = prob.n_channels
    k = check_integer(k, "k", 1, C - 1)
    initial = _check(mip_rel_gap, relaxation, relax_iter, initial, C, k)
    if branching not in BRANCHING:
        raise ValueError(f"`branching` must be one of {BRANCHING}, got {branching!r}.")
    if not (isinstance(log_every, (int, float)) and log_every > 0):
        raise ValueError(f"`log_every` must be a positive number of seconds, got {log_every!r}.")
    deadline = None if time_limit is None else start + float(time_limit)
    with _thread_limit():
        if perspective_start if perspective_start is not None else C > _PERSPECTIVE_START_CHANNELS:
            from orprune.layer.solvers.perspective import solve_perspective

            rounded = solve_perspective(prob, k, time_limit=time_limit).mask
            if initial is None or prob.objective(rounded) < prob.objective(initial):
                initial = rounded
        selection = _solve(prob, k, start, deadline, float(mip_rel_gap), relaxation, int(relax_iter),
                           bool(local_search), initial, float(log_every), bool(node_split), branching)
    selection.info["cpu_time"] = time.process_time() - cpu_start
    return selection


def _solve(prob, k, start, deadline, rel_gap, relaxation, relax_iter, local_search, initial, log_every, node_split,
           branching):
    C, g, yy = prob.n_channels, prob.group_size, prob.yy
    info: dict[str, Any] = {}
    incumbent, value, _, start_info = polished_start(prob, k, initial=initial, local_search=local_search,
                                                     deadline=deadline)
    info.update(start_info)
    info["heuristic_time"] = time.perf_counter() - start
    H = prob.gram + prob.ridge * np.eye(prob.n_features)
    scale = float(np.mean(np.diag(H)))
    if yy <= 0 or scale <= 0:  # Y = 0 or X = 0: every mask has the same error
        return make_selection(prob, incumbent, solver="bnb", status=OPTIMAL, start_time=start, bound=value,
                              message="every mask has the same error", info=info)
    Hn = H / scale
    Bn = prob.cross / np.sqrt(scale * yy)

    def evaluate(mask):
        return prob.objective(mask) / yy

    def polish(mask):
        if not local_search:
            return mask, evaluate(mask)
        better, better_value, _ = swap_local_search(prob, mask, deadline=deadline)
        return better, better_value / yy

    singular = float(np.linalg.eigvalsh(Hn)[0]) <= _SINGULAR
    info["singular"] = singular
    if singular:
        engine = _DirectSearch(C, k, evaluate, incumbent, rel_gap, deadline)
        complete = engine.run()
        info.update(nodes=engine.nodes, log=[f"G + rI singular: superset bounds by direct evaluation, "
                                             f"{engine.nodes} nodes"])
    else:
        D = perspective_split(Hn, g, "precision")
        engine = TreeSearch(Hn, Bn, g, k, D, evaluate=evaluate, incumbent=incumbent, rel_gap=rel_gap,
                            deadline=deadline, polish=polish, relaxation=relaxation, relax_iter=relax_iter,
                            log_every=log_every, yy=yy, node_split=node_split,
                            branching=branching)
        complete = engine.run()
        s = engine.stats
        info.update(nodes=s.nodes, leaves=s.leaves, restarts=s.restarts, refactorisations=s.refactorisations,
                    pruned=dict(s.pruned), fixed_in=s.fixed_in, fixed_out=s.fixed_out,
                    relaxation_iterations=s.relaxation_iterations, incumbent_updates=s.incumbent_updates,
                    max_depth=s.max_depth, open_nodes=len(engine.open),
                    root_superset=engine.root.get("superset", np.nan) * yy,
                    root_cheap_bound=engine.root.get("cheap", np.nan) * yy,
                    root_relaxation=engine.root.get("relaxation", np.nan) * yy,
                    root_bound=engine.root.get("bound", np.nan) * yy, log=engine.log)
    return certified_selection(prob, engine.best_mask, engine.lower_bound() * yy, complete=complete,
                               rel_gap=rel_gap, solver="bnb", start_time=start, info=info)


class _DirectSearch:
    """Depth-first search with superset bounds by direct evaluation (``G + rI`` singular).

    ``f(K u U)`` plus the ``d``-th smallest exact single-removal increase bounds every completion
    (the error never decreases when channels are removed); the subsets are evaluated by
    :meth:`LayerProblem.objective`, which handles a singular Gram matrix.
    """

    def __init__(self, C, k, evaluate, incumbent, rel_gap, deadline):
        self.C, self.k, self.evaluate, self.rel_gap, self.deadline = C, k, evaluate, rel_gap, deadline
        self.best_mask = np.asarray(incumbent, dtype=bool).copy()
        self.best = float(evaluate(self.best_mask))
        self.closed = np.inf
        self.open: list = []
        self.nodes = 0

    def lower_bound(self) -> float:
        return min([self.best, self.closed] + [bound for bound, _, _ in self.open])

    def _value(self, channels) -> float:
        mask = np.zeros(self.C, dtype=bool)
        mask[list(channels)] = True
        value = float(self.evaluate(mask))
        if value < self.best:
            self.best, self.best_mask = value, mask
        return value

    def run(self) -> bool:
        self.open = [(-np.inf, (), tuple(range(self.C)))]
        while self.open:
            if self.deadline is not None and time.perf_counter() > self.deadline:
                return False
            bound, kept, free = self.open.pop()
            self.nodes += 1
            m, d = self.k - len(kept), len(free) - (self.k - len(kept))
            if m == 0 or d == 0:
                self.closed = min(self.closed, self._value(kept if m == 0 else kept + free))
                continue
            f_all = float(self.evaluate(self._mask(kept + free)))
            increase = np.array([self.evaluate(self._mask(kept + free[:i] + free[i + 1:])) - f_all
                                 for i in range(len(free))])
            bound = max(bound, f_all + float(np.sort(np.maximum(increase, 0.0))[d - 1]))
            bound -= 1e-12 + 1e-9 * abs(bound)
            if bound >= self.best - max(self.rel_gap * abs(self.best), 1e-11):
                self.closed = min(self.closed, bound)
                continue
            j = int(np.argmax(increase))
            rest = free[:j] + free[j + 1:]
            self.open.append((bound, kept, rest))  # drop j (explored second)
            self.open.append((bound, kept + (free[j],), rest))  # keep j
        return True

    def _mask(self, channels) -> np.ndarray:
        mask = np.zeros(self.C, dtype=bool)
        mask[list(channels)] = True
        return mask
