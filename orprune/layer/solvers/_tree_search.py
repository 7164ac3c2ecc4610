"""The search of ``solver="bnb"``: depth-first dives with best-bound restarts over channel indicators.

A dive follows one child at every node (the one with the smaller bound), queues the other with its
bound, fixes channels by screening and stops at a leaf or a pruned node; the search then restarts from
the queued node of smallest bound (refactorised once, :func:`build_state`). Every node is bounded by
the cheap bounds of :func:`node_bounds` and, where they do not prune, by the perspective relaxation
with the root's split restricted to the free channels. See ``formulations/branch_and_bound.md``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from orprune.layer.solvers._bnb import _forced_bounds
from orprune.layer.solvers._perspective import perspective_relaxation, perspective_split
from orprune.layer.solvers._tree import NodeState, build_state, drop, keep, node_bounds, safe

__all__ = ["TreeSearch", "RELAXATION_MODES", "BRANCHING"]

#: When the perspective relaxation runs at a node: at every node the cheap bounds did not prune,
#: at the root only, or never.
RELAXATION_MODES = ("nodes", "root", "never")

#: Branching rules: the free channel most expensive to drop, or the one whose weaker child bound is largest.
BRANCHING = ("removal", "bounds")


@dataclass
class Counters:
    nodes: int = 0
    leaves: int = 0
    restarts: int = 0
    refactorisations: int = 0
    pruned: dict = field(default_factory=lambda: {"superset": 0, "removal": 0, "keep": 0, "relaxation": 0,
                                                  "screening": 0})
    fixed_in: int = 0
    fixed_out: int = 0
    relaxation_iterations: int = 0
    incumbent_updates: int = 0
    max_depth: int = 0


class TreeSearch:
    """Branch and bound over channels, quantities normalised so that ``||Y||^2 = 1``.

    Parameters
    ----------
    H, B : ndarray
        ``(G + rI) / s`` (positive definite) and ``B / sqrt(s ||Y||^2)``.
    g, k : int
    D : ndarray, shape (C, g, g)
        Blocks of a positive definite split ``D <= H`` (valid, restricted, at every node).
    evaluate : callable
        Exact normalised error of a boolean mask.
    incumbent : ndarray of bool
    rel_gap : float
    deadline : float or None
    polish : callable, optional
        ``polish(mask) -> (mask, value)`` for every new incumbent.
    relaxation : {"nodes", "root", "never"}
    relax_iter, root_iter : int
        Alternating-minimisation iterations of the relaxation at nodes / at the root.
    log_every : float
        Seconds between progress lines of the proof log.
    restart_nodes : int
        Nodes between best-bound restarts (otherwise the newest open node is resumed: depth first).
        Default 1: every dive restarts from the best bound; on a 24-channel instance it proved the
        optimum in 10.7 s CPU against 9.6 s with 200, and its bound after 5 s left a 14% gap against 37%.
    node_split : bool
        Recompute the precision split after every removal (one eigenvalue problem; a kept channel
        only restricts it) instead of restricting the root's split ``D`` everywhere.
    branching : {"removal", "bounds"}
        Branch on the free channel with the largest exact removal cost (default; measured 2x fewer
        nodes), or on the one whose weaker child bound is largest.
    """

    def __init__(self, H, B, g, k, D, *, evaluate: Callable, incumbent, rel_gap: float, deadline: float | None,
                 polish: Callable | None = None, relaxation: str = "nodes", relax_iter: int = 20,
                 root_iter: int = 200, log_every: float = 5.0, yy: float = 1.0,
                 restart_nodes: int = 1, node_split: bool = True,
                 branching: str = "removal") -> None:
        self.H, self.B, self.g, self.k = H, B, g, k
        self.C = H.shape[0] // g
        self.D = D
        self.evaluate, self.polish = evaluate, polish
        self.rel_gap, self.deadline = rel_gap, deadline
        self.relaxation, self.relax_iter, self.root_iter = relaxation, relax_iter, root_iter
        self.node_split, self.branching = node_split, branching
        self.probe: list | None = None  # [rng, weight, estimate] while estimating the tree size
        self.best_mask = np.asarray(incumbent, dtype=bool).copy()
        self.best = float(evaluate(self.best_mask))
        self.closed = np.inf
        self.open: list = []  # [bound, kept, free, z, parent state or None, position, keep?, split]
        self.restart_nodes, self.last_restart = restart_nodes, 0
        self.cache_limit = 4 * self.C + 16
        self.stats = Counters()
        self.root: dict = {}
        self.log: list[str] = []
        self.yy = yy  # for the log only (values are printed in the caller's units)
        self.start = time.perf_counter()
        self.log_every, self.next_log = log_every, self.start + log_every

    # ------------------------------------------------------------------ bookkeeping
    def cutoff(self) -> float:
        return self.best - max(self.rel_gap * abs(self.best), 1e-11)

    def lower_bound(self) -> float:
        """Proven lower bound on the optimum: the smallest bound of any open or closed node."""
        open_min = min((entry[0] for entry in self.open), default=np.inf)
        return min(self.best, self.closed, open_min)

    def _close(self, bound: float) -> None:
        self.closed = min(self.closed, bound)

    def _push(self, bound: float, kept, free, z, parent: NodeState | None = None, j: int = -1,
              keep_j: bool = False, split: np.ndarray | None = None) -> None:
        """Queue a node; with ``parent``, it is the child of ``parent`` that keeps / drops position ``j``
        and is materialised by one rank-``g`` update instead of a refactorisation."""
        if bound >= self.cutoff():
            self._close(bound)
            return
        self.open.append([float(bound), tuple(kept), np.asarray(free, dtype=int), z, parent, j, keep_j, split])
        if len(self.open) > self.cache_limit:  # bound the memory: older entries forget their parent
            self.open[-self.cache_limit - 1][4] = None

    def _pop(self) -> list:
        """The newest open node (depth first), or the one of smallest bound every ``restart_nodes``."""
        if self.stats.nodes - self.last_restart >= self.restart_nodes:
            self.last_restart = self.stats.nodes
            self.stats.restarts += 1
            i = min(range(len(self.open)), key=lambda i: self.open[i][0])
            return self.open.pop(i)
        return self.open.pop()

    def _materialise(self, entry) -> NodeState:
        bound, kept, free, z, parent, j, keep_j, _ = entry
        if parent is not None:
            try:
                return keep(parent, np.array([j]), self.g) if keep_j else drop(parent, np.array([j]), self.g)
            except np.linalg.LinAlgError:
                pass
        self.stats.refactorisations += 1
        return build_state(self.H, self.B, self.g, kept, free)

    def _note(self, text: str) -> None:
        self.log.append(f"[{time.perf_counter() - self.start:8.2f} s, {self.stats.nodes} nodes] {text}")

    def _progress(self) -> None:
        now = time.perf_counter()
        if now >= self.next_log:
            self.next_log = now + self.log_every
            bound = self.lower_bound()
            gap = max(self.best - bound, 0.0) / max(self.best, 1e-300)
            self._note(f"open {len(self.open)}, bound {bound * self.yy:.6g}, incumbent {self.best * self.yy:.6g}, "
                       f"gap {gap:.2%}")

    def _offer(self, channels) -> float:
        mask = np.zeros(self.C, dtype=bool)
        mask[list(channels)] = True
        value = float(self.evaluate(mask))
        self.stats.leaves += 1
        if value < self.best:
            self.best, self.best_mask = value, mask
            self.stats.incumbent_updates += 1
            if self.polish is not None:
                polished, polished_value = self.polish(mask)
                if polished_value < self.best:
                    self.best, self.best_mask = float(polished_value), np.asarray(polished, dtype=bool)
            self._note(f"new incumbent {self.best * self.yy:.6g}")
        return value

    def _root_deadline(self) -> float | None:
        """The root relaxation may use a tenth of the time limit (its iterations cost a factorisation of
        all ``C g`` columns: the whole budget on wide units)."""
        if self.deadline is None:
            return None
        return time.perf_counter() + 0.1 * max(self.deadline - time.perf_counter(), 0.0)

    def _time_up(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    # ------------------------------------------------------------------ search
    def run(self) -> bool:
        """Search until every node is closed (True) or the deadline passes (False)."""
        self._dive(build_state(self.H, self.B, self.g, (), np.arange(self.C)), -np.inf, None)
        while self.open:
            if self._time_up():
                return False
            entry = self._pop()
            bound, z = entry[0], entry[3]
            if bound >= self.cutoff():
                self._close(bound)
                continue
            self._dive(self._materialise(entry), bound, z, entry[7] if entry[4] is not None else None)
            self._progress()
        return True

    def estimate_tree_size(self, probes: int = 30, seed: int = 0) -> tuple[float, float]:
        """Knuth's (1975) unbiased estimate of the number of nodes the search needs with the current
        incumbent: random root-to-leaf probes through children that survive their bounds, each node of a
        probe weighted by the product of the numbers of surviving children above it. Returns the mean
        and its standard error over ``probes`` probes."""
        rng = np.random.default_rng(seed)
        root = build_state(self.H, self.B, self.g, (), np.arange(self.C))
        sizes = []
        for _ in range(probes):
            if self._time_up():
                break
            self.probe = [rng, 1.0, 0.0]
            self._dive(root, -np.inf, None)
            sizes.append(self.probe[2])
        self.probe = None
        sizes = np.array(sizes) if sizes else np.array([np.nan])
        return float(sizes.mean()), float(sizes.std(ddof=1) / np.sqrt(sizes.size)) if sizes.size > 1 else np.nan

    def _leaf(self, state: NodeState, m: int, d: int) -> bool:
        """Solve nodes with nothing left to choose, one removal or one keep left (exactly)."""
        if m == 0:
            self._close(self._offer(state.kept))
        elif d == 0:
            self._close(self._offer(state.kept + tuple(state.free)))
        elif d == 1 or m == 1:
            g = self.g
            n = state.free.size
            if d == 1:  # drop the channel whose exact removal increase is smallest
                blocks = state.M.reshape(n, g, n, g)[np.arange(n), :, np.arange(n), :]
                costs = np.einsum("cao,cab,cbo->c", state.w.reshape(n, g, -1), np.linalg.inv(blocks),
                                  state.w.reshape(n, g, -1))
                j = int(np.argmin(costs))
                chosen = state.kept + tuple(int(c) for i, c in enumerate(state.free) if i != j)
            else:  # keep the channel whose exact gain R_c^T P_cc^{-1} R_c is largest
                blocks = state.P.reshape(n, g, n, g)[np.arange(n), :, np.arange(n), :]
                gains = np.einsum("cao,cab,cbo->c", state.R.reshape(n, g, -1), np.linalg.inv(blocks),
                                  state.R.reshape(n, g, -1))
                chosen = state.kept + (int(state.free[int(np.argmax(gains))]),)
            self._close(self._offer(chosen))
        else:
            return False
        return True

    def _split(self, state: NodeState) -> np.ndarray:
        """The node's precision split (or the root's, restricted, when not recomputed or singular)."""
        if self.node_split:
            try:
                return perspective_split(state.P, self.g, "precision", P_inv=state.M)
            except np.linalg.LinAlgError:
                pass
        return self.D[state.free]

    def _dive(self, state: NodeState, bound: float, z, Dn: np.ndarray | None = None) -> None:
        g, k = self.g, self.k
        root = self.stats.nodes == 0
        while True:
            if self._time_up():
                if self.probe is None:
                    self._push(bound, state.kept, state.free, z)
                return
            self.stats.nodes += 1
            if self.probe is not None:
                self.probe[2] += self.probe[1]
            self.stats.max_depth = max(self.stats.max_depth, self.C - state.free.size)
            n = state.free.size
            m = k - len(state.kept)
            d = n - m
            if self._leaf(state, m, d):
                return
            free = state.free
            if Dn is None:
                Dn = self._split(state)
            cheap = node_bounds(state, Dn, np.linalg.inv(Dn), m, g)
            bound = max(bound, cheap.bound)
            remove_child, keep_child = cheap.remove_child, cheap.keep_child
            if root:
                self.root.update(superset=state.fA, cheap=cheap.bound, cheap_kind=cheap.kind)
            cutoff = self.cutoff()
            if bound >= cutoff:
                self.stats.pruned[cheap.kind] += 1
                self._close(bound)
                return
            if self.relaxation == "nodes" or (root and self.relaxation == "root"):
                rel = perspective_relaxation(state.P, state.R, state.e0, Dn, m, cutoff=cutoff, z0=z,
                                             max_iter=self.root_iter if root else self.relax_iter,
                                             rel_tol=1e-6 if root else 1e-3,
                                             deadline=self._root_deadline() if root else self.deadline)
                self.stats.relaxation_iterations += rel.iterations
                z = rel.z
                bound = max(bound, float(safe(rel.bound)))
                if root:
                    self.root.update(relaxation=float(rel.bound), relaxation_iterations=rel.iterations)
                if bound >= cutoff:
                    self.stats.pruned["relaxation"] += 1
                    self._close(bound)
                    return
                if np.isfinite(rel.constant):
                    in_bound, out_bound = _forced_bounds(rel.constant, rel.slopes, m)
                    keep_child = np.maximum(keep_child, safe(in_bound))
                    remove_child = np.maximum(remove_child, safe(out_bound))
            if root:
                self.root["bound"] = bound
                self._note(f"root: f(all free) {state.fA * self.yy:.6g}, cheap bound {cheap.bound * self.yy:.6g} "
                           f"({cheap.kind}), relaxation {self.root.get('relaxation', -np.inf) * self.yy:.6g}, "
                           f"incumbent {self.best * self.yy:.6g}")
                root = False
            # safe screening: a channel whose removal (keeping) child is pruned is kept (dropped)
            must_keep = np.flatnonzero(remove_child >= cutoff)
            must_drop = np.flatnonzero(keep_child >= cutoff)
            if must_keep.size or must_drop.size:
                if np.intersect1d(must_keep, must_drop).size or must_keep.size > m or must_drop.size > d:
                    self.stats.pruned["screening"] += 1
                    self._close(cutoff)
                    return
                self.stats.fixed_in += must_keep.size
                self.stats.fixed_out += must_drop.size
                stay = np.setdiff1d(np.arange(n), must_drop)
                before = state
                try:
                    if must_drop.size:
                        state = drop(state, must_drop, g)
                    if must_keep.size:
                        state = keep(state, np.searchsorted(stay, must_keep), g)
                except np.linalg.LinAlgError:
                    state = self._refactor(before, must_keep, must_drop)
                z = None if z is None else z[np.setdiff1d(stay, must_keep)]
                Dn = None if must_drop.size or Dn is None else Dn[np.setdiff1d(np.arange(n), must_keep)]
                continue
            # branch on the channel whose weaker child is strongest
            if self.branching == "removal":
                j = int(np.argmax(cheap.delta))
            else:
                score = np.minimum(remove_child, keep_child) + 1e-3 * np.maximum(remove_child, keep_child)
                j = int(np.argmax(np.where(np.isfinite(score), score, np.finfo(float).max)))
            others = np.delete(np.arange(n), j)
            child_z = None if z is None else z[others]
            dive_keep = keep_child[j] <= remove_child[j]
            if self.probe is not None:  # Knuth's estimator: follow a random child that survives its bound
                alive = [flag for flag, child in ((True, keep_child[j]), (False, remove_child[j]))
                         if child < self.cutoff()]
                if not alive:
                    return
                self.probe[1] *= len(alive)
                dive_keep = bool(alive[self.probe[0].integers(len(alive))])
                bound = max(bound, keep_child[j] if dive_keep else remove_child[j])
            elif dive_keep:
                self._push(remove_child[j], state.kept, np.delete(free, j), child_z, state, j, False, None)
                bound = max(bound, keep_child[j])
            else:
                self._push(keep_child[j], state.kept + (int(free[j]),), np.delete(free, j), child_z, state, j, True,
                           Dn[others])
                bound = max(bound, remove_child[j])
            try:
                state = keep(state, np.array([j]), g) if dive_keep else drop(state, np.array([j]), g)
            except np.linalg.LinAlgError:
                state = self._refactor(state, np.array([j]) if dive_keep else np.zeros(0, int),
                                       np.zeros(0, int) if dive_keep else np.array([j]))
            z = child_z
            Dn = Dn[others] if dive_keep else None
            if bound >= self.cutoff():
                self._close(bound)
                return

    def _refactor(self, state: NodeState, keep_pos: np.ndarray, drop_pos: np.ndarray) -> NodeState:
        """Rebuild a child from ``H`` when a rank-``g`` update met a numerically singular block."""
        self.stats.refactorisations += 1
        free = state.free
        kept = state.kept + tuple(int(c) for c in free[keep_pos])
        rest = np.setdiff1d(np.arange(free.size), np.union1d(keep_pos, drop_pos))
        return build_state(self.H, self.B, self.g, kept, free[rest])
