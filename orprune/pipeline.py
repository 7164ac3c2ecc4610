"""From a torch model to a smaller torch model (design.md, section 3).

1. Trace the model once: prunable channel groups (units) and their consumer layers.
2. Stream calibration batches once: each consumer's least-squares statistics.
3. Per unit, an error curve: the best reconstruction error for each keep count (independent
   problems, solved through any ``concurrent.futures.Executor``; :mod:`orprune._unit_curves`).
4. Per budget, a MILP chooses one keep count per unit under MACs / params budgets
   (:mod:`orprune._allocation_steps`).
5. Surgery: remove the channels, write least-squares weights and compensated biases
   (:mod:`orprune._pruned_model`).

Steps 1-3 are :meth:`Pruner.fit`; steps 4-5 are :meth:`Pruner.prune`, so many budgets come from
one set of curves.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from orprune._allocation_steps import prune_within_budgets
from orprune._latency_loop import check_latency_loop, latency_inputs, latency_report, prune_to_measured_latency
from orprune._phases import PhaseTime, module_device, timed_phase
from orprune._pipeline_steps import (
    calibration_batches,
    check_budgets,
    check_scores,
    forward_order,
    one_thread_worker,
    parallel_jobs,
    resolve_ties,
)
from orprune._pool import interruptible_pool
from orprune._pruned_model import apply_allocation, pruner_refit, unit_report
from orprune._pruner_options import check_pruner_options
from orprune._refit import consumer_problem, consumer_update
from orprune._unit_curves import unit_curves, unit_problems
from orprune.budget.allocation import Allocation
from orprune.budget.output_errors import output_error_curves, probe_batches
from orprune.layer.problem import LayerProblem, StatisticsAccumulator
from orprune.network.calibration import DEFAULT_POSITIONS_PER_IMAGE, TargetCache, collect_statistics
from orprune.network.costs import count_macs_params, network_costs
from orprune.network.graph import DEFAULT_MAX_FEATURES, Consumer, find_groups
from orprune.network.latency import LatencyModel, latency_tables
from orprune.network.residual_targets import ResidualTarget, find_residual_targets
from orprune.network.surgery import ConsumerUpdate
from orprune.prune_result import LatencyReport, PruneResult, RefitReport, UnitReport

__all__ = ["Pruner", "PruneResult", "UnitReport", "prune"]

#: Default ``refit_memory`` of :class:`Pruner`: 2 GiB of activations held by the streamed refit (ResNet-50, 512 images
#: of 224x224: 2.1 GB held instead of 3.1, refit 146 s instead of 138 s, ``benchmarks/results/scale_network_224.md``).
DEFAULT_REFIT_MEMORY = 2 * 2**30


class Pruner:
    """Channel pruner: error curves once (:meth:`fit`), any number of budgets (:meth:`prune`).

    The options are checked when :meth:`fit` starts. The README shows typical use; the entries below name the
    code, derivation (``formulations/``) or measurement behind each option.

    Parameters
    ----------
    solver : str, default "auto"
        Layer solver for the curves: ``"auto"`` certifies small units with ``"exact"``, uses ``"path"`` on wide
        ones and ``"greedy"`` between (:func:`orprune.layer.selection.resolve_solver`); any name of
        :func:`orprune.available_solvers` forces one.
    ridge : float, default 1e-4
        Ridge of each consumer's least squares, relative to the mean diagonal of its Gram matrix.
    positions_per_image : int or None, default 32
        Sampled spatial positions per image for conv consumers (None: all).
    max_options : int, default 32
        Keep counts per unit offered to the allocation (a grid for wider units).
    errors : {"layer", "output"}, default "layer"
        What the allocation MILP sums: each unit's reconstruction error relative to its own output, or its error
        of the network's output when it alone is pruned (``output_errors_``, measured in :meth:`fit`;
        ``formulations/global_allocation.md``, section 4c).
    probe_images : int, default 512
        Calibration images (the first batches) on which ``errors="output"`` is measured.
    min_channels : int, default 1
        Fewest channels a unit may keep.
    round_to : int, default 1
        Keep counts are multiples of this or the full width: kernels run multiples of their vector width faster
        (8 with AVX2; :func:`orprune._pipeline_steps.keep_options`).
    ignored_layers : iterable of nn.Module or str, default ()
        Left untouched, with everything coupled to them.
    max_features : int, default 4608 (``DEFAULT_MAX_FEATURES``)
        Consumers whose design matrix has more columns select channels on ``max_features // C`` compressed
        columns per channel and are refitted exactly (``formulations/wide_consumers.md``).
    residual : bool, default True
        Also prune residual streams (channels tied through adds), see :func:`orprune.find_groups`.
    sequential : bool, default True
        Refit each unit's consumers on inputs from the already pruned network (targets from the original), which
        avoids error accumulation; False refits on the original inputs.
    cache_targets : bool, default True
        In sequential mode, keep the original model's sampled consumer outputs from :meth:`fit` (``TargetCache``)
        so that each refit runs only the pruned model; False saves that memory and runs both models.
    residual_targets : bool, default True
        In sequential mode, refit a consumer whose output is added to a residual stream to reproduce the
        original *sum* (``formulations/least_squares_reconstruction.md``, section 6; needs ``torch.fx``).
    executor : concurrent.futures.Executor, optional
        Solves the units' curves in parallel (a process pool, ``dask.distributed``'s ``Client.get_executor()``).
    n_jobs : int, optional
        Without ``executor``: solve the curves in a pool of this many one-thread processes (spawned: scripts need
        the ``if __name__ == "__main__":`` guard); 1: serial. None: a pool when the curves' estimated serial time
        exceeds ``AUTO_POOL_SECONDS`` and workers can be spawned (:func:`orprune._pipeline_steps.parallel_jobs`),
        else serial; ``n_jobs_used_`` says what ran. Ctrl-C stops the workers at once.
    time_limit : float or None, default 1.0
        Seconds per exact solve inside the curves. Past it a curve keeps the best mask found (its greedy / swap
        start is already optimal at most counts, ``benchmarks/results/heuristic_curves.md``) with its proven
        bound and gap: a short limit costs certificates, not accuracy. None or ``inf``: no limit.
    polish_time : float or None, default 2.0
        Seconds of swap search per keep count :meth:`prune` picks for a ``"path"`` unit, the allocation re-solved
        until no chosen point improves (``formulations/swap_polish.md``). None: no polishing; none with
        ``errors="output"``.
    float32_statistics : bool, default False
        Each batch's ``X^T X`` and ``X^T Y`` in float32 on the model's device, summed and solved in float64
        (:func:`orprune.network.calibration.collect_statistics`): faster, within
        ``StatisticsAccumulator.FLOAT32_RTOL``.
    refit_memory : float or None, default 2 GiB (``DEFAULT_REFIT_MEMORY``)
        Bytes of activations the sequential refit may hold: one streamed pass refits every consumer
        (:mod:`orprune.network.streaming`), recomputing batches from checkpoints beyond the limit; 0, or a model
        fx cannot stream, gets one pass per consumer. None: no limit. Every path gives the same updates;
        ``PruneResult.refit`` says which ran (``formulations/least_squares_reconstruction.md``).
    progress : bool, default True
        Show progress bars.
    seed : int, default 0
        Seed of the sampled calibration positions (statistics and refit).

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
        batches = calibration_batches(model, calibration)
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
        """Each layer's problem, each unit's combined problem and its error curve (:mod:`orprune._unit_curves`)."""
        layers = list({c.name: c for c in reversed(self.graph_.consumers)}.values())[::-1]  # one per layer
        self.consumer_order_ = forward_order(self.model_, layers, self.example_inputs_)
        self.problems_ = {}
        for c in layers:  # each accumulator's matrices are freed once its problem holds them (means stay)
            self.problems_[c.name] = self._problem(stats[c.name], c, self.model_)
            stats[c.name].release()
        self.unit_problems_: dict[str, LayerProblem] = unit_problems(self.graph_, self.problems_)
        self.curves_ = unit_curves(self.graph_, self.unit_problems_, self._mapper, solver=self.solver,
                                   max_options=self.max_options, min_channels=self.min_channels,
                                   round_to=self.round_to, time_limit=self.time_limit, progress=self.progress)
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
        return pruner_refit(self, pruned_keep)

    def _report(self, unit: str, k: int, mask: np.ndarray | None = None) -> UnitReport:
        """The curve's entry at ``k`` (``+swap`` when polished there); with a ``mask`` of given scores, that
        mask's own error."""
        return unit_report(self, unit, k, mask)

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
        return prune_within_budgets(self, macs, params, latency, ties=tied, allocation=allocation,
                                    time_limit=time_limit, scores=scores)

    def apply(self, chosen: Allocation, budgets: Mapping[str, float] | None = None, *,
              start: float | None = None, scores: Mapping[str, np.ndarray] | None = None,
              report_latency: bool = True) -> PruneResult:
        """The pruned copy of the fitted model for the keep counts of ``chosen`` (surgery and refit of
        :meth:`prune`, without the allocation): each unit keeps the curve's best channels for its count, or
        its top ``scores`` (checked by :meth:`prune`). ``budgets`` (absolute MACs / params / latency) only
        produce warnings and the latency report."""
        self._check_fitted()
        return apply_allocation(self, chosen, budgets, start=start, scores=scores, report_latency=report_latency)


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
