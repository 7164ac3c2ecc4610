"""Solver registry: each layer solver declares what it is and what it needs, and is chosen by name."""

from __future__ import annotations

import importlib.util
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from orprune._status import FEASIBLE, OPTIMAL, TIME_LIMIT
from orprune.layer.problem import LayerProblem
from orprune.layer.result import Selection, relative_gap

__all__ = ["SolverSpec", "register_solver", "get_solver", "available_solvers", "make_selection", "SOLVERS"]

SolverFunc = Callable[..., Selection]


@dataclass(frozen=True)
class SolverSpec:
    """A registered layer solver.

    ``func(prob, k, *, time_limit, **options) -> Selection`` is only ever called with a validated
    problem and ``0 < k < C``; :func:`orprune.select` handles the trivial cases.
    """

    name: str
    func: SolverFunc
    exact: bool
    requires: tuple[str, ...]
    description: str

    def missing(self) -> list[str]:
        return [m for m in self.requires if importlib.util.find_spec(m) is None]


SOLVERS: dict[str, SolverSpec] = {}


def register_solver(
    name: str, *, exact: bool, requires: tuple[str, ...] = (), description: str = ""
) -> Callable[[SolverFunc], SolverFunc]:
    """Decorator adding a solver to the registry under ``name``."""

    def decorator(func: SolverFunc) -> SolverFunc:
        if name in SOLVERS:
            raise ValueError(f"a solver named {name!r} is already registered.")
        SOLVERS[name] = SolverSpec(name, func, exact, tuple(requires), description or (func.__doc__ or "").strip().split("\n")[0])
        return func

    return decorator


def get_solver(name: str) -> SolverSpec:
    """The registered solver ``name``, with an error naming the choices or the missing package."""
    if name not in SOLVERS:
        raise ValueError(f"`solver` must be one of {sorted(SOLVERS) + ['auto']}, got {name!r}.")
    spec = SOLVERS[name]
    missing = spec.missing()
    if missing:
        raise ImportError(f"solver {name!r} needs {', '.join(missing)}; install it with pip.")
    return spec


def available_solvers() -> list[str]:
    """Names of the registered solvers whose packages are importable."""
    return sorted(name for name, spec in SOLVERS.items() if not spec.missing())


def make_selection(
    prob: LayerProblem,
    mask: np.ndarray,
    *,
    solver: str,
    status: str,
    start_time: float,
    bound: float | None = None,
    message: str = "",
    info: Mapping[str, Any] | None = None,
) -> Selection:
    """Refit ``mask`` and package it as a :class:`Selection`.

    ``bound=None`` means the solver proves nothing beyond the universal bound ``f(all)``.
    """
    mask = np.asarray(mask, dtype=bool).copy()
    weights, objective = prob.refit(mask)
    bound = prob.full_objective if bound is None else min(float(bound), objective)
    gap = relative_gap(objective, bound, prob.yy)
    return Selection(
        mask=mask,
        weights=weights,
        objective=objective,
        bound=bound,
        gap=gap,
        status=status,
        solver=solver,
        solve_time=time.perf_counter() - start_time,
        message=message,
        info=dict(info or {}),
    )


def certified_selection(prob: LayerProblem, mask: np.ndarray, bound: float, *, complete: bool, rel_gap: float,
                        solver: str, start_time: float, info: Mapping[str, Any]) -> Selection:
    """The result of a tree search: "optimal" when the search completed (the proven ``bound`` within
    ``rel_gap``), else "time_limit" with the gap reached and a ``RuntimeWarning``. ``bound`` is absolute."""
    yy = prob.yy
    bound = max(bound, prob.full_objective)
    objective = prob.objective(mask)
    gap = max(objective - bound, 0.0) / max(objective, 1e-12 * max(yy, 1.0))
    if complete:
        status, message = OPTIMAL, f"certified optimal within relative gap {gap:.2e} (tolerance {rel_gap:g})"
    else:
        status = TIME_LIMIT
        message = f"time limit reached: relative gap {gap:.3e} (tolerance {rel_gap:g})"
        warnings.warn(f"{solver} solver stopped at the time limit with relative gap {gap:.3e} "
                      f"(objective {objective:.6g}, bound {bound:.6g}).", RuntimeWarning, stacklevel=5)
    info = dict(info)
    if "log" in info:
        info["log"] = list(info["log"]) + [f"final: {status}, objective {objective:.6g}, bound {bound:.6g}, "
                                           f"gap {gap:.3e}, {info.get('nodes', 0)} nodes"]
    return make_selection(prob, mask, solver=solver, status=status, start_time=start_time, bound=bound,
                          message=message, info=info)


def trivial_selection(prob: LayerProblem, k: int, solver: str) -> Selection:
    """``k == 0`` or ``k == C``: a single feasible mask, optimal by definition."""
    start = time.perf_counter()
    mask = np.full(prob.n_channels, k == prob.n_channels)
    objective = prob.objective(mask)
    return make_selection(prob, mask, solver=solver, status=OPTIMAL, start_time=start, bound=objective,
                          message="trivial: a single mask has this many channels")


def heuristic_selection(prob: LayerProblem, mask: np.ndarray, solver: str, start_time: float,
                        info: Mapping[str, Any] | None = None) -> Selection:
    return make_selection(prob, mask, solver=solver, status=FEASIBLE, start_time=start_time,
                          message="heuristic solution; bound is f(all channels)", info=info)
