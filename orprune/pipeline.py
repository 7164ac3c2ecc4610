"""From a torch model to a smaller torch model (design.md, section 3).

1. Trace the model once: prunable channel groups (units) and their consumer layers.
2. Stream calibration batches once: each consumer's least-squares statistics.
3. Per unit, an error curve: the best reconstruction error for each keep count (independent
   problems, solved through any ``concurrent.futures.Executor``).
4. Per budget, a MILP chooses one keep count per unit under MACs / params budgets.
5. Surgery: remove the channels, write least-squares weights and compensated biases.

Steps 1-3 are :meth:`Pruner.fit`; steps 4-5 are :meth:`Pruner.prune`, so many budgets come from
one set of curves.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from orprune._latency_loop import check_latency_loop, latency_inputs, latency_report, prune_to_measured_latency
from orprune._phases import PhaseTime, module_device, timed_phase
from orprune._pipeline_steps import (
    batch_inputs,
    check_budgets,
    check_calibration,
    check_scores,
    curve_task,
    curve_tasks,
    estimated_curve_seconds,
    forward_order,
    one_thread_worker,
    parallel_jobs,
    resolve_ties,
    top_channels,
    unit_options,
    unit_part,
)
from orprune._pool import interruptible_pool
from orprune._pruner_options import check_pruner_options
from orprune._refit import consumer_problem, consumer_update, refit_updates
from orprune.budget.allocation import Allocation, AllocationProblem, allocate
from orprune.budget.curves import ErrorCurve, join_curves
from orprune.budget.output_errors import output_error_curves, probe_batches
from orprune.budget.recheck import PolishedPoint, recheck_allocation
from orprune.budget.self_check import meet_counted_budgets
from orprune.budget.uniform_allocation import allocate_uniform
from orprune.layer.problem import LayerProblem, StatisticsAccumulator
from orprune.layer.selection import resolve_solver
from orprune.layer.solvers.polish import polish_swap
from orprune.network.calibration import DEFAULT_POSITIONS_PER_IMAGE, TargetCache, collect_statistics
from orprune.network.costs import count_macs_params, network_costs
from orprune.network.graph import DEFAULT_MAX_FEATURES, Consumer, find_groups
from orprune.network.latency import LatencyModel, latency_tables
from orprune.network.residual_targets import ResidualTarget, find_residual_targets
from orprune.network.surgery import ConsumerUpdate, PruningPlan, apply_pruning
from orprune.prune_result import LatencyReport, PruneResult, RefitReport, UnitReport

__all__ = ["Pruner", "PruneResult", "UnitReport", "prune"]

#: Default ``refit_memory`` of :class:`Pruner`: 2 GiB of activations held by the streamed refit (ResNet-50, 512 images
#: of 224x224: 2.1 GB held instead of 3.1, refit 146 s instead of 138 s, ``benchmarks/results/scale_network_224.md``).
DEFAULT_REFIT_MEMORY = 2 * 2**30


class Pruner:
    """Channel pruner: error curves once (:meth:`fit`), any number of budgets (:meth:`prune`).

    Parameters
    ----------
    solver : str, default "auto"
        Layer solver for the curves: ``"auto"`` certifies small units exactly, uses greedy beyond
        and the blocked forward/backward ``"path"`` on wide units (``AUTO_PATH_MIN_FEATURES``); any name of :func:`orprune.available_solvers` forces one.
    ridge : float, default 1e-4
        Ridge of each consumer's least squares, relative to the mean diagonal of its Gram matrix.
    positions_per_image : int, default 32
        Sampled spatial positions per image for conv consumers.
    max_options : int, default 32
        Keep counts per unit offered to the allocation (a grid for wider units).
    errors : {"layer", "output"}, default "layer"
        What the allocation MILP sums: ``"layer"``, each unit's reconstruction error relative to its
        own output; ``"output"``, each unit's error of the network's output when it alone is pruned to
        each keep count (``output_errors_``; one forward pass of ``probe_images`` images per unit and
        count, in :meth:`fit`), which weighs a unit by how far its error travels.
    probe_images : int, default 512
        Calibration images (the first batches) on which ``errors="output"`` is measured.
    min_channels : int, default 1
        Fewest channels a unit may keep.
    round_to : int, default 1
        Keep counts are multiples of this (or the full width): CPU and GPU kernels run channel counts
        that are multiples of their vector width (8 floats with AVX2, 16 with AVX-512) markedly faster,
        so rounding turns saved MACs into measured speed. A unit narrower than ``2 * round_to`` cannot
        be pruned at all, which bounds the reachable budget.
    ignored_layers : iterable of nn.Module or str
        Left untouched, with everything coupled to them.
    max_features : int
        Consumers whose design matrix has more columns select channels on ``max_features // C`` compressed
        columns per channel and refit the kept ones exactly (``formulations/wide_consumers.md``; before 0.2
        they were left alone).
    residual : bool, default True
        Also prune residual streams (channels tied through adds), see :func:`orprune.find_groups`.
    sequential : bool, default True
        Refit each unit's consumers on inputs from the already pruned part of the network (targets
        from the original), which avoids error accumulation; False refits on the original inputs.
    cache_targets : bool, default True
        In sequential mode, keep the original model's sampled outputs of every consumer from
        :meth:`fit` (``TargetCache``: calibration images x ``positions_per_image`` x output channels,
        float32) so that each refit pass runs only the pruned model; False saves that memory and runs
        both models per refit pass.
    residual_targets : bool, default True
        In sequential mode, a consumer whose output (after its BatchNorm) is added to a residual
        stream or shortcut is refitted to reproduce the original *sum*: its target gains the other
        operand's error ``(s_orig - s_pruned) / a`` (``a`` the BatchNorm's per-channel gain), so it
        absorbs the error the stream carries instead of passing it on
        (``formulations/least_squares_reconstruction.md``, section 6). Found with ``torch.fx``;
        models it cannot trace get no correction. With ``cache_targets``, the cache also holds the
        original other operand at the sampled positions (as much again per such consumer).
    executor : concurrent.futures.Executor, optional
        Solves the units' curves in parallel (a process pool, ``dask.distributed``'s
        ``Client.get_executor()``); serial when None.
    n_jobs : int, optional
        Without ``executor``: solve the curves in a pool of this many processes (spawned, one BLAS
        thread each; scripts need the ``if __name__ == "__main__":`` guard); serial when 1.
        ``None`` (default): a pool of one process per usable core (at most 8) when the curves' estimated
        serial time exceeds ``AUTO_POOL_SECONDS`` (20 s; wide path units, e.g. ResNet-50) and the program
        can spawn workers (a notebook, or a script with the ``__main__`` guard), else serial:
        one-thread workers side by side finish these BLAS-2/3 mixes about twice as fast on two cores as
        one process with two BLAS threads (``benchmarks/results/scale_network.md``). ``n_jobs_used_``
        says what ran. Ctrl-C stops the workers at once (they ignore SIGINT; the parent terminates them).
    time_limit : float, optional, default 1.0
        Seconds per exact solve inside the curves. The exact solver starts from greedy and backward
        elimination polished by swap search, which already is the best mask at 57 of 60 keep counts of
        ResNet-20's 16-channel units; the rest of its time proves it
        (``benchmarks/results/heuristic_curves.md``). Past the limit the curve keeps that mask with its
        proven bound and gap (the report's status), so a short limit costs certificates, not accuracy.
    polish_time : float, optional, default 2.0
        Seconds of 1-swap search (:func:`orprune.layer.solvers.polish.polish_swap`) per keep count the
        allocation picks for a unit whose curve comes from ``"path"``; :meth:`prune` then re-solves the
        allocation with the polished errors until no chosen point improves
        (:func:`orprune.budget.recheck.recheck_allocation`, ``formulations/swap_polish.md``). Polished
        points stay in ``curves_`` for later budgets. None: no polishing. Not with ``errors="output"``.
        On ResNet-50 (512 images, 64x64) 2 s and 5 s per point give the same summed error (0.10039) in
        16 s and 27 s of polishing (``benchmarks/results/scale_network.md``).
    float32_statistics : bool, default False
        Each calibration batch's ``X^T X`` and ``X^T Y`` in float32 on the model's device, summed and
        solved in float64 (:func:`orprune.network.calibration.collect_statistics`): faster and lighter on
        wide layers, equal to the float64 statistics within ``StatisticsAccumulator.FLOAT32_RTOL``.
    refit_memory : float or None, default 2 GiB
        Bytes of activations the sequential refit of :meth:`prune` may hold. It refits every consumer in one
        node-by-node pass of all calibration batches (:mod:`orprune.network.streaming`, traced with ``torch.fx``);
        where that pass would hold more (estimated from the first batch), batches are recomputed from the last
        consumer where all fitted. Models fx cannot trace, or that run a consumer twice per forward pass, get one
        calibration pass per consumer (O(depth^2) layer evaluations), as does ``refit_memory=0``. Every path gives
        the same updates; ``PruneResult.refit`` says which ran. None: no limit.
    progress : bool, default True
    seed : int, default 0

    Attributes
    ----------
    graph_ : PruningGraph
    costs_ : NetworkCosts
    unit_problems_ : dict unit -> LayerProblem
        Each unit's channel-selection problem (its consumers' problems joined, each relative to its
        own ``||Y||^2``): what the curves solve, ready for :func:`orprune.select` with any solver.
    curves_ : dict unit -> ErrorCurve
    output_errors_ : dict unit -> array or None
        With ``errors="output"``: each unit's relative output error at its curve's keep counts.
    latency_ : LatencyModel
        After :meth:`fit_latency`: the measured latency tables over the curves' keep counts.
    residual_targets_ : dict consumer -> ResidualTarget
        The consumers whose refit targets get the residual correction (empty when
        ``residual_targets`` or ``sequential`` is False, or fx cannot trace the model).
    """

    def __init__(
        self,
        *,
        solver: str = "auto",
        ridge: float = 1e-4,
        positions_per_image: int | None = DEFAULT_POSITIONS_PER_IMAGE,
        max_options: int = 32,
        errors: str = "layer",
        probe_images: int = 512,
        min_channels: int = 1,
        round_to: int = 1,
        ignored_layers: Iterable[nn.Module | str] = (),
        max_features: int = DEFAULT_MAX_FEATURES,
        residual: bool = True,
        sequential: bool = True,
        cache_targets: bool = True,
        residual_targets: bool = True,
        executor: Executor | None = None,
        n_jobs: int | None = None,
        time_limit: float | None = 1.0,
        polish_time: float | None = 2.0,
        float32_statistics: bool = False,
        refit_memory: float | None = DEFAULT_REFIT_MEMORY,
        progress: bool = True,
        seed: int = 0,
    ) -> None:
        self.solver = solver
        self.ridge = ridge
        self.positions_per_image = positions_per_image
        self.max_options = max_options
        self.errors = errors
        self.probe_images = probe_images
        self.min_channels = min_channels
        self.round_to = round_to
        self.ignored_layers = ignored_layers
        self.max_features = max_features
        self.residual = residual
        self.sequential = sequential
        self.cache_targets = cache_targets
        self.residual_targets = residual_targets
        self.executor = executor
        self.n_jobs = n_jobs
        self.time_limit = time_limit
        self.polish_time = polish_time
        self.float32_statistics = float32_statistics
        self.refit_memory = refit_memory
        self.progress = progress
        self.seed = seed

    # ------------------------------------------------------------------ fit
    def _validate(self) -> None:
        check_pruner_options(self)

    @contextlib.contextmanager
    def _mapper(self, seconds: float = 0.0, n_tasks: int = 1) -> Iterator[Callable[..., Iterator[Any]]]:
        """``map`` over the executor, a pool of ``n_jobs`` processes, or serial; with ``n_jobs=None`` a pool
        when the tasks' estimated serial ``seconds`` justify one (``parallel_jobs``)."""
        jobs = self.n_jobs if self.n_jobs is not None else parallel_jobs(seconds, n_tasks)
        self.n_jobs_used_ = 0 if self.executor is not None else jobs
        if self.executor is not None:
            yield self.executor.map
        elif jobs > 1:
            with interruptible_pool(jobs, initializer=one_thread_worker) as mapper:  # Ctrl-C: workers stop
                yield mapper
        else:
            yield map

    def _problem(self, acc: StatisticsAccumulator, consumer: Consumer, model: nn.Module,
                 check: bool = True) -> LayerProblem:
        return consumer_problem(acc, consumer, model, self.ridge, check=check)

    def fit(self, model: nn.Module, calibration: Iterable[Any]) -> Pruner:
        """Trace ``model``, accumulate calibration statistics and compute every unit's curve.

        ``calibration`` is an iterable of input tensors or (input, target) batches (a DataLoader);
        its inputs are kept (detached) for the sequential refit of :meth:`prune`.
        """
        self._validate()
        self.__dict__.pop("latency_", None)  # tables of an earlier fit price other options
        if not isinstance(model, nn.Module):
            raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        if not isinstance(calibration, Iterable) or torch.is_tensor(calibration):
            raise ValueError("`calibration` must be an iterable of batches (a list of input tensors or a DataLoader), "
                             f"got {type(calibration).__name__}; wrap one tensor as [tensor].")
        batches = [batch_inputs(b).detach() if torch.is_tensor(batch_inputs(b)) else batch_inputs(b) for b in calibration]
        if not batches:
            raise ValueError("`calibration` is empty: pruning needs at least one batch of inputs.")
        check_calibration(model, batches)
        self.fit_phases_: list[PhaseTime] = []
        with timed_phase(self.fit_phases_, "trace", module_device(model)):
            self._trace(model, batches)
        with timed_phase(self.fit_phases_, "calibration", module_device(model)):
            stats = self._calibrate(batches)
        with timed_phase(self.fit_phases_, "curves", module_device(model)):
            self._fit_curves(stats)
        if self.errors != "layer":
            with timed_phase(self.fit_phases_, "output errors", module_device(model)):
                self.output_errors_ = output_error_curves(
                    self.model_, self.graph_, self.curves_, self._unit_updates,
                    probe_batches(batches, self.probe_images), progress=self.progress)
        else:
            self.output_errors_ = None
        return self

    def _trace(self, model: nn.Module, batches: list[Any]) -> None:
        """The model's copy, its units and consumers, and their costs."""
        self.model_ = copy.deepcopy(model).eval()
        self.batches_ = batches
        self.example_inputs_ = batches[0][:1] if torch.is_tensor(batches[0]) else batches[0]
        self.graph_ = find_groups(self.model_, self.example_inputs_, ignored_layers=self.ignored_layers,
                                  residual=self.residual,
                                  max_features=self.max_features)
        if not self.graph_.units:
            raise ValueError("the model has no prunable channel group (see the warning for the excluded ones).")
        self.costs_ = network_costs(self.model_, self.graph_, self.example_inputs_)
        self.macs_before_, self.params_before_ = count_macs_params(self.model_, self.example_inputs_)

    def _calibrate(self, batches: list[Any]) -> dict[str, StatisticsAccumulator]:
        """Every consumer's statistics in one pass (and the targets the sequential refit reuses)."""
        self.targets_ = TargetCache() if self.sequential and self.cache_targets else None
        found = (find_residual_targets(self.model_, self.graph_.consumers, self.example_inputs_)
                 if self.sequential and self.residual_targets else {})
        self.residual_targets_: dict[str, ResidualTarget] = found
        # the cache keeps the original other operands at the sampled positions for the refit passes
        offsets = {n: t.offset(self.model_) for n, t in found.items()} if self.targets_ is not None else None
        stats = collect_statistics(self.model_, self.graph_.consumers, batches, cache=self.targets_, offsets=offsets,
                                   positions_per_image=self.positions_per_image, seed=self.seed,
                                   progress=self.progress, float32=self.float32_statistics)
        self.statistics_ = stats
        return stats

    def _fit_curves(self, stats: dict[str, StatisticsAccumulator]) -> None:
        """Each layer's problem, each unit's combined problem and its error curve."""
        layers = list({c.name: c for c in reversed(self.graph_.consumers)}.values())[::-1]  # one per layer
        self.consumer_order_ = forward_order(self.model_, layers, self.example_inputs_)
        self.problems_ = {}
        for c in layers:  # each accumulator's matrices are freed once its problem holds them (means stay)
            self.problems_[c.name] = self._problem(stats[c.name], c, self.model_)
            stats[c.name].release()
        self.unit_problems_: dict[str, LayerProblem] = {}
        for unit in self.graph_.units:
            whole = [self.problems_[c.name] for c in unit.consumers]
            parts = [unit_part(p, c) for p, c in zip(whole, unit.consumers)]
            # each consumer's error relative to its own ||Y||^2: layers of any scale compare
            self.unit_problems_[unit.name] = LayerProblem.combine(parts, scales=[1.0 / max(p.yy, 1e-300) for p in whole])
        problems = list(self.unit_problems_.values())
        options = unit_options(self.graph_, self.max_options, self.min_channels, self.round_to)
        solvers = [resolve_solver(self.solver, p.n_channels, p.n_features) for p in problems]
        tasks = curve_tasks(problems, solvers, options, [len(u.consumers) for u in self.graph_.units])
        seconds = sum(estimated_curve_seconds(problems[i], solvers[i]) for i, _ in tasks)
        with self._mapper(seconds, len(tasks)) as mapper:
            in_process = mapper is map  # progress bars of the paths only in this process
            results = mapper(curve_task, [problems[i] for i, _ in tasks], [counts for _, counts in tasks],
                             [solvers[i] for i, _ in tasks], [self.time_limit] * len(tasks),
                             [self.progress and in_process] * len(tasks))
            parts: dict[int, list[ErrorCurve]] = {i: [] for i in range(len(problems))}
            for (i, _), curve in zip(tasks, tqdm(results, total=len(tasks), desc="error curves",
                                                 disable=not self.progress, leave=False)):
                parts[i].append(curve)
        self.curves_ = {unit.name: join_curves(parts[i]) for i, unit in enumerate(self.graph_.units)}
        self.polished_: dict[str, set[int]] = {}  # keep counts whose points prune() polished (path curves)

    def _unit_updates(self, unit: str, kept: np.ndarray) -> dict[str, ConsumerUpdate]:
        """The refit of one unit's consumers on ``kept``, from the original statistics."""
        return {c.name: self._update(c, {unit: kept}, self.statistics_[c.name], self.problems_[c.name])
                for c in self.graph_[unit].consumers}

    def fit_latency(self, *, batch_size: int = 1, threads: int = 1, repeats: int = 5,
                    cache_dir: str | None | bool = None) -> Pruner:
        """Measure latency tables over the keep counts of the curves (:func:`orprune.network.latency_tables`).

        Each module a unit prunes is timed at each of its widths on calibration inputs of ``batch_size``,
        with ``threads`` torch threads, on this machine (cached on disk, see ``cache_dir`` there); then
        :meth:`prune` accepts ``latency=`` budgets and reports predicted and measured latency.
        Sets ``latency_`` (a :class:`~orprune.network.latency.LatencyModel`) and returns ``self``.
        """
        self._check_fitted()
        inputs = latency_inputs(self.batches_, batch_size)
        options = {u: c.keep_counts for u, c in self.curves_.items()}
        self.latency_: LatencyModel = latency_tables(self.model_, self.graph_, inputs, options, threads=threads,
                                                     repeats=repeats, cache_dir=cache_dir, progress=self.progress)
        self.latency_inputs_ = inputs
        return self

    def _latency_report(self, model: nn.Module, keep: dict[str, int], budget: float | None) -> LatencyReport:
        return latency_report(self.latency_, self.model_, model, self.latency_inputs_, keep, budget)

    # ------------------------------------------------------------------ prune
    def _check_fitted(self) -> None:
        if not hasattr(self, "curves_"):
            raise RuntimeError("this Pruner is not fitted yet; call `fit(model, calibration)` first.")

    def _update(self, consumer: Consumer, keep: dict[str, np.ndarray], acc: StatisticsAccumulator,
                problem: LayerProblem | None = None) -> ConsumerUpdate:
        """Least-squares weights and compensated bias of one consumer (:func:`orprune._refit.consumer_update`)."""
        problem = problem if problem is not None else self._problem(acc, consumer, self.model_)
        return consumer_update(consumer, keep, acc, problem, self.graph_, self.model_)

    def _refit_updates(self, pruned_keep: dict[str, np.ndarray]) -> tuple[dict[str, ConsumerUpdate], RefitReport]:
        """Least-squares weights and biases of every consumer reading a pruned unit, and how they were made
        (:func:`orprune._refit.refit_updates`)."""
        return refit_updates(self.model_, self.graph_, pruned_keep, self.batches_, order=self.consumer_order_,
                             statistics=self.statistics_, problems=self.problems_, targets=self.targets_,
                             residual_targets=self.residual_targets_, sequential=self.sequential, ridge=self.ridge,
                             positions_per_image=self.positions_per_image, seed=self.seed,
                             float32=self.float32_statistics, progress=self.progress,
                             max_bytes=None if self.refit_memory is None else int(self.refit_memory))

    def _polish(self, unit: str, k: int, mask: np.ndarray) -> tuple[np.ndarray, float, int]:
        """Swap search from the curve's mask at ``k`` for ``polish_time`` seconds (at least one round)."""
        return polish_swap(self.unit_problems_[unit], mask, deadline=time.perf_counter() + self.polish_time)

    def _report(self, unit: str, k: int, mask: np.ndarray | None = None) -> UnitReport:
        """The curve's entry at ``k`` (``+swap`` when polished there); with a ``mask`` of given scores, that
        mask's own error."""
        curve = self.curves_[unit]
        i = int(np.flatnonzero(curve.keep_counts == k)[0])
        if mask is None:
            solver = curve.solver + ("+swap" if k in getattr(self, "polished_", {}).get(unit, ()) else "")
            error = curve.errors[i]
        else:
            solver, error = "scores", self.unit_problems_[unit].objective(mask)
        return UnitReport(unit=unit, channels_before=self.graph_[unit].n_channels, channels_after=k,
                          solver=solver, relative_error=float(error), bound=float(curve.bounds[i]),
                          status=curve.statuses[i], solve_time=curve.solve_time)

    def prune(self, *, macs: float | None = None, params: float | None = None, latency: float | None = None,
              time_limit: float | None = None, allocation: str = "milp", latency_rounds: int = 3,
              latency_tolerance: float = 0.05, ties: str | Any = None, scores: Any = None) -> PruneResult:
        """A pruned copy of the fitted model within the budgets.

        Parameters
        ----------
        macs, params : float, optional
            Fractions of the original MACs / parameters to keep at most, in (0, 1]. At least one budget.
        latency : float, optional
            Fraction of the measured unpruned latency to keep at most, in (0, 1]: the keep counts' summed
            latency tables (:meth:`fit_latency`, called with its defaults if it was not) must meet it.
            The result's ``latency`` reports the predicted and the measured latency.
        time_limit : float, optional
            Seconds for the allocation MILP.
        allocation : {"milp", "uniform"}, default "milp"
            ``"milp"``: keep counts minimising the summed errors (:func:`orprune.allocate`; which
            errors: the ``errors`` parameter);
            ``"uniform"``: the same keep fraction in every unit (:func:`orprune.allocate_uniform`),
            the per-layer-rate baseline. Either way the channels are the curves' best for the count.
        latency_rounds : int, default 3
            With a ``latency`` budget: how many times the pruned model is measured and the allocation re-solved
            with the tables' budget moved (a secant step), until the *measured* latency is within
            ``[latency * (1 - latency_tolerance), latency]``; 0 trusts the tables. The result's
            ``latency.rounds`` lists them (:mod:`orprune._latency_loop`).
        latency_tolerance : float, default 0.05
            How far below the budget a measurement may be and still end the loop, in [0, 1).
        ties : None, "stages" or sequence of sequences of unit names
            Units that take one keep count (the same option index) in the MILP: ``"stages"``, UCP's one
            width per stage of a basic-block ResNet (:func:`orprune.network.stages.stage_ties`); or given
            groups of units with the same keep options (``formulations/ucp.md``).
        scores : mapping unit -> array of shape (n_channels,), optional
            Channel importances (e.g. ``se_importance(...).scores``, :mod:`orprune.ucp`): a scored unit
            keeps its highest-scored channels instead of the curve's best at the allocated count, and its
            consumers are refitted by least squares on them as usual. The counts still come from the
            curves, so the comparison isolates the channel choice; the report gives the scored channels'
            own error (solver ``"scores"``).
        """
        self._check_fitted()
        macs, params, latency = check_budgets(macs, params, latency, allocation)
        check_latency_loop(latency_rounds, latency_tolerance)
        scores = check_scores(scores, self.graph_)
        tied = resolve_ties(ties, self.graph_)
        if time_limit is not None and not (isinstance(time_limit, (int, float)) and math.isfinite(time_limit)
                                           and time_limit > 0):
            raise ValueError(f"`time_limit` must be a positive number of seconds or None, got {time_limit!r}.")
        if latency is not None and not hasattr(self, "latency_"):
            self.fit_latency()
        if latency is not None and latency_rounds > 0:
            return prune_to_measured_latency(
                lambda fraction: self.prune(macs=macs, params=params, latency=fraction, time_limit=time_limit,
                                            allocation=allocation, latency_rounds=0, ties=ties, scores=scores),
                latency, latency_rounds, latency_tolerance)
        start = time.perf_counter()
        full = self.costs_.evaluate()
        budgets = {name: fraction * full[name] for name, fraction in (("macs", macs), ("params", params))
                   if fraction is not None}
        if latency is not None:
            budgets["latency"] = latency * self.latency_.full
        costs = {"macs": self.costs_.macs, "params": self.costs_.params}
        if hasattr(self, "latency_"):
            costs["latency"] = self.latency_.cost

        def solve(curves: dict[str, ErrorCurve], limits: dict[str, float]) -> Allocation:
            problem = AllocationProblem(
                options={u: c.keep_counts for u, c in curves.items()},
                errors={u: c.errors for u, c in curves.items()} if self.output_errors_ is None else self.output_errors_,
                ties=tied)
            if allocation == "uniform":
                return allocate_uniform(problem, costs, limits)
            return allocate(problem, costs=costs, budgets=limits, time_limit=time_limit)

        polished = {u for u, c in self.curves_.items() if c.solver == "path"}
        points: list[PolishedPoint] = []
        phases: list[PhaseTime] = []
        device = module_device(self.model_)

        def polish(unit: str, k: int, mask: np.ndarray) -> tuple[np.ndarray, float, int]:
            with timed_phase(phases, "polish", device):
                return self._polish(unit, k, mask)

        def allocate_within(limits: dict[str, float]) -> Allocation:
            with timed_phase(phases, "allocation", device):
                if self.polish_time is None or self.output_errors_ is not None or not polished:
                    return solve(self.curves_, limits)
                # swap search at the chosen counts only, then the allocation re-checked with the new errors
                chosen, more = recheck_allocation(self.curves_, lambda curves: solve(curves, limits), polish,
                                                  polished, done=self.polished_)
                points.extend(more)
                return chosen

        def build(chosen: Allocation) -> PruneResult:
            result = self.apply(chosen, start=start, scores=scores, report_latency=False)
            phases.extend(result.phases[len(self.fit_phases_):])
            return result

        result = meet_counted_budgets(allocate_within, build, costs, budgets)
        warn_over_budget(result, budgets)
        timing = None
        if hasattr(self, "latency_"):
            with timed_phase(phases, "latency", device):
                timing = self._latency_report(result.model, dict(result.allocation.keep), budgets.get("latency"))
        return replace(result, prune_time=time.perf_counter() - start, latency=timing, polished=tuple(points),
                       phases=(*self.fit_phases_, *phases))

    def apply(self, chosen: Allocation, budgets: Mapping[str, float] | None = None, *,
              start: float | None = None, scores: Mapping[str, np.ndarray] | None = None,
              report_latency: bool = True) -> PruneResult:
        """The pruned copy of the fitted model for the keep counts of ``chosen`` (surgery and refit of
        :meth:`prune`, without the allocation): each unit keeps the curve's best channels for its count, or
        its top ``scores`` (checked by :meth:`prune`). ``budgets`` (absolute MACs / params / latency) only
        produce warnings and the latency report."""
        self._check_fitted()
        start = time.perf_counter() if start is None else start
        budgets = dict(budgets or {})
        masks = {u: self.curves_[u].mask_for(k) if scores is None or u not in scores else top_channels(scores[u], k)
                 for u, k in chosen.keep.items()}
        keep = {u: np.flatnonzero(m) for u, m in masks.items()}
        pruned_keep = {u.name: keep[u.name] for u in self.graph_.units if keep[u.name].size < u.n_channels}
        phases: list[PhaseTime] = list(getattr(self, "fit_phases_", ()))
        with timed_phase(phases, "refit", module_device(self.model_)):
            updates, refit = self._refit_updates(pruned_keep)
        plan = PruningPlan(pruned_keep, updates)
        with timed_phase(phases, "surgery", module_device(self.model_)):
            model = apply_pruning(self.model_, self.graph_, plan, self.example_inputs_)
            macs_after, params_after = count_macs_params(model, self.example_inputs_)
        report = tuple(self._report(u.name, int(keep[u.name].size),
                                    None if scores is None or u.name not in scores else masks[u.name])
                       for u in self.graph_.units)
        prune_time = time.perf_counter() - start
        timing = None
        if report_latency and hasattr(self, "latency_"):
            with timed_phase(phases, "latency", module_device(self.model_)):
                timing = self._latency_report(model, dict(chosen.keep), budgets.get("latency"))
        result = PruneResult(model=model, macs_before=self.macs_before_, macs_after=macs_after,
                             params_before=self.params_before_, params_after=params_after, report=report,
                             allocation=chosen, plan=plan, prune_time=prune_time, latency=timing, refit=refit,
                             phases=tuple(phases))
        warn_over_budget(result, budgets)
        return result


def warn_over_budget(result: PruneResult, budgets: Mapping[str, float]) -> None:
    """A ``RuntimeWarning`` for each MACs / params budget the counted pruned model exceeds (the cost model and
    torch-pruning's counter disagree)."""
    for name, budget in budgets.items():
        achieved = {"macs": result.macs_after, "params": result.params_after}.get(name)
        if achieved is not None and achieved > budget * (1 + 1e-9):
            warnings.warn(f"pruned model has {achieved:,} {name}, above the budget {budget:,.0f}.", RuntimeWarning,
                          stacklevel=3)


def prune(
    model: nn.Module,
    calibration: Iterable[Any],
    *,
    macs: float | None = None,
    params: float | None = None,
    latency: float | None = None,
    solver: str = "auto",
    executor: Executor | None = None,
    **options: Any,
) -> PruneResult:
    """Prune ``model`` to at most ``macs`` (and/or ``params``, ``latency``) of its original cost.

    Shorthand for ``Pruner(solver=..., executor=..., **options).fit(model, calibration).prune(...)``;
    the input model is left unchanged. The budgets are checked before any work.
    """
    check_budgets(macs, params, latency, "milp")
    return Pruner(solver=solver, executor=executor, **options).fit(model, calibration).prune(
        macs=macs, params=params, latency=latency)
