"""Branch-and-bound over channels for the exact layer solver.

Nodes fix channels in (``kept``) or out and leave the rest ``free``; each node works on the
Schur-reduced problem of :mod:`orprune.layer.solvers._nodes`. Its lower bound is the best of

* the monotone bound ``f(A)`` (``A = kept u free``) plus the ``d``-th smallest exact single
  removal increase, ``d`` being how many free channels must still go;
* the pair-conflict test: the removal set must be a ``d``-clique of the graph of pairs that can
  be removed together below the cutoff (degree peeling and a colouring bound);
* the perspective relaxation with a split recomputed at the node (precision split by default),
  solved by alternating minimisation with early exit once it reaches the cutoff.

Channels whose removal (or keeping) provably reaches the cutoff are fixed without branching.
Nodes are explored best-first; each popped node is followed by a depth-first dive that keeps the
channel with the largest removal cost. See ``formulations/outer_approximation.md``.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from orprune.layer.solvers._nodes import (
    keep_channels,
    pair_increases,
    reduce_problem,
    removable_core,
    remove_channels,
    single_increases,
)
from orprune.layer.solvers._perspective import perspective_relaxation, perspective_split, spd_inverse, top_sum

__all__ = ["BranchAndBound"]


def _safe(bound: float) -> float:
    """Bounds lose a little to rounding; give it back before comparing with the cutoff."""
    return bound - 1e-12 - 1e-9 * abs(bound)


@dataclass
class _Counters:
    nodes: int = 0
    leaves: int = 0
    pruned: dict = field(default_factory=lambda: {"single": 0, "pairs": 0, "relaxation": 0})
    fixed_in: int = 0
    fixed_out: int = 0
    relaxation_iterations: int = 0
    incumbent_updates: int = 0
    root_bound: float = float("-inf")
    root_relaxation: float = float("-inf")


class BranchAndBound:
    """Best-first branch-and-bound with dives (all quantities normalised so that ``yy = 1``).

    Parameters
    ----------
    H, B, yy, g, k
        ``H = G + rI`` (positive definite unless ``singular``), ``B``, ``||Y||^2``, group size,
        channels to keep.
    evaluate : callable
        Exact error of a boolean mask (used for every incumbent).
    incumbent : ndarray of bool
        Starting solution; its value is ``evaluate(incumbent)``.
    rel_gap : float
        Nodes whose bound is within ``rel_gap`` of the incumbent are closed.
    deadline : float or None
        ``time.perf_counter()`` value at which the search stops.
    polish : callable, optional
        ``polish(mask) -> (mask, value)``, applied to every new incumbent.
    singular : bool
        ``H`` is not positive definite: bounds are then computed by direct evaluation of
        subsets (monotone and single-removal bounds only).
    """

    def __init__(self, H: np.ndarray, B: np.ndarray, yy: float, g: int, k: int, *,
                 evaluate: Callable[[np.ndarray], float], incumbent: np.ndarray, rel_gap: float,
                 deadline: float | None, split: str = "precision", ridge: float = 0.0,
                 pairs: bool = True, relaxation: bool = True, relax_iter: int = 20,
                 root_iter: int = 200, polish: Callable | None = None, singular: bool = False,
                 branching: str = "removal") -> None:
        self.H, self.B, self.yy, self.g, self.k = H, B, yy, g, k
        self.C = H.shape[0] // g
        self.evaluate, self.polish = evaluate, polish
        self.rel_gap, self.deadline = rel_gap, deadline
        self.split, self.ridge = split, ridge
        self.pairs, self.relaxation = pairs and not singular, relaxation and not singular
        self.relax_iter, self.root_iter, self.singular = relax_iter, root_iter, singular
        self.branching = branching
        self.best_mask = np.asarray(incumbent, dtype=bool).copy()
        self.best = float(evaluate(self.best_mask))
        self.closed = np.inf  # smallest bound of any node closed so far
        self.heap: list = []
        self.counter = 0
        self.stats = _Counters()

    # ------------------------------------------------------------------ bookkeeping
    def cutoff(self) -> float:
        return self.best - max(self.rel_gap * abs(self.best), 1e-11)

    def _close(self, bound: float) -> None:
        self.closed = min(self.closed, bound)

    def _push(self, bound: float, kept: list[int], free: list[int], z: np.ndarray | None) -> None:
        self.counter += 1
        heapq.heappush(self.heap, (bound, self.counter, tuple(kept), tuple(free), z))

    def _offer(self, channels: list[int]) -> float:
        mask = np.zeros(self.C, dtype=bool)
        mask[channels] = True
        value = float(self.evaluate(mask))
        self.stats.leaves += 1
        if value < self.best:
            self.best, self.best_mask = value, mask
            self.stats.incumbent_updates += 1
            if self.polish is not None:
                polished, polished_value = self.polish(mask)
                if polished_value < self.best:
                    self.best, self.best_mask = float(polished_value), polished
        return value

    def _time_up(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def lower_bound(self) -> float:
        """Proven lower bound on the optimum (over the open and the closed nodes)."""
        open_min = min((entry[0] for entry in self.heap), default=np.inf)
        return min(self.best, self.closed, open_min)

    # ------------------------------------------------------------------ search
    def run(self) -> bool:
        """Search until every node is closed (returns True) or the deadline (False)."""
        self._push(-np.inf, [], list(range(self.C)), None)
        while self.heap:
            if self._time_up():
                return False
            bound, _, kept, free, z = heapq.heappop(self.heap)
            if bound >= self.cutoff():
                self._close(bound)
                continue
            self._dive(list(kept), list(free), bound, z)
        return True

    def _analyse(self, kept, free, P, R, e0):
        """Monotone value ``f(A)``, single-removal increases, and ``(M, w)`` when available."""
        if P is not None:
            try:
                M = spd_inverse(P)
                w = M @ R
                return e0 - float(np.sum(R * w)), single_increases(M, w, self.g), M, w
            except np.linalg.LinAlgError:
                pass
        everything = kept + free
        mask = np.zeros(self.C, dtype=bool)
        mask[everything] = True
        f_all = float(self.evaluate(mask))
        delta = np.empty(len(free))
        for i, c in enumerate(free):
            mask[c] = False
            delta[i] = float(self.evaluate(mask)) - f_all
            mask[c] = True
        return f_all, np.maximum(delta, 0.0), None, None

    def _dive(self, kept: list[int], free: list[int], bound: float, z: np.ndarray | None) -> None:
        g, k = self.g, self.k
        P = R = None
        e0 = 0.0
        if not self.singular:
            P, R, e0 = reduce_problem(self.H, self.B, self.yy, g, kept, free)
        root = self.stats.nodes == 0
        # Keeping channels restricts P^{-1} to a principal submatrix, so the split of the
        # parent (restricted) stays valid; it is recomputed only after a removal.
        D = None
        while True:
            if self._time_up():
                self._push(bound, kept, free, z)
                return
            self.stats.nodes += 1
            m, n_free = k - len(kept), len(free)
            d = n_free - m
            if m == 0:
                self._close(self._offer(kept))
                return
            f_all, delta, M, w = self._analyse(kept, free, P, R, e0)
            if d == 0:
                self._close(self._offer(kept + free))
                return
            if d == 1:  # exact: remove the cheapest channel
                j = int(np.argmin(delta))
                self._close(self._offer(kept + free[:j] + free[j + 1:]))
                return
            cutoff = self.cutoff()
            bound = max(bound, _safe(f_all + float(np.sort(delta)[d - 1])))
            if root:
                self.stats.root_bound = bound
            if bound >= cutoff:
                self.stats.pruned["single"] += 1
                self._close(bound)
                return
            theta = cutoff - f_all
            alive = delta < theta
            if self.pairs and M is not None:
                compatible = pair_increases(M, w, g) < theta
                alive, possible = removable_core(compatible, alive, d)
                if not possible:
                    self.stats.pruned["pairs"] += 1
                    self._close(cutoff)
                    return
            if alive.sum() < d:
                self.stats.pruned["single"] += 1
                self._close(cutoff)
                return
            must_keep = np.flatnonzero(~alive)
            must_remove = np.zeros(0, dtype=int)
            in_bound = out_bound = None
            if (must_keep.size == 0 or root) and self.relaxation and M is not None:
                if D is None or self.split in ("uniform", "block"):
                    D = perspective_split(P, g, self.split, ridge=self.ridge, P_inv=M)
                rel = perspective_relaxation(P, R, e0, D, m, cutoff=cutoff, z0=z,
                                             max_iter=self.root_iter if root else self.relax_iter,
                                             rel_tol=1e-5 if root else 1e-3, deadline=self.deadline)
                self.stats.relaxation_iterations += rel.iterations
                z = rel.z
                bound = max(bound, _safe(rel.bound))
                if root:
                    self.stats.root_relaxation = rel.bound
                    self.stats.root_bound = bound
                if bound >= cutoff:
                    self.stats.pruned["relaxation"] += 1
                    self._close(bound)
                    return
                in_bound, out_bound = _forced_bounds(rel.constant, rel.slopes, m)
                must_keep = np.union1d(must_keep, np.flatnonzero(_safe_array(out_bound) >= cutoff))
                must_remove = np.flatnonzero(_safe_array(in_bound) >= cutoff)
                if np.intersect1d(must_keep, must_remove).size or must_keep.size > m or must_remove.size > d:
                    self.stats.pruned["relaxation"] += 1
                    self._close(cutoff)
                    return
            root = False
            if must_keep.size or must_remove.size:
                self.stats.fixed_in += must_keep.size
                self.stats.fixed_out += must_remove.size
                keep_set, remove_set = set(must_keep.tolist()), set(must_remove.tolist())
                remaining = [i for i in range(n_free) if i not in remove_set]
                if P is not None:
                    if remove_set:
                        P, R = remove_channels(P, R, must_remove, g)
                    if keep_set:
                        position = {i: p for p, i in enumerate(remaining)}
                        P, R, e0 = keep_channels(P, R, e0, np.array([position[i] for i in sorted(keep_set)]), g)
                stay = [i for i in remaining if i not in keep_set]
                D = None if (D is None or remove_set) else D[stay]
                kept = kept + [free[i] for i in sorted(keep_set)]
                free = [free[i] for i in stay]
                z = None if z is None else z[stay]
                continue
            # Branch on the channel whose two children have the best worse bound (dual
            # information of the relaxation cut), or the most expensive channel to remove.
            remove_bounds = np.maximum(bound, _safe_array(f_all + delta))
            keep_bounds = np.full(n_free, bound)
            if out_bound is not None:
                remove_bounds = np.maximum(remove_bounds, _safe_array(out_bound))
                keep_bounds = np.maximum(keep_bounds, _safe_array(in_bound))
            if self.branching == "dual" and out_bound is not None:
                j = int(np.argmax(np.minimum(remove_bounds, keep_bounds) + 1e-3 * np.maximum(remove_bounds, keep_bounds)))
            else:
                j = int(np.argmax(delta))
            others = [i for i in range(n_free) if i != j]
            child_z = None if z is None else z[others]
            dive_keep = keep_bounds[j] <= remove_bounds[j]
            queued = (remove_bounds[j], kept, free[:j] + free[j + 1:]) if dive_keep else \
                (keep_bounds[j], kept + [free[j]], free[:j] + free[j + 1:])
            if queued[0] < cutoff:
                self._push(*queued, child_z)
            else:
                self._close(queued[0])
            if dive_keep:
                bound = keep_bounds[j]
                if P is not None:
                    P, R, e0 = keep_channels(P, R, e0, np.array([j]), g)
                kept = kept + [free[j]]
                D = None if D is None else D[others]
            else:
                bound = remove_bounds[j]
                if P is not None:
                    P, R = remove_channels(P, R, np.array([j]), g)
                D = None
            free = free[:j] + free[j + 1:]
            z = child_z
            if bound >= self.cutoff():
                self._close(bound)
                return


def _safe_array(values: np.ndarray) -> np.ndarray:
    return values - 1e-12 - 1e-9 * np.abs(values)


def _forced_bounds(constant: float, slopes: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Bounds of the dual cut when each channel is forced in (first) or out (second).

    ``error >= constant - slopes @ z``; forcing ``c`` in leaves the ``m - 1`` largest other
    slopes, forcing it out the ``m`` largest other slopes.
    """
    n = slopes.size
    order = np.argsort(-slopes)
    rank = np.empty(n, dtype=int)
    rank[order] = np.arange(n)
    top_m = top_sum(slopes, m)
    top_m1 = top_sum(slopes, m - 1)
    next_m = float(slopes[order[m]]) if m < n else 0.0  # the (m+1)-th largest
    mth = float(slopes[order[m - 1]])
    # forced in: s_c + (m-1 largest of the others)
    others_m1 = np.where(rank < m - 1, top_m1 - slopes + mth, top_m1)
    in_bound = constant - slopes - others_m1
    # forced out: m largest of the others
    others_m = np.where(rank < m, top_m - slopes + next_m, top_m)
    out_bound = constant - others_m
    return in_bound, out_bound
