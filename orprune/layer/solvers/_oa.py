"""Outer approximation with a HiGHS MILP master (``method="oa"`` of the exact solver).

The master problem over binaries ``z`` and the epigraph variable ``eta`` is

.. math::

    \\min_{z \\in \\{0,1\\}^C,\\ \\eta}\\ \\eta \\quad\\text{s.t.}\\quad \\sum_c z_c = k,\\qquad
    \\eta + \\sum_c s^{(j)}_c z_c \\ge q^{(j)} \\quad (j \\in \\text{cuts}),

where each cut is a dual cut of the perspective extension ``F_D`` (one global split ``D``, see
:mod:`orprune.layer.solvers._perspective`): cuts at the iterates of the root relaxation (fractional
points), at the starting solutions, and at every integer solution the master proposes. Cuts at
integer points are tight (``F_D = f`` on binaries), so the loop converges finitely.

HiGHS 1.15 declares a lazy-constraint callback type but never calls it, so the master is
re-solved after each round of cuts, warm-started with the incumbent through ``setSolution``;
every integer solution HiGHS finds during a solve (its MIP-solution callback) is cut off too.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import scipy.linalg

from orprune._highs import quiet_highs
from orprune.layer.solvers._nodes import columns
from orprune.layer.solvers._perspective import block_quadratic, perspective_relaxation, perspective_split

__all__ = ["OuterApproximation"]


class OuterApproximation:
    """Cutting-plane loop around a HiGHS MILP master (normalised data, ``H`` positive definite)."""

    def __init__(self, H: np.ndarray, B: np.ndarray, yy: float, g: int, k: int, *,
                 evaluate: Callable[[np.ndarray], float], incumbent: np.ndarray, rel_gap: float,
                 deadline: float | None, split: str = "precision", ridge: float = 0.0,
                 polish: Callable | None = None, root_iter: int = 60,
                 starts: tuple[np.ndarray, ...] = ()) -> None:
        self.H, self.B, self.yy, self.g, self.k = H, B, yy, g, k
        self.C = H.shape[0] // g
        self.evaluate, self.polish = evaluate, polish
        self.rel_gap, self.deadline = rel_gap, deadline
        self.D = perspective_split(H, g, split, ridge=ridge)
        self.D_inv = np.linalg.inv(self.D)
        self.root_iter, self.starts = root_iter, starts
        self.best_mask = np.asarray(incumbent, dtype=bool).copy()
        self.best = float(evaluate(self.best_mask))
        self.bound = -np.inf
        self.cut_keys: set[bytes] = set()
        self.stats = {"master_solves": 0, "cuts": 0, "integer_cuts": 0, "master_nodes": 0,
                      "root_bound": float("-inf")}

    # ------------------------------------------------------------------ cuts
    def integer_cut(self, mask: np.ndarray) -> tuple[float, np.ndarray]:
        """Tangent dual cut at the binary point ``mask`` (exact there)."""
        g = self.g
        kept = np.flatnonzero(mask)
        cols = columns(kept, g)
        W_s = scipy.linalg.cho_solve(scipy.linalg.cho_factor(self.H[np.ix_(cols, cols)]), self.B[cols])
        value = self.yy - float(np.sum(self.B[cols] * W_s))
        slopes = block_quadratic(self.D_inv, self.B - self.H[:, cols] @ W_s)
        slopes[kept] = block_quadratic(self.D[kept], W_s)
        return value + float(slopes[kept].sum()), slopes

    def _add_cut(self, highs, constant: float, slopes: np.ndarray) -> None:
        idx = np.arange(self.C + 1, dtype=np.int32)
        highs.addRow(float(constant), np.inf, self.C + 1, idx, np.append(slopes, 1.0))
        self.stats["cuts"] += 1

    def _offer(self, highs, mask: np.ndarray) -> None:
        key = np.packbits(mask).tobytes()
        if key in self.cut_keys:
            return
        self.cut_keys.add(key)
        self._add_cut(highs, *self.integer_cut(mask))
        self.stats["integer_cuts"] += 1
        value = float(self.evaluate(mask))
        if value < self.best:
            self.best, self.best_mask = value, mask.copy()
            if self.polish is not None:
                polished, polished_value = self.polish(mask)
                if polished_value < self.best:
                    self.best, self.best_mask = float(polished_value), polished
                    self._offer(highs, polished)

    # ------------------------------------------------------------------ loop
    def _time_left(self) -> float:
        return np.inf if self.deadline is None else self.deadline - time.perf_counter()

    def run(self) -> bool:
        """Iterate master solves and cuts; True when the gap is closed."""
        import highspy

        C, k = self.C, self.k
        highs = quiet_highs()
        # No "threads" option: HiGHS's thread scheduler is global per process, and from highspy 1.16 a
        # count that differs from the one it was first started with makes run() fail.
        highs.setOptionValue("mip_rel_gap", self.rel_gap / 4)
        highs.addVars(C + 1, np.zeros(C + 1), np.append(np.ones(C), np.inf))
        highs.changeColsIntegrality(C, np.arange(C, dtype=np.int32),
                                    np.full(C, highspy.HighsVarType.kInteger))
        highs.changeColCost(C, 1.0)
        highs.addRow(k, k, C, np.arange(C, dtype=np.int32), np.ones(C))
        found: list[np.ndarray] = []

        def on_solution(callback_type, message, data_out, data_in, user_data):
            found.append(np.asarray(data_out.mip_solution)[:C] > 0.5)

        highs.setCallback(on_solution, None)
        highs.startCallback(highspy.cb.HighsCallbackType.kCallbackMipSolution)

        root_cuts: list = []
        root = perspective_relaxation(self.H, self.B, self.yy, self.D, k, max_iter=self.root_iter,
                                      rel_tol=1e-5, deadline=self.deadline, cuts=root_cuts)
        self.bound = self.stats["root_bound"] = root.bound
        for constant, slopes in root_cuts:
            self._add_cut(highs, constant, slopes)
        for start in (self.best_mask, *self.starts):
            self._offer(highs, np.asarray(start, dtype=bool))
        while self.best - self.bound > self.rel_gap * abs(self.best) + 1e-11:
            remaining = self._time_left()
            if remaining <= 0:
                return False
            highs.setOptionValue("time_limit", float(remaining))
            start = np.append(self.best_mask.astype(float), self.best)
            highs.setSolution(C + 1, np.arange(C + 1, dtype=np.int32), start)
            found.clear()
            highs.run()
            self.stats["master_solves"] += 1
            info = highs.getInfo()
            self.stats["master_nodes"] += int(info.mip_node_count)
            status = highs.getModelStatus()
            if status not in (highspy.HighsModelStatus.kOptimal, highspy.HighsModelStatus.kTimeLimit,
                              highspy.HighsModelStatus.kInterrupt):
                raise RuntimeError(f"HiGHS master stopped with status {highs.modelStatusToString(status)}")
            # HiGHS's dual bound is valid for the master, which relaxes the true problem.
            self.bound = max(self.bound, float(info.mip_dual_bound) - 1e-12)
            candidates = [np.asarray(highs.getSolution().col_value[:C]) > 0.5, *found]
            before = self.stats["integer_cuts"]
            for mask in candidates:
                if mask.sum() == k:
                    self._offer(highs, mask)
            if status != highspy.HighsModelStatus.kOptimal:
                return self.best - self.bound <= self.rel_gap * abs(self.best) + 1e-11
            if self.stats["integer_cuts"] == before:
                # Nothing new to cut: the master's bound is final (it met the incumbent up to
                # the master's own gap, as its optimum carries a tight cut).
                break
        return self.best - self.bound <= self.rel_gap * abs(self.best) + 1e-11
