"""The allocation MILP itself: column-wise assembly and the HiGHS call (private).

:mod:`orprune.budget.allocation` validates, presolves and reads back; this module only builds and solves.
Units are integers in problem order; ``vals[j]`` are unit j's retained keep counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from orprune._highs import quiet_highs
from orprune._status import INFEASIBLE, OPTIMAL, TIME_LIMIT

#: Relative tolerance with which an allocation must meet a budget when re-evaluated exactly.
FEASIBILITY_RTOL = 1e-9


def _tolerance(budget: float) -> float:
    """Absolute slack with which an exactly re-evaluated cost may exceed ``budget``."""
    return FEASIBILITY_RTOL * max(abs(budget), 1.0)


@dataclass
class Expr:
    """``const + sum_j lin[j] . x_j + sum_(i,j) pair[i,j] k_i k_j + sum_(i,j) x_i^T table[i,j] x_j``.

    Over the retained options; ``i < j`` in every key; a ``table[i, j]`` is (options of i) x (options of j).
    """

    const: float
    lin: dict[int, np.ndarray]
    pair: dict[tuple[int, int], float]
    table: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    def value(self, idx: list[int], vals: list[np.ndarray]) -> float:
        terms = [self.const] + [float(v[idx[j]]) for j, v in self.lin.items()]
        terms += [b * vals[i][idx[i]] * vals[j][idx[j]] for (i, j), b in self.pair.items()]
        terms += [float(t[idx[i], idx[j]]) for (i, j), t in self.table.items()]
        return math.fsum(terms)


@dataclass(frozen=True)
class MilpResult:
    idx: list[int] | None  # chosen retained option per unit, None without a solution
    status: str
    bound: float
    message: str
    info: Mapping[str, Any] = field(default_factory=dict)


_HIGHS_STATUS = {
    "kOptimal": OPTIMAL,
    "kTimeLimit": TIME_LIMIT,
    "kInterrupt": TIME_LIMIT,
    "kInfeasible": INFEASIBLE,
}


class _Model:
    """Column-wise assembly of the MILP: one-hot binaries, then one product block per pair."""

    def __init__(self, vals: list[np.ndarray], pairs: list[tuple[int, int]], formulation: str,
                 tables: tuple[tuple[int, int], ...] = ()):
        self.vals, self.ncol, self.nrow = vals, 0, 0
        self.lower, self.upper, self.integer, self.r, self.c, self.v = [], [], [], [], [], []
        self.row_lo, self.row_hi = [], []
        self.x = {j: self._cols(v.size, 0.0, 1.0, True) for j, v in enumerate(vals) if v.size > 1}
        for cols in self.x.values():
            self._rows(np.zeros(cols.size, int), cols, np.ones(cols.size), 1.0, 1.0)
        self.prod = {p: getattr(self, "_" + formulation)(*p) for p in pairs}
        # A table over a pair prices each (o, p) on its own: only the transport variables y_op = x_io x_jp
        # carry it, whatever the formulation of the products (shared with them under "transport").
        self.ytab = {p: self.prod[p][0] if formulation == "transport" and p in self.prod else self._transport(*p)[0]
                     for p in tables}

    def _cols(self, n: int, lo: float, hi: float, integer: bool) -> np.ndarray:
        self.lower.append(np.full(n, lo)), self.upper.append(np.full(n, hi))
        self.integer.append(np.full(n, integer))
        self.ncol += n
        return np.arange(self.ncol - n, self.ncol)

    def _rows(self, row, col, val, lo, hi) -> None:
        """Entries (row offset, col, val) of ``max(row) + 1`` new rows with bounds lo <= . <= hi."""
        n = int(row.max()) + 1
        self.r.append(self.nrow + row), self.c.append(col), self.v.append(val)
        self.row_lo.append(np.broadcast_to(lo, n)), self.row_hi.append(np.broadcast_to(hi, n))
        self.nrow += n

    def _transport(self, i: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        # y[o, p] = x_io x_jp: the row sums give x_i, the column sums give x_j.
        ni, nj = self.vals[i].size, self.vals[j].size
        y = self._cols(ni * nj, 0.0, 1.0, False).reshape(ni, nj)
        o, p = np.indices((ni, nj))
        self._rows(np.r_[o.ravel(), np.arange(ni)], np.r_[y.ravel(), self.x[i]],
                   np.r_[np.ones(ni * nj), -np.ones(ni)], 0.0, 0.0)
        self._rows(np.r_[p.ravel(), np.arange(nj)], np.r_[y.ravel(), self.x[j]],
                   np.r_[np.ones(ni * nj), -np.ones(nj)], 0.0, 0.0)
        return y.ravel(), np.outer(self.vals[i], self.vals[j]).ravel(), None

    def _mccormick(self, i: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        # u_p = k_o x_dp over the unit d with fewer options: sum_p u_p = k_o and
        # min(K_o) x_dp <= u_p <= max(K_o) x_dp (the other McCormick inequalities are implied).
        d, o = (j, i) if self.vals[j].size <= self.vals[i].size else (i, j)
        nd, ko = self.vals[d].size, self.vals[o]
        u = self._cols(nd, 0.0, float(ko.max()), False)
        self._rows(np.zeros(nd + ko.size, int), np.r_[u, self.x[o]], np.r_[np.ones(nd), -ko], 0.0, 0.0)
        rows = np.r_[np.arange(nd), np.arange(nd)]
        self._rows(rows, np.r_[u, self.x[d]], np.r_[np.ones(nd), -np.full(nd, ko.max())], -np.inf, 0.0)
        self._rows(rows, np.r_[u, self.x[d]], np.r_[np.ones(nd), -np.full(nd, ko.min())], 0.0, np.inf)
        return u, self.vals[d].astype(np.float64), (d, o)

    def coefficients(self, expr: Expr) -> tuple[np.ndarray, np.ndarray]:
        cols = [self.x[j] for j in expr.lin] + [self.prod[p][0] for p in expr.pair] + [self.ytab[p] for p in expr.table]
        vals = list(expr.lin.values()) + [b * self.prod[p][1] for p, b in expr.pair.items()]
        vals += [t.ravel() for t in expr.table.values()]
        return (np.concatenate(cols), np.concatenate(vals)) if cols else (np.zeros(0, int), np.zeros(0))

    def add_budget(self, expr: Expr, budget: float) -> None:
        # Scaled by the budget so that HiGHS's absolute tolerances act relatively.
        scale = max(abs(budget), 1.0)
        cols, vals = self.coefficients(expr)
        if cols.size:
            self._rows(np.zeros(cols.size, int), cols, vals / scale, -np.inf, (budget - expr.const) / scale)

    def add_tie(self, units: list[int]) -> None:
        """``x_{j,o} = x_{first,o}`` for every other member ``j`` and option ``o``."""
        for j in units[1:]:
            first, cols = self.x[units[0]], self.x[j]
            if first.size != cols.size:
                raise ValueError(f"tied units {units[0]} and {j} retain {first.size} and {cols.size} options.")
            n = cols.size
            self._rows(np.r_[np.arange(n), np.arange(n)], np.r_[cols, first], np.r_[np.ones(n), -np.ones(n)], 0.0, 0.0)

    def lp(self, objective: Expr) -> Any:
        import highspy
        import scipy.sparse as sp

        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = self.ncol, self.nrow
        cols, vals = self.coefficients(objective)
        lp.col_cost_ = np.bincount(cols, weights=vals, minlength=self.ncol)
        lp.offset_ = objective.const
        lp.col_lower_, lp.col_upper_ = np.concatenate(self.lower), np.concatenate(self.upper)
        lp.row_lower_, lp.row_upper_ = np.concatenate(self.row_lo), np.concatenate(self.row_hi)
        a = sp.csc_matrix((np.concatenate(self.v), (np.concatenate(self.r), np.concatenate(self.c))),
                          shape=(self.nrow, self.ncol))
        a.sum_duplicates()
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = self.ncol, self.nrow
        lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = a.indptr, a.indices, a.data
        kind = [highspy.HighsVarType.kContinuous, highspy.HighsVarType.kInteger]
        lp.integrality_ = [kind[int(flag)] for flag in np.concatenate(self.integer)]
        return lp

    def start(self, idx: list[int]) -> np.ndarray:
        z = np.zeros(self.ncol)
        for j, cols in self.x.items():
            z[cols[idx[j]]] = 1.0
        for (i, j), (cols, _, disaggregated) in self.prod.items():
            if disaggregated is None:  # transport: y = x_i x_j^T
                z[cols.reshape(self.vals[i].size, -1)[idx[i], idx[j]]] = 1.0
            else:  # mccormick: u_p = k_o x_dp
                d, o = disaggregated
                z[cols[idx[d]]] = self.vals[o][idx[o]]
        for (i, j), cols in self.ytab.items():
            z[cols.reshape(self.vals[i].size, -1)[idx[i], idx[j]]] = 1.0
        return z


def solve_milp(
    objective: Expr,
    rows: list[tuple[Expr, float]],
    vals: list[np.ndarray],
    formulation: str,
    time_limit: float | None,
    mip_rel_gap: float,
    start: list[int] | None,
    relax: bool = False,
    ties: Sequence[Sequence[int]] = (),
) -> MilpResult:
    """Minimise ``objective`` s.t. ``expr <= budget`` for every row, one option per unit.

    With ``relax`` the binaries are continuous and ``bound`` is the LP relaxation's value. Each group of
    ``ties`` takes one option index: ``x_{j,o} = x_{i,o}`` for its members (same retained options).
    """
    import highspy

    free = [j for j, v in enumerate(vals) if v.size > 1]
    if not free:  # presolve fixed every unit
        idx = [0] * len(vals)
        if any(e.value(idx, vals) > b + _tolerance(b) for e, b in rows):
            return MilpResult(None, INFEASIBLE, math.inf, "every unit fixed; a budget is violated")
        return MilpResult(idx, OPTIMAL, objective.value(idx, vals), "every unit fixed by presolve")
    pairs = sorted(set(objective.pair).union(*(e.pair for e, _ in rows)))
    tables = tuple(sorted(set(objective.table).union(*(e.table for e, _ in rows))))
    model = _Model(vals, pairs, formulation, tables)
    for expr, budget in rows:
        model.add_budget(expr, budget)
    for group in ties:
        model.add_tie([j for j in group if j in model.x])
    h = quiet_highs()
    h.passModel(model.lp(objective))
    if relax:
        h.changeColsIntegrality(model.ncol, np.arange(model.ncol, dtype=np.int32),
                                np.full(model.ncol, highspy.HighsVarType.kContinuous))
    for name, value in (("mip_rel_gap", mip_rel_gap), ("mip_abs_gap", 1e-10), ("random_seed", 0),
                        ("mip_feasibility_tolerance", 1e-9), ("primal_feasibility_tolerance", 1e-9)):
        h.setOptionValue(name, value)
    if time_limit is not None:
        h.setOptionValue("time_limit", float(time_limit))
    if start is not None and not relax:
        z = model.start(start)
        h.setSolution(model.ncol, np.arange(model.ncol, dtype=np.int32), z)
    h.run()
    code = h.getModelStatus()
    text = h.modelStatusToString(code)
    status = _HIGHS_STATUS.get(code.name, "error")
    info = h.getInfo()
    message = f"{text} ({info.mip_node_count} nodes, {formulation} formulation)"
    counters = {"nodes": int(info.mip_node_count), "lp_iterations": int(info.simplex_iteration_count),
                "columns": model.ncol, "rows": model.nrow, "highs_time": h.getRunTime()}
    if relax:
        return MilpResult(None, status, info.objective_function_value, message, counters)
    if status not in (OPTIMAL, TIME_LIMIT) or info.primal_solution_status != 2:
        bound = float(info.mip_dual_bound) if status == TIME_LIMIT else -math.inf
        return MilpResult(None, status, bound if math.isfinite(bound) else -math.inf, message, counters)
    z = np.asarray(h.getSolution().col_value)
    idx = [0] * len(vals)
    for j, cols in model.x.items():
        idx[j] = int(np.argmax(z[cols]))
        if z[cols][idx[j]] < 0.5:
            return MilpResult(None, "error", -math.inf, f"{message}; unit {j} has no option set", counters)
    return MilpResult(idx, status, float(info.mip_dual_bound), message, counters)
