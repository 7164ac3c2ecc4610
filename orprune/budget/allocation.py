r"""Global budget allocation: one keep count per prunable unit under MACs / params budgets.

Step 4 of the whole-network pipeline (the global allocation): every unit ``j`` has
candidate keep counts ``K_j`` and an error curve ``E_j``; choose one option per unit so that

.. math::

    \min_{x}\ \sum_j w_j \sum_o E_j[o]\, x_{j,o}
    \quad \text{s.t.}\quad \sum_o x_{j,o} = 1,\ x \in \{0,1\},\qquad
    c_m + \sum_j a^m_j k_j + \sum_{(i,j)} b^m_{ij} k_i k_j \le \beta_m \ \ \forall m,

with :math:`k_j = \sum_o K_j[o] x_{j,o}`. Each product :math:`k_i k_j` is linearised exactly
(transport or McCormick form, see ``formulations/global_allocation.md``) and HiGHS solves the MILP.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from orprune._status import TIME_LIMIT
from orprune.budget._allocation_milp import (  # noqa: F401  (FEASIBILITY_RTOL, MilpResult: public here)
    FEASIBILITY_RTOL,
    Expr,
    MilpResult,
    _tolerance,
    solve_milp,
)
from orprune.budget.allocation_problem import Allocation, AllocationProblem, CostModel, _finite
from orprune.layer.result import relative_gap
from orprune.network.cost_model import TableCost

__all__ = ["Allocation", "AllocationProblem", "CostModel", "TableCost", "allocate", "min_cost", "FORMULATIONS"]

#: Linearisations of the products k_i k_j; the first is the default (fastest, see the benchmark).
FORMULATIONS = ("transport", "mccormick")


def _check_cost(cost: Any, name: str, problem: AllocationProblem) -> CostModel | TableCost:
    if not isinstance(cost, (CostModel, TableCost)):
        raise ValueError(f"`{name}` must be a CostModel or a TableCost, got {type(cost).__name__}.")
    unknown = cost.units - set(problem.units)
    if unknown:
        raise ValueError(f"`{name}` names units that have no options: {sorted(map(repr, unknown))}.")
    if isinstance(cost, TableCost):
        for u in cost.units:
            missing = np.setdiff1d(problem.options[u], cost.options[u])
            if missing.size:
                raise ValueError(f"`{name}` has no table entry for the options {missing.tolist()} of unit {u!r}.")
    return cost


def _table_expr(cost: TableCost, problem: AllocationProblem, kept: list[np.ndarray]) -> Expr:
    """A :class:`TableCost` over the retained options: unary tables are linear in x_j, pair tables in y_op."""
    index = {u: j for j, u in enumerate(problem.units)}
    rows = {u: np.searchsorted(cost.options[u], problem.options[u][kept[index[u]]]) for u in cost.units}
    const, lin, table = cost.constant, {}, {}

    def add_lin(j: int, vec: np.ndarray) -> None:
        nonlocal const
        if kept[j].size == 1:
            const += float(vec[0])
        else:
            lin[j] = lin.get(j, 0.0) + vec

    for u, t in cost.unary.items():
        add_lin(index[u], t[rows[u]])
    for (u, v), t in cost.pairwise.items():
        t = t[np.ix_(rows[u], rows[v])]
        i, j = index[u], index[v]
        if i > j:
            i, j, t = j, i, t.T
        if kept[i].size == 1:
            add_lin(j, t[0])
        elif kept[j].size == 1:
            add_lin(i, t[:, 0])
        else:
            table[(i, j)] = table[(i, j)] + t if (i, j) in table else t
    return Expr(const, lin, {}, table)


def _expr(cost: CostModel | TableCost, problem: AllocationProblem, kept: list[np.ndarray]) -> Expr:
    """``cost`` over the retained options ``kept[j]`` (indices into the options of unit j).

    Units with one retained option are folded into the constant or the partner's linear part.
    """
    if isinstance(cost, TableCost):
        return _table_expr(cost, problem, kept)
    index = {u: j for j, u in enumerate(problem.units)}
    values = [problem.options[u][kept[j]].astype(np.float64) for j, u in enumerate(problem.units)]
    fixed = [v.size == 1 for v in values]
    const, lin, pair = cost.constant, {}, {}

    def add_lin(j: int, vec: np.ndarray) -> None:
        if fixed[j]:
            nonlocal const
            const += float(vec[0])
        else:
            lin[j] = lin.get(j, 0.0) + vec

    for u, a in cost.linear.items():
        add_lin(index[u], a * values[index[u]])
    for (u, v), b in cost.bilinear.items():
        i, j = sorted((index[u], index[v]))
        if i == j:
            add_lin(i, b * values[i] ** 2)
        elif fixed[i]:
            add_lin(j, b * values[i][0] * values[j])
        elif fixed[j]:
            add_lin(i, b * values[j][0] * values[i])
        elif b != 0.0:
            pair[(i, j)] = pair.get((i, j), 0.0) + b
    return Expr(const, lin, {p: b for p, b in pair.items() if b != 0.0})


def _cheaper(cost: CostModel | TableCost, u: Any, options: np.ndarray) -> np.ndarray:
    """``D[a, b]``: option a of unit ``u`` costs no more than option b whatever the other units keep."""
    n = options.size
    if isinstance(cost, TableCost):
        if u not in cost.units:
            return np.ones((n, n), dtype=bool)
        rows = np.searchsorted(cost.options[u], options)
        d = np.ones((n, n), dtype=bool)
        if u in cost.unary:
            t = cost.unary[u][rows]
            d &= t[:, None] <= t[None, :]
        for (a, b), t in cost.pairwise.items():
            if u in (a, b):
                t = (t if u == a else t.T)[rows]  # options of u x options of the partner
                d &= np.all(t[:, None, :] <= t[None, :, :], axis=2)
        return d
    coefs = [a for v, a in cost.linear.items() if v == u] + [b for key, b in cost.bilinear.items() if u in key]
    if all(c == 0.0 for c in coefs):
        return np.ones((n, n), dtype=bool)
    if all(c >= 0.0 for c in coefs):  # non-decreasing in the count: smaller options cost no more
        return options[:, None] <= options[None, :]
    return np.eye(n, dtype=bool)


def _presolve(problem: AllocationProblem, budgeted: list[CostModel | TableCost]) -> list[np.ndarray]:
    """Option indices that provably contain an optimal allocation.

    Option b of a unit is dropped when another option a costs no more in every budgeted cost, whatever
    the other units keep, and has a smaller weighted error (or the same error and a smaller index).
    Replacing b by a keeps any allocation feasible and does not raise its error, and "a beats b" is
    transitive, so every dropped option is beaten by a kept one. Special cases: a unit no budgeted cost
    depends on takes its least-error option; a unit whose budgeted costs are polynomials non-decreasing
    in its count keeps the options whose error is strictly below that of every smaller option; a
    table compares the rows of its tables. A tied group (``problem.ties``) is one decision: option a
    beats b when it does so for every member's costs (replacing the members one at a time never raises
    a cost) with a smaller summed weighted error; the members keep the same option indices.
    """
    kept: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(problem.units)
    for group in problem.tie_groups():
        members = [problem.units[j] for j in group]
        werr = sum(problem.weights[u] * problem.errors[u] for u in members)
        order = np.arange(werr.size)
        cheaper = np.ones((werr.size, werr.size), dtype=bool)
        for u in members:
            for cost in budgeted:
                cheaper &= _cheaper(cost, u, problem.options[u])
        better = (werr[:, None] < werr[None, :]) | ((werr[:, None] == werr[None, :]) & (order[:, None] < order[None, :]))
        retained = np.flatnonzero(~np.any(cheaper & better, axis=0))
        for j in group:
            kept[j] = retained
    return kept


def _greedy_start(
    problem: AllocationProblem, kept: list[np.ndarray], rows: list[tuple[Expr, float]]
) -> list[int] | None:
    """A feasible incumbent when every budgeted cost is non-decreasing in every count.

    From the largest options, shrink the unit losing the least error per unit of (budget-scaled)
    excess cost removed until every budget holds; then grow the unit gaining the most error per
    unit of cost while the budgets still hold.
    """
    if not rows:
        return None
    vals = _vals(problem, kept)
    werr = [problem.weights[u] * problem.errors[u][kept[j]] for j, u in enumerate(problem.units)]
    budget = np.array([b for _, b in rows])
    scale = np.maximum(np.abs(budget), 1e-300)[:, None]
    idx = [v.size - 1 for v in vals]
    cost = np.array([e.value(idx, vals) for e, _ in rows])
    nbrs = [{j: [] for j in range(len(vals))} for _ in rows]
    for m, (e, _) in enumerate(rows):
        for (i, j), b in e.pair.items():
            nbrs[m][i].append((j, b)), nbrs[m][j].append((i, b))

    def delta(j: int) -> np.ndarray:  # rows x options: cost change when unit j takes each option
        step = vals[j] - vals[j][idx[j]]
        out = [e.lin[j] - e.lin[j][idx[j]] if j in e.lin else np.zeros(step.size) for e, _ in rows]
        slope = [sum(b * vals[o][idx[o]] for o, b in nbrs[m][j]) for m in range(len(rows))]
        return np.array([d + s * step for d, s in zip(out, slope)])

    deltas = [delta(j) for j in range(len(vals))]

    def move(j: int, o: int) -> None:
        nonlocal cost
        cost = cost + deltas[j][:, o]
        idx[j] = o
        for k in {j} | {other for m in range(len(rows)) for other, _ in nbrs[m][j]}:
            deltas[k] = delta(k)

    while np.any(cost > budget):  # shrink
        over = (cost > budget)[:, None]
        best = (math.inf, -1, -1)
        for j, d in enumerate(deltas):
            saving = np.sum(np.where(over, -d, 0.0) / scale, axis=0)
            score = np.where(saving > 0, (werr[j] - werr[j][idx[j]]) / np.maximum(saving, 1e-300), math.inf)
            o = int(np.argmin(score))
            if score[o] < best[0]:
                best = (score[o], j, o)
        if best[1] < 0:
            return None
        move(best[1], best[2])
    while True:  # grow
        best = (0.0, -1, -1)
        for j, d in enumerate(deltas):
            gain = werr[j][idx[j]] - werr[j]
            ok = (gain > 0) & np.all(cost[:, None] + d <= budget[:, None], axis=0)
            score = np.where(ok, gain / (np.sum(np.maximum(d, 0.0) / scale, axis=0) + 1e-12), 0.0)
            o = int(np.argmax(score))
            if score[o] > best[0]:
                best = (score[o], j, o)
        if best[1] < 0:
            return idx
        move(best[1], best[2])


def _objective(problem: AllocationProblem, kept: list[np.ndarray]) -> Expr:
    werr = [problem.weights[u] * problem.errors[u][kept[j]] for j, u in enumerate(problem.units)]
    fixed = math.fsum(float(w[0]) for w in werr if w.size == 1)
    return Expr(fixed, {j: w for j, w in enumerate(werr) if w.size > 1}, {})


def _vals(problem: AllocationProblem, kept: list[np.ndarray]) -> list[np.ndarray]:
    return [problem.options[u][kept[j]].astype(np.float64) for j, u in enumerate(problem.units)]


def _as_keep(problem: AllocationProblem, kept: list[np.ndarray], idx: list[int]) -> dict:
    return {u: int(problem.options[u][kept[j][idx[j]]]) for j, u in enumerate(problem.units)}


def min_cost(problem: AllocationProblem, cost: CostModel | TableCost) -> tuple[float, dict]:
    """The minimum of ``cost`` over all allocations, and an allocation attaining it.

    With all coefficients >= 0 the minimum is at the smallest options; otherwise (negative
    coefficients, or a :class:`TableCost`) it is found exactly by a MILP (same linearisation as
    :func:`allocate`, zero gap).
    """
    cost = _check_cost(cost, "cost", problem)
    if cost.nonnegative:
        keep = {u: int(problem.options[u][0]) for u in problem.units}
        return cost.evaluate(keep), keep
    kept = [np.arange(problem.options[u].size) for u in problem.units]
    result = solve_milp(_expr(cost, problem, kept), [], _vals(problem, kept), "transport", None, 0.0, None)
    if result.idx is None:
        raise RuntimeError(f"HiGHS failed to minimise the cost: {result.message}")
    keep = _as_keep(problem, kept, result.idx)
    return cost.evaluate(keep), keep


def _validate(problem, costs, budgets, time_limit, mip_rel_gap, formulation):
    if not isinstance(problem, AllocationProblem):
        raise ValueError(f"`problem` must be an AllocationProblem, got {type(problem).__name__}.")
    if not isinstance(costs, Mapping):
        raise ValueError("`costs` must be a mapping name -> CostModel or TableCost.")
    costs = {name: _check_cost(c, f"costs[{name!r}]", problem) for name, c in costs.items()}
    budgets = {} if budgets is None else budgets
    if not isinstance(budgets, Mapping):
        raise ValueError("`budgets` must be a mapping name -> float or None.")
    unknown = set(budgets) - set(costs)
    if unknown:
        raise ValueError(f"`budgets` names costs that `costs` does not define: {sorted(map(repr, unknown))}.")
    clean = {}
    for name, b in budgets.items():
        b = _finite(b, f"budgets[{name!r}]")
        if b < 0:
            raise ValueError(f"`budgets[{name!r}]` must be >= 0, got {b}.")
        clean[name] = b
    if time_limit is not None:
        time_limit = _finite(time_limit, "time_limit")
        if time_limit <= 0:
            raise ValueError(f"`time_limit` must be > 0 seconds or None, got {time_limit}.")
    mip_rel_gap = _finite(mip_rel_gap, "mip_rel_gap")
    if not 0 <= mip_rel_gap < 1:
        raise ValueError(f"`mip_rel_gap` must lie in [0, 1), got {mip_rel_gap}.")
    if formulation not in FORMULATIONS:
        raise ValueError(f"`formulation` must be one of {FORMULATIONS}, got {formulation!r}.")
    return costs, clean, time_limit, mip_rel_gap


def allocate(
    problem: AllocationProblem,
    costs: Mapping[str, CostModel | TableCost],
    budgets: Mapping[str, float] | None = None,
    time_limit: float | None = None,
    mip_rel_gap: float = 1e-6,
    *,
    formulation: str = "transport",
    warm_start: bool = True,
) -> Allocation:
    r"""Choose one keep count per unit minimising the weighted error under every budget.

    .. math::

        \min_{o}\ \sum_j w_j E_j[o_j] \quad\text{s.t.}\quad
        \mathrm{cost}_m(K_1[o_1], \dots, K_J[o_J]) \le \beta_m \quad \forall m \in \text{budgets},
        \qquad o_i = o_j \ \text{for tied units}

    Solved exactly as a MILP by HiGHS; the derivation is in ``formulations/global_allocation.md``, the
    ties (``problem.ties``: equality rows ``x_{i,o} = x_{j,o}``) in ``formulations/ucp.md``.

    Parameters
    ----------
    problem : AllocationProblem
    costs : mapping name -> CostModel or TableCost
        Costs to report; those named in ``budgets`` are also constrained. A :class:`TableCost` (a
        measured latency) prices each option, and each pair of options, on its own
        (``formulations/latency_tables.md``).
    budgets : mapping name -> float, optional
        Upper bound of each constrained cost (finite, >= 0).
    time_limit : float, optional
        Seconds for HiGHS. On expiry the incumbent is returned with status ``"time_limit"``, its
        proven bound and gap, and a warning quoting the gap.
    mip_rel_gap : float
        Relative gap at which HiGHS stops and reports ``"optimal"``.
    formulation : {"transport", "mccormick"}
        Linearisation of the products ``k_i k_j``.
    warm_start : bool
        Give HiGHS a greedy incumbent when every budgeted cost has coefficients >= 0.

    Returns
    -------
    Allocation

    Raises
    ------
    ValueError
        Bad inputs, or budgets that no allocation meets (the message gives the minimum cost).
    RuntimeError
        No feasible allocation found within ``time_limit``, or a HiGHS failure.
    """
    start = time.perf_counter()
    costs, budgets, time_limit, mip_rel_gap = _validate(
        problem, costs, budgets, time_limit, mip_rel_gap, formulation
    )
    lowest = {}
    for name, b in budgets.items():
        lowest[name], keep = min_cost(problem, costs[name])
        if lowest[name] > b + _tolerance(b):
            raise ValueError(
                f"`budgets[{name!r}]` = {b:.6g} cannot be met: the minimum achievable {name} is "
                f"{lowest[name]:.6g} (at keep = {keep})."
            )
    budgeted = [costs[name] for name in budgets]
    kept = _presolve(problem, budgeted)
    objective = _objective(problem, kept)
    rows = [(_expr(costs[name], problem, kept), budgets[name]) for name in budgets]
    # Greedy incumbent (non-decreasing costs only): HiGHS's warm start, or the fallback when HiGHS
    # stops at the time limit without an incumbent of its own.
    # (Not with tied units: its moves change one unit at a time.)
    greedy = (_greedy_start(problem, kept, rows) if all(c.nonnegative for c in budgeted) and not problem.ties
              else None)
    vals = _vals(problem, kept)
    for _attempt in range(3):
        result = solve_milp(
            objective, rows, vals, formulation, time_limit, mip_rel_gap, greedy if warm_start else None,
            ties=[g for g in problem.tie_groups() if len(g) > 1],
        )
        if result.idx is None and result.status == TIME_LIMIT and greedy is not None:
            message = result.message + "; greedy incumbent"
            result = MilpResult(greedy, TIME_LIMIT, result.bound, message, result.info)
        if result.idx is None:
            break
        keep = _as_keep(problem, kept, result.idx)
        excess = {name: costs[name].evaluate(keep) - b for name, b in budgets.items()}
        excess = {name: e for name, e in excess.items() if e > _tolerance(budgets[name])}
        if not excess:
            break
        if any(e > 1e3 * _tolerance(budgets[name]) for name, e in excess.items()):
            raise RuntimeError(f"HiGHS returned an allocation over budget by {excess}: {result.message}")
        # HiGHS met a row only within its tolerance: tighten that row by twice the excess, re-solve.
        rows = [(e, b - 2 * excess.get(name, 0.0)) for name, (e, b) in zip(budgets, rows)]
    else:
        raise RuntimeError(f"HiGHS kept returning allocations that exceed a budget: {result.message}")
    if result.idx is None:
        if result.status == "infeasible":
            raise ValueError(
                f"the budgets {budgets} cannot be met together, although each alone can "
                f"(minimum costs {lowest}). HiGHS: {result.message}"
            )
        if result.status == TIME_LIMIT:
            raise RuntimeError(
                f"no feasible allocation found within `time_limit` = {time_limit} s. HiGHS: {result.message}"
            )
        raise RuntimeError(f"HiGHS failed: {result.message}")
    achieved = {name: c.evaluate(keep) for name, c in costs.items()}
    assert all(achieved[n] <= b + _tolerance(b) for n, b in budgets.items())
    value = problem.objective(keep)
    # Each unit's least error (budgets ignored) bounds too: it covers a stop before the root LP.
    trivial = objective.const + math.fsum(float(v.min()) for v in objective.lin.values())
    bound = min(max(result.bound, trivial), value)  # min absorbs round-off when optimal
    gap = relative_gap(value, bound, 1.0)
    message = (
        f"{result.status}: objective {value:.6g}, bound {bound:.6g}, gap {gap:.3g}. HiGHS: {result.message}"
    )
    if _attempt:
        message += f" (budgets tightened by HiGHS's tolerance in {_attempt} re-solve(s))"
    if result.status == TIME_LIMIT:
        warnings.warn(
            f"allocation stopped at the time limit ({time_limit} s) with relative gap {gap:.3g} "
            f"(requested {mip_rel_gap:g}); returning the incumbent.",
            RuntimeWarning,
            stacklevel=2,
        )
    return Allocation(
        keep=MappingProxyType(keep),
        objective=value,
        bound=bound,
        gap=gap,
        status=result.status,
        costs=MappingProxyType(achieved),
        solve_time=time.perf_counter() - start,
        message=message,
        formulation=formulation,
        info=MappingProxyType(dict(result.info)),
    )
