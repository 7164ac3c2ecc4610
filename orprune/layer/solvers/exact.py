"""Certified channel selection: ``select(prob, k, solver="exact")``.

.. math::

    \\min_{S,\\ |S| = k}\\ f(S) = \\|Y\\|_F^2 - \\operatorname{tr}\\left(B_S^T (G_{SS} + rI)^{-1} B_S\\right)

HiGHS cannot solve this mixed-integer quadratic program directly, so it is solved by one of two
certified schemes built on the perspective extension of ``f`` (see
``formulations/outer_approximation.md``):

* ``method="bnb"`` (default): a best-first branch-and-bound over channels whose nodes are bounded
  by monotone / single- and pair-removal bounds and the perspective relaxation with a precision
  split recomputed at each node (:mod:`orprune.layer.solvers._bnb`);
* ``method="oa"``: outer approximation with a HiGHS MILP master over the binaries and dual cuts
  of the perspective extension (:mod:`orprune.layer.solvers._oa`).

Both start from greedy selection polished by swap local search, and return the incumbent, a
proven lower bound and the gap.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import numpy as np

from orprune._status import OPTIMAL
from orprune._validation import check_integer
from orprune.layer.problem import LayerProblem
from orprune.layer.solvers._bnb import BranchAndBound
from orprune.layer.solvers._perspective import SPLITS
from orprune.layer.solvers.greedy import greedy_path
from orprune.layer.solvers.local_search import polished_start, swap_local_search
from orprune.layer.solvers.registry import certified_selection, make_selection, register_solver

__all__ = ["solve_exact", "METHODS"]

METHODS = ("bnb", "oa")
BRANCHING = ("removal", "dual")

# Below this smallest eigenvalue of G + rI (relative to its mean diagonal) the Schur-complement
# bounds are not trusted and nodes are bounded by direct evaluation of subsets instead.
_SINGULAR = 1e-8
_PERSPECTIVE_START_CHANNELS = 16  # wider layers also start from the perspective rounding


def _thread_limit():
    """One BLAS thread: the matrices are small and the machine is usually shared."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional
        return nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _check_options(mip_rel_gap, method, split, branching, initial, n_channels, k):
    if not (isinstance(mip_rel_gap, (int, float)) and 0 <= mip_rel_gap < 1):
        raise ValueError(f"`mip_rel_gap` must be a number in [0, 1), got {mip_rel_gap!r}.")
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}.")
    if branching not in BRANCHING:
        raise ValueError(f"`branching` must be one of {BRANCHING}, got {branching!r}.")
    if initial is not None:
        initial = np.asarray(initial)
        if initial.shape != (n_channels,) or initial.dtype != bool or int(initial.sum()) != k:
            raise ValueError(f"`initial` must be a boolean mask of shape ({n_channels},) with {k} entries set.")
    return initial


@register_solver("exact", exact=True, requires=("highspy",),
                 description="certified optimum: branch-and-bound / outer approximation with perspective cuts")
def solve_exact(
    prob: LayerProblem,
    k: int,
    *,
    time_limit: float | None = None,
    mip_rel_gap: float = 1e-4,
    method: str = "bnb",
    split: str = "precision",
    pairs: bool = False,
    relaxation: bool = True,
    relax_iter: int = 20,
    local_search: bool = True,
    initial: Any | None = None,
    branching: str = "removal",
    perspective_start: bool | None = None,
):
    """Certified optimal selection of ``k`` channels (a :class:`~orprune.layer.result.Selection`).

    .. math::

        \\min_{|S| = k}\\ \\|Y\\|_F^2 - \\operatorname{tr}\\left(B_S^T (G_{SS} + rI)^{-1} B_S\\right)

    solved to ``mip_rel_gap`` with perspective (precision-split) relaxations; see
    ``formulations/outer_approximation.md``.

    Parameters
    ----------
    prob : LayerProblem
    k : int
        Channels to keep, ``0 < k < C`` (``orprune.select`` handles the trivial counts).
    time_limit : float, optional
        Seconds (``None``: no limit; layers of more than ~20 strongly correlated channels can
        take hours to certify). When reached, the incumbent is returned with status
        ``"time_limit"``, its proven bound and gap, and a ``RuntimeWarning`` quoting the gap.
    mip_rel_gap : float, default 1e-4
        Stop when ``(objective - bound) / objective <= mip_rel_gap``.
    method : {"bnb", "oa"}
        Custom branch-and-bound (default) or outer approximation with a HiGHS MILP master.
    split : {"precision", "block", "uniform", "ridge"}
        Block-diagonal part ``D <= G + rI`` of the perspective extension. ``"ridge"`` is plain
        outer approximation; ``"precision"`` (default) is the strongest cheap split measured.
    pairs : bool, default False
        Pair-removal conflict bounds at the nodes (``"bnb"``).
    relaxation : bool, default True
        Perspective relaxation at the nodes (``"bnb"``).
    relax_iter : int, default 20
        Alternating-minimisation iterations per node relaxation.
    local_search : bool, default True
        Polish the greedy and backward-elimination starts and every new incumbent with swap
        local search.
    initial : array_like of bool, optional
        A warm-start mask with ``k`` channels; the best of it and the heuristic starts is used.
    branching : {"removal", "dual"}, default "removal"
        Branch on the free channel most expensive to remove, or on the one whose children have
        the best bounds according to the relaxation's dual cut (``"bnb"``).
    perspective_start : bool, optional
        Also start from the ``perspective`` solver's polished rounding (about 0.3-2 s). Default:
        for layers of more than 16 channels, where it found better incumbents than the search
        within a minute (``benchmarks/results/layer_solvers_resnet20.md``); below, the search
        certifies the optimum faster than the relaxation solves.

    Returns
    -------
    Selection
        ``info`` holds the counters: ``nodes``, ``leaves``, ``pruned``, ``fixed_in``,
        ``fixed_out``, ``relaxation_iterations``, ``root_bound`` (``"bnb"``) or
        ``master_solves``, ``cuts``, ``master_nodes``, ``root_bound`` (``"oa"``), with the
        greedy and local-search values and the phase times.
    """
    start = time.perf_counter()
    C = prob.n_channels
    k = check_integer(k, "k", 1, C - 1)
    initial = _check_options(mip_rel_gap, method, split, branching, initial, C, k)
    relax_iter = check_integer(relax_iter, "relax_iter", 1, 10**6)
    deadline = None if time_limit is None else start + float(time_limit)
    with _thread_limit():
        if perspective_start if perspective_start is not None else C > _PERSPECTIVE_START_CHANNELS:
            from orprune.layer.solvers.perspective import solve_perspective

            rounded = solve_perspective(prob, k, time_limit=time_limit).mask
            initial = rounded if initial is None or prob.objective(rounded) < prob.objective(initial) else initial
        return _solve(prob, k, start, deadline, float(mip_rel_gap), method, split, bool(pairs),
                      bool(relaxation), relax_iter, bool(local_search), initial, branching)


def _solve(prob, k, start, deadline, rel_gap, method, split, pairs, relaxation, relax_iter,
           local_search, initial, branching):
    C, g = prob.n_channels, prob.group_size
    info: dict[str, Any] = {"method": method, "split": split}
    H = prob.gram + prob.ridge * np.eye(prob.n_features)
    scale = float(np.mean(np.diag(H)))
    if prob.yy <= 0 or scale <= 0:  # Y = 0 or X = 0: every mask has the same error
        order, _ = greedy_path(prob, k)
        mask = np.zeros(C, dtype=bool)
        mask[order] = True
        return make_selection(prob, mask, solver="exact", status=OPTIMAL, start_time=start,
                              bound=prob.objective(mask), message="every mask has the same error", info=info)
    # Normalise: unit mean diagonal and ||Y||^2 = 1, so tolerances are relative.
    Hn = H / scale
    Bn = prob.cross / np.sqrt(scale * prob.yy)
    yy = prob.yy

    def evaluate(mask: np.ndarray) -> float:
        return prob.objective(mask) / yy

    def polish(mask: np.ndarray) -> tuple[np.ndarray, float]:
        if not local_search:
            return mask, evaluate(mask)
        better, value, _ = swap_local_search(prob, mask, deadline=deadline)
        return better, value / yy

    incumbent, _, greedy_mask, start_info = polished_start(prob, k, initial=initial,
                                                           local_search=local_search, deadline=deadline)
    info.update(start_info)
    info["heuristic_time"] = time.perf_counter() - start

    lam_min = float(np.linalg.eigvalsh(Hn)[0])
    singular = lam_min <= _SINGULAR
    info["singular"] = singular
    if method == "oa" and singular:
        info["method"] = method = "bnb"
        info["note"] = "G + rI is singular: outer approximation needs it definite; used bnb"
    ridge = prob.ridge / scale
    if method == "oa":
        from orprune.layer.solvers._oa import OuterApproximation

        engine = OuterApproximation(Hn, Bn, 1.0, g, k, evaluate=evaluate, incumbent=incumbent,
                                    rel_gap=rel_gap, deadline=deadline, split=split, ridge=ridge,
                                    polish=polish, starts=(greedy_mask,))
        complete = engine.run()
        bound = engine.bound
        info.update(engine.stats)
    else:
        engine = BranchAndBound(Hn, Bn, 1.0, g, k, evaluate=evaluate, incumbent=incumbent,
                                rel_gap=rel_gap, deadline=deadline, split=split, ridge=ridge,
                                pairs=pairs, relaxation=relaxation, relax_iter=relax_iter,
                                polish=polish, singular=singular, branching=branching)
        complete = engine.run()
        bound = engine.lower_bound()
        stats = engine.stats
        info.update(nodes=stats.nodes, leaves=stats.leaves, pruned=dict(stats.pruned),
                    fixed_in=stats.fixed_in, fixed_out=stats.fixed_out,
                    relaxation_iterations=stats.relaxation_iterations,
                    incumbent_updates=stats.incumbent_updates,
                    root_bound=stats.root_bound * yy, root_relaxation=stats.root_relaxation * yy)
    if method == "oa":
        info["root_bound"] = info["root_bound"] * yy
    return certified_selection(prob, engine.best_mask, bound * yy, complete=complete, rel_gap=rel_gap,
                               solver="exact", start_time=start, info=info)
