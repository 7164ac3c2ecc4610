"""HiGHS models of partition pruning (private): the weight-energy MILP and the balanced assignment LP.

See ``formulations/partition_pruning.md``. Parts hold between ``lo`` and ``hi`` items (``hi - lo <= 1``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.sparse as sp

from orprune._highs import quiet_highs
from orprune._status import INFEASIBLE, OPTIMAL, TIME_LIMIT

_HIGHS_STATUS = {"kOptimal": OPTIMAL, "kTimeLimit": TIME_LIMIT, "kInterrupt": TIME_LIMIT, "kInfeasible": INFEASIBLE}


def part_sizes(n_items: int, n_parts: int) -> tuple[int, int]:
    """Balanced part sizes: every part holds ``lo`` or ``hi = ceil(n_items / n_parts)`` items."""
    return n_items // n_parts, -(-n_items // n_parts)


class _Builder:
    def __init__(self, n_cols: int) -> None:
        self.n_cols, self.rows, self.cols, self.vals, self.lo, self.hi = n_cols, [], [], [], [], []
        self.n_rows = 0

    def add(self, row: np.ndarray, col: np.ndarray, val: np.ndarray, lo: Any, hi: Any) -> None:
        """Entries of ``max(row) + 1`` new rows (row offsets from 0) with bounds ``lo <= . <= hi``."""
        count = int(row.max()) + 1
        self.rows.append(self.n_rows + row), self.cols.append(col), self.vals.append(np.asarray(val, float))
        self.lo.append(np.broadcast_to(np.asarray(lo, float), count))
        self.hi.append(np.broadcast_to(np.asarray(hi, float), count))
        self.n_rows += count

    def solve(self, cost: np.ndarray, offset: float, col_upper: np.ndarray, integer: np.ndarray, *,
              time_limit: float | None, mip_rel_gap: float, start: np.ndarray | None = None,
              relax: bool = False) -> dict[str, Any]:
        import highspy

        a = sp.csc_matrix((np.concatenate(self.vals), (np.concatenate(self.rows), np.concatenate(self.cols))),
                          shape=(self.n_rows, self.n_cols))
        a.sum_duplicates()
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = self.n_cols, self.n_rows
        lp.col_cost_, lp.offset_ = np.asarray(cost, float), float(offset)
        lp.col_lower_, lp.col_upper_ = np.zeros(self.n_cols), np.asarray(col_upper, float)
        lp.row_lower_, lp.row_upper_ = np.concatenate(self.lo), np.concatenate(self.hi)
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = self.n_cols, self.n_rows
        lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = a.indptr, a.indices, a.data
        if not relax:
            kind = [highspy.HighsVarType.kContinuous, highspy.HighsVarType.kInteger]
            lp.integrality_ = [kind[int(flag)] for flag in integer]
        h = quiet_highs()
        if relax:  # the relaxation is large and degenerate: interior point is several times faster than simplex
            h.setOptionValue("solver", "ipm")
        h.passModel(lp)
        for name, value in (("mip_rel_gap", mip_rel_gap), ("mip_abs_gap", 1e-12), ("random_seed", 0),
                            ("mip_feasibility_tolerance", 1e-9), ("primal_feasibility_tolerance", 1e-9)):
            h.setOptionValue(name, value)
        if time_limit is not None:
            h.setOptionValue("time_limit", float(time_limit))
        if start is not None and not relax:
            h.setSolution(self.n_cols, np.arange(self.n_cols, dtype=np.int32), np.asarray(start, float))
        h.run()
        code = h.getModelStatus()
        info = h.getInfo()
        status = _HIGHS_STATUS.get(code.name, "error")
        has_solution = info.primal_solution_status == 2
        bound = info.objective_function_value if relax else info.mip_dual_bound
        return {"status": status, "x": np.asarray(h.getSolution().col_value) if has_solution else None,
                "bound": float(bound) if math.isfinite(bound) else -math.inf,
                "message": h.modelStatusToString(code),
                "nodes": 0 if relax else int(info.mip_node_count), "rows": self.n_rows, "columns": self.n_cols}


def balanced_assignment(score: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Part of each item maximising ``sum_i score[i, part_i]`` with every part holding ``lo..hi`` items.

    A transportation problem, solved as an assignment of items to slots: each part has ``lo`` mandatory slots
    and ``hi - lo`` optional ones. Mandatory slots carry a bonus larger than the score range, so an optimal
    assignment fills them all (an item in an optional slot moved to an empty mandatory one would lose at
    most the range and gain the bonus); with them filled the bonus is a constant and the scores decide.
    """
    from scipy.optimize import linear_sum_assignment

    n_items, n_parts = score.shape
    slots = np.r_[np.repeat(np.arange(n_parts), lo), np.repeat(np.arange(n_parts), hi - lo)]
    bonus = np.r_[np.ones(n_parts * lo), np.zeros(n_parts * (hi - lo))] * (2.0 * np.ptp(score) + 1.0)
    rows, cols = linear_sum_assignment(score[:, slots] + bonus[None, :], maximize=True)
    parts = np.empty(n_items, int)
    parts[rows] = slots[cols]
    return parts


def energy_milp(energy: np.ndarray, n_parts: int, *, time_limit: float | None, mip_rel_gap: float,
                start: tuple[np.ndarray, np.ndarray] | None, relax: bool = False) -> dict[str, Any]:
    """Minimise the removed energy ``sum_{i,j} E_ij [part(i) != part(j)]`` over balanced partitions.

    Variables ``x[i,p]`` (input i in part p), ``y[j,p]`` (output j in part p), binary, and
    ``z[i,j,p] <= min(x[i,p], y[j,p])`` for ``E_ij > 0`` (continuous: maximising the kept energy drives it to
    the product of the binaries). Returns the HiGHS outcome with the objective in units of ``E``.
    """
    d, q = energy.shape
    P = n_parts
    lo_in, hi_in = part_sizes(d, P)
    lo_out, hi_out = part_sizes(q, P)
    pi, pj = np.nonzero(energy > 0)
    nz = pi.size
    x = np.arange(d * P).reshape(d, P)
    y = d * P + np.arange(q * P).reshape(q, P)
    z = d * P + q * P + np.arange(nz * P).reshape(nz, P)
    b = _Builder(d * P + q * P + nz * P)
    ones = np.ones
    b.add(np.repeat(np.arange(d), P), x.ravel(), ones(d * P), 1.0, 1.0)  # each input in one part
    b.add(np.repeat(np.arange(q), P), y.ravel(), ones(q * P), 1.0, 1.0)  # each output in one part
    b.add(np.tile(np.arange(P), d), x.ravel(), ones(d * P), lo_in, hi_in)  # balanced inputs
    b.add(np.tile(np.arange(P), q), y.ravel(), ones(q * P), lo_out, hi_out)  # balanced outputs
    if nz:
        rows = np.arange(nz * P)
        b.add(np.r_[rows, rows], np.r_[z.ravel(), x[pi].ravel()], np.r_[ones(nz * P), -ones(nz * P)], -np.inf, 0.0)
        b.add(np.r_[rows, rows], np.r_[z.ravel(), y[pj].ravel()], np.r_[ones(nz * P), -ones(nz * P)], -np.inf, 0.0)
        # output j in part p keeps at most hi_in inputs, input i at most hi_out outputs (valid, tightens the LP)
        rows_out = np.broadcast_to(pj[:, None] * P + np.arange(P), (nz, P)).ravel()
        b.add(np.r_[rows_out, np.arange(q * P)], np.r_[z.ravel(), y.ravel()],
              np.r_[ones(nz * P), -np.full(q * P, hi_in)], -np.inf, 0.0)
        rows_in = np.broadcast_to(pi[:, None] * P + np.arange(P), (nz, P)).ravel()
        b.add(np.r_[rows_in, np.arange(d * P)], np.r_[z.ravel(), x.ravel()],
              np.r_[ones(nz * P), -np.full(d * P, hi_out)], -np.inf, 0.0)
    # symmetry: parts are numbered by their smallest input, so input i may open part p only if an earlier
    # input is in part p - 1 (x[i, p] <= sum_{i' < i} x[i', p - 1]); x[i, p] = 0 for p > i follows.
    upper = np.ones(b.n_cols)
    for i in range(d):
        upper[x[i, i + 1:]] = 0.0
    ii, pp = np.nonzero(np.tril(np.ones((d, P), bool)) & (np.arange(P) >= 1)[None, :])  # 1 <= p <= i
    if ii.size:
        row_entries, col_entries, val_entries = [], [], []
        for r, (i, p) in enumerate(zip(ii, pp)):
            row_entries += [r] * (i + 1)
            col_entries += [x[i, p]] + list(x[:i, p - 1])
            val_entries += [1.0] + [-1.0] * i
        b.add(np.array(row_entries), np.array(col_entries), np.array(val_entries), -np.inf, 0.0)
    total = float(energy.sum())
    scale = max(total, np.finfo(float).tiny)
    cost = np.zeros(b.n_cols)
    cost[z.ravel()] = -np.repeat(energy[pi, pj], P) / scale
    integer = np.zeros(b.n_cols, bool)
    integer[: d * P + q * P] = True
    init = None
    if start is not None:
        parts_in, parts_out = _canonical(*start)
        init = np.zeros(b.n_cols)
        init[x[np.arange(d), parts_in]] = 1.0
        init[y[np.arange(q), parts_out]] = 1.0
        init[z[np.arange(nz), parts_in[pi]]] = (parts_in[pi] == parts_out[pj]).astype(float)
    out = b.solve(cost, 1.0, upper, integer, time_limit=time_limit, mip_rel_gap=mip_rel_gap, start=init,
                  relax=relax)
    out["bound"] = max(out["bound"], 0.0) * scale
    if out["x"] is not None and not relax:
        sol = out["x"]
        out["input_parts"] = np.argmax(sol[x], axis=1)
        out["output_parts"] = np.argmax(sol[y], axis=1)
    return out


def _canonical(parts_in: np.ndarray, parts_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relabel parts in the order of their smallest input (the labelling the symmetry rows allow)."""
    order = {}
    for p in parts_in:
        order.setdefault(int(p), len(order))
    for p in parts_out:  # parts with no input (only when the caller passes such a start) go last
        order.setdefault(int(p), len(order))
    relabel = np.vectorize(order.__getitem__, otypes=[int])
    return relabel(parts_in), relabel(parts_out)
