"""Each unit's channel-selection problem and its error curve, for :meth:`orprune.Pruner.fit` (step 3 of
``pipeline.py``'s outline): the consumers' problems joined per unit, the curve solves split into tasks and run
through the pruner's mapper (serial, a process pool or an executor).

Split from ``pipeline.py``; the mapper stays with the Pruner, which owns the pool and records ``n_jobs_used_``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from tqdm.auto import tqdm

from orprune._pipeline_steps import curve_task, curve_tasks, estimated_curve_seconds, unit_options, unit_part
from orprune.budget.curves import ErrorCurve, join_curves
from orprune.layer.problem import LayerProblem
from orprune.layer.selection import resolve_solver
from orprune.network.units import PruningGraph

__all__ = ["unit_curves", "unit_problems"]

#: ``mapper(seconds, n_tasks)``: a context giving a ``map`` over the curve tasks (``Pruner._mapper``); the
#: estimated serial seconds and the task count decide whether a pool is worth starting.
Mapper = Callable[[float, int], contextlib.AbstractContextManager[Callable[..., Iterator[Any]]]]


def unit_problems(graph: PruningGraph, problems: Mapping[str, LayerProblem]) -> dict[str, LayerProblem]:
    """Each unit's problem: its consumers' problems over the unit's channels (:func:`unit_part`), joined with each
    consumer's error relative to its own ``||Y||^2``, so that layers of any scale compare."""
    out: dict[str, LayerProblem] = {}
    for unit in graph.units:
        whole = [problems[c.name] for c in unit.consumers]
        parts = [unit_part(p, c) for p, c in zip(whole, unit.consumers)]
        out[unit.name] = LayerProblem.combine(parts, scales=[1.0 / max(p.yy, 1e-300) for p in whole])
    return out


def unit_curves(graph: PruningGraph, problems: Mapping[str, LayerProblem], mapper: Mapper, *, solver: str,
                max_options: int, min_channels: int, round_to: int, time_limit: float | None,
                progress: bool) -> dict[str, ErrorCurve]:
    """Each unit's error curve over its keep options (:func:`unit_options`), with ``solver`` resolved per unit
    (``"auto"``: by size), solved as :func:`curve_tasks` (longest first) and joined back per unit."""
    ordered = [problems[u.name] for u in graph.units]
    options = unit_options(graph, max_options, min_channels, round_to)
    solvers = [resolve_solver(solver, p.n_channels, p.n_features) for p in ordered]
    tasks = curve_tasks(ordered, solvers, options, [len(u.consumers) for u in graph.units])
    seconds = sum(estimated_curve_seconds(ordered[i], solvers[i]) for i, _ in tasks)
    with mapper(seconds, len(tasks)) as run:
        in_process = run is map  # progress bars of the paths only in this process
        results = run(curve_task, [ordered[i] for i, _ in tasks], [counts for _, counts in tasks],
                      [solvers[i] for i, _ in tasks], [time_limit] * len(tasks), [progress and in_process] * len(tasks))
        parts: dict[int, list[ErrorCurve]] = {i: [] for i in range(len(ordered))}
        for (i, _), curve in zip(tasks, tqdm(results, total=len(tasks), desc="error curves", disable=not progress,
                                             leave=False)):
            parts[i].append(curve)
    return {unit.name: join_curves(parts[i]) for i, unit in enumerate(graph.units)}
