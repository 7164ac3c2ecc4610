"""The steps of :class:`orprune.Pruner` shared with :func:`orprune.factorize`: input checks, keep options,
the forward order of consumers, one unit's part of a consumer's problem, and the curve task run by the executor.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from threadpoolctl import threadpool_limits

from orprune.budget.curves import PATH_SOLVERS, ErrorCurve, error_curve
from orprune.layer.fixed import fix_channels
from orprune.layer.problem import LayerProblem
from orprune.layer.tied import tie_channels, tie_layout
from orprune.layer.wide import WideProblem
from orprune.network.graph import Consumer, call_model
from orprune.network.stages import stage_ties
from orprune.network.units import PruningGraph

__all__ = [
    "batch_inputs",
    "calibration_batches",
    "check_budgets",
    "check_calibration",
    "check_fraction",
    "check_scores",
    "curve_task",
    "forward_order",
    "keep_options",
    "one_thread_worker",
    "parallel_jobs",
    "resolve_ties",
    "unit_options",
    "top_channels",
    "unit_part",
]


def curve_task(problem: LayerProblem, keep_counts: np.ndarray, solver: str, time_limit: float | None,
               progress: bool = False) -> ErrorCurve:
    """One unit's curve at ``keep_counts``; a top-level function so process pools can pickle it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # time-limit warnings: the status is in the curve
        if solver == "path":  # a wide unit's paths get their own progress bar (ETA)
            return error_curve(problem, keep_counts, solver=solver, progress=progress)
        return error_curve(problem, keep_counts, solver=solver, time_limit=time_limit)


#: ``n_jobs=None`` solves the curves in a process pool when their estimated serial time is above this many
#: seconds: below it the pool's start-up (spawned workers import torch, ~2-5 s) would cost more than it saves.
AUTO_POOL_SECONDS = 20.0


def curve_tasks(problems: Sequence[LayerProblem], solvers: Sequence[str], options: Sequence[np.ndarray],
                n_consumers: Sequence[int]) -> list[tuple[int, np.ndarray]]:
    """The curve solves of every unit as ``(unit index, keep counts)`` tasks, longest first.

    Greedy and path give a whole curve from one run; other solvers solve each keep count alone, so each count
    is its own task and parallel workers share even a single slow unit. Longest first (exact, wide, many
    consumers, middle counts), so that workers finish together.
    """
    tasks: list[tuple[int, np.ndarray]] = []
    for i, (solver, counts) in enumerate(zip(solvers, options)):
        tasks += [(i, counts)] if solver in PATH_SOLVERS else [(i, counts[j : j + 1]) for j in range(counts.size)]
    tasks.sort(key=lambda t: (solvers[t[0]] not in PATH_SOLVERS, problems[t[0]].n_channels, n_consumers[t[0]],
                              -abs(int(t[1][0]) - problems[t[0]].n_channels / 2)), reverse=True)
    return tasks


def estimated_curve_seconds(problem: LayerProblem, solver: str) -> float:
    """A rough single-thread time of one unit's whole curve with a path solver, from its flop count: the
    blocked paths cost about ``(C g)^3`` flops per direction at ~6 GFLOP/s, greedy ``C (C g)^2 g`` memory-bound
    flops at ~1 GFLOP/s (measured on ResNet-50's units, ``benchmarks/results/scale_network.md``). Other solvers
    (exact: a time limit per count) count as zero: their tasks are short or bounded by ``time_limit``."""
    n, c, g = float(problem.n_features), float(problem.n_channels), float(problem.group_size)
    if solver == "path":
        return 2.0 * n**3 / 6e9
    if solver == "greedy":
        return c * n * n * g / 1e9
    return 0.0


def spawn_safe_main() -> bool:
    """Whether spawned workers can start here without re-running the user's program: they import the main
    module, so a script must keep its work under ``if __name__ == "__main__":``. True in interactive sessions
    and notebooks (no main file) and when the main file has that guard; a script without it gets no automatic
    pool (it would run the script again in every worker)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None:
        return True
    try:
        source = Path(path).read_text(errors="replace")
    except OSError:
        return False
    return re.search(r"""__name__\s*==\s*["']__main__["']""", source) is not None


def parallel_jobs(seconds: float, n_tasks: int) -> int:
    """Workers for ``n_jobs=None``: the usable cores (at most 8, at most one per task) when the curves are
    estimated to take more than ``AUTO_POOL_SECONDS`` serially and workers can be spawned safely
    (:func:`spawn_safe_main`), else 1 (serial). One-thread workers side by side finish the curves' BLAS-2/3 mixes
    about twice as fast on two cores as one process with two BLAS threads (``benchmarks/results/scale_network.md``).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if seconds <= AUTO_POOL_SECONDS or not spawn_safe_main():
        return 1
    return max(1, min(cores, 8, n_tasks))


def one_thread_worker() -> None:
    """Pool initializer: one BLAS and torch thread per worker, so ``n_jobs`` workers share the cores."""
    threadpool_limits(1)
    torch.set_num_threads(1)


@torch.no_grad()
def forward_order(model: nn.Module, consumers: Sequence[Consumer], example_inputs: Any) -> list[Consumer]:
    """``consumers`` in the order a forward pass first runs them (module order for ties)."""
    seen: list[str] = []
    handles = [model.get_submodule(c.name).register_forward_hook(
        lambda *_args, name=c.name: seen.append(name) if name not in seen else None) for c in consumers]
    try:
        call_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    rank = {name: i for i, name in enumerate(seen)}
    return sorted(consumers, key=lambda c: rank.get(c.name, len(rank)))


def unit_part(problem: LayerProblem, consumer: Consumer) -> LayerProblem:
    """A consumer's problem over one unit's channels: after a concatenation, the layer's other input
    channels are kept (eliminated, ``formulations/fixed_columns.md``). A wide consumer's part is its compressed
    selection problem (``formulations/wide_consumers.md``), without the stored rows."""
    if isinstance(problem, WideProblem):
        problem = problem.selection
    if consumer.channels is None:  # all the inputs; a grouped conv: one decision per position in every group
        return tie_channels(problem, consumer.tie) if consumer.tie > 1 else problem
    layout = consumer.input_channels.reshape(consumer.n_channels, -1)  # (n, tie): the parts of a chunk
    fixed = np.ones(consumer.n_input_channels, dtype=bool)
    fixed[layout.ravel()] = False
    if fixed.any():
        problem = fix_channels(problem, fixed).reduced  # its channels: the free ones, in increasing order
        layout = np.searchsorted(np.flatnonzero(~fixed), layout)
    return tie_layout(problem, layout)


def keep_options(n_channels: int, max_options: int, min_channels: int, round_to: int = 1) -> np.ndarray:
    """Candidate keep counts: multiples of ``round_to`` from ``min_channels`` on, and the full width.

    CPU and GPU kernels run channel counts that are multiples of their vector width (8 floats with AVX2, 16 with
    AVX-512) markedly faster, so rounding turns saved MACs into measured speed; a unit of at most ``round_to``
    channels keeps its full width, which bounds the reachable budget. At most ``max_options`` counts, evenly
    spread."""
    low = min(min_channels, n_channels)
    counts = np.arange(low, n_channels + 1)
    counts = counts[(counts % round_to == 0) | (counts == n_channels)]  # the full width is always there
    return counts[_spread(counts.size, max_options)]


def _spread(size: int, most: int) -> np.ndarray:
    """At most ``most`` indices of ``range(size)``, evenly spread, the first and the last always among them."""
    if size <= most:
        return np.arange(size)
    return np.unique(np.round(np.linspace(0, size - 1, most)).astype(int))


def check_fraction(value: float | None, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"`{name}` must be a fraction of the original in (0, 1], got {value!r}.")
    return float(value)


def check_budgets(macs: float | None, params: float | None, latency: float | None,
             allocation: str) -> tuple[float | None, float | None, float | None]:
    """The checked budget fractions of :meth:`Pruner.prune` (also checked by :func:`prune` before it fits)."""
    macs, params, latency = check_fraction(macs, "macs"), check_fraction(params, "params"), check_fraction(latency, "latency")
    if macs is None and params is None and latency is None:
        raise ValueError("give a budget: `macs`, `params` and/or `latency` as a fraction in (0, 1].")
    if allocation not in ("milp", "uniform"):
        raise ValueError(f"`allocation` must be 'milp' or 'uniform', got {allocation!r}.")
    if latency is not None and allocation == "uniform":
        raise ValueError("a `latency` budget needs `allocation='milp'` (measured latency is not monotone in "
                         "a uniform rate).")
    return macs, params, latency


def check_calibration(model: nn.Module, batches: list[Any]) -> None:
    """Fail before any statistics: tensor batches share one shape and finite values, and the model runs
    on one calibration input."""
    first = batches[0]
    if torch.is_tensor(first):
        for i, batch in enumerate(batches):
            if not torch.is_tensor(batch) or batch.ndim == 0 or batch.shape[1:] != first.shape[1:] or not len(batch):
                found = tuple(batch.shape) if torch.is_tensor(batch) else type(batch).__name__
                raise ValueError(f"`calibration` batch {i} has inputs of shape {found}; batch 0 has "
                                 f"{tuple(first.shape)}: every batch needs the same shape after the batch dimension.")
            if batch.is_floating_point() and not bool(torch.isfinite(batch).all()):
                raise ValueError(f"`calibration` batch {i} holds NaN or inf values.")
    example = first[:1] if torch.is_tensor(first) else first
    shape = f"shape {tuple(example.shape)}" if torch.is_tensor(example) else type(example).__name__
    training = model.training
    try:
        with torch.no_grad():
            call_model(model.eval(), example)
    except Exception as exc:
        raise ValueError(f"`model` does not run on the `calibration` inputs (one input of {shape}): "
                         f"{type(exc).__name__}: {exc}") from exc
    finally:
        model.train(training)


def batch_inputs(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def calibration_batches(model: nn.Module, calibration: Iterable[Any]) -> list[Any]:
    """The checked inputs of :meth:`Pruner.fit`'s ``calibration`` (batches or (input, target) pairs), tensors
    detached: kept for the sequential refit of :meth:`Pruner.prune`."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(calibration, Iterable) or torch.is_tensor(calibration):
        raise ValueError("`calibration` must be an iterable of batches (a list of input tensors or a DataLoader), "
                         f"got {type(calibration).__name__}; wrap one tensor as [tensor].")
    batches = [batch_inputs(b).detach() if torch.is_tensor(batch_inputs(b)) else batch_inputs(b) for b in calibration]
    if not batches:
        raise ValueError("`calibration` is empty: pruning needs at least one batch of inputs.")
    check_calibration(model, batches)
    return batches


def check_scores(scores: Mapping[str, Any] | None, graph: PruningGraph) -> dict[str, np.ndarray] | None:
    """``scores`` of :meth:`Pruner.prune` as float arrays, one finite score per channel of known units."""
    if scores is None:
        return None
    if not isinstance(scores, Mapping):
        raise ValueError(f"`scores` must be a mapping unit -> channel scores, got {type(scores).__name__}.")
    out = {}
    for unit, values in scores.items():
        if unit not in graph:
            raise ValueError(f"`scores` names {unit!r}, which is not a prunable unit; units: {list(graph.names)}.")
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (graph[unit].n_channels,) or not np.all(np.isfinite(values)):
            raise ValueError(f"`scores[{unit!r}]` must hold {graph[unit].n_channels} finite scores, got shape "
                             f"{values.shape}.")
        out[unit] = values
    return out


def top_channels(scores: np.ndarray, k: int) -> np.ndarray:
    """Mask of the ``k`` highest scores (ties: the lower index first)."""
    mask = np.zeros(scores.size, dtype=bool)
    mask[np.argsort(-scores, kind="stable")[:k]] = True
    return mask


def resolve_ties(ties: str | Sequence[Sequence[str]] | None, graph: PruningGraph) -> list[tuple[str, ...]]:
    """The tied unit groups of :meth:`Pruner.prune`: none, ``"stages"`` (:func:`orprune.network.stages.stage_ties`)
    or the given groups of unit names; and always the chains of units a chunk's balance ties (``graph.chains``)."""
    chained = [tuple(u for u, options in chain.items() if len(options) > 1) for chain in graph.chains]
    chained = [group for group in chained if len(group) > 1]
    if ties is None:
        return chained
    if isinstance(ties, str):
        if ties != "stages":
            raise ValueError(f"`ties` must be None, 'stages' or groups of unit names, got {ties!r}.")
        groups = [tuple(g) for g in stage_ties(graph)]
    elif not isinstance(ties, Sequence) or any(isinstance(g, str) or not isinstance(g, Sequence) for g in ties):
        raise ValueError(f"`ties` must be None, 'stages' or groups of unit names, got {ties!r}.")
    else:
        groups = [tuple(g) for g in ties]
        unknown = [u for g in groups for u in g if u not in graph]
        if unknown:
            raise ValueError(f"`ties` names units the model does not have: {unknown}.")
    balanced = {u for chain in graph.chains for u in chain}
    clash = sorted({u for g in groups for u in g} & balanced)
    if clash:
        raise ValueError(f"`ties` names units whose keep counts a chunk's balance already ties: {clash} "
                         "(PruningGraph.chains).")
    return groups + chained


def unit_options(graph: PruningGraph, max_options: int, min_channels: int, round_to: int) -> list[np.ndarray]:
    """Every unit's candidate keep counts (:func:`keep_options`); a unit in a chain (``graph.chains``) takes the
    chain's counts at the steps where every unit of the chain keeps ``min_channels`` (or its width), at most
    ``max_options`` of them (``round_to`` does not apply: the balance fixes the counts)."""
    chained: dict[str, np.ndarray] = {}
    width = graph.n_channels
    for chain in graph.chains:
        steps = max(len(o) for o in chain.values())
        counts = {u: np.asarray(o if len(o) == steps else o * steps) for u, o in chain.items()}
        ok = np.array([t for t in range(steps)
                       if all(counts[u][t] >= min(min_channels, width[u]) for u in chain) or t == steps - 1])
        ok = ok[_spread(ok.size, max_options)]
        for u, options in chain.items():
            chained[u] = counts[u][ok] if len(options) > 1 else np.asarray(options)
    return [chained[u.name] if u.name in chained else keep_options(u.n_channels, max_options, min_channels, round_to)
            for u in graph.units]
