"""Channel pruning and low-rank factorization offered together in one allocation (issue 23).

Per prunable unit, its keep counts (channel pruning, as :class:`orprune.Pruner`); per Linear / Conv2d layer,
its ranks (the layer becomes two thinner layers, :func:`orprune.factorize`) or "whole". A layer may be
factorized only if every unit that slices it (the unit it reads, the unit it writes) keeps its full width:
then every network cost is *linear* in the option labels and the allocation MILP (:func:`orprune.allocate`)
solves the joint choice exactly (``formulations/low_rank.md``, section 10). The surgery refits every changed
layer in forward order on inputs from the network with every earlier change made, targets from the original: a
pruned unit's consumers by least squares on the kept channels, a factorized layer by the closed form of its rank
(:mod:`orprune.mixed_surgery` when both kinds are present; otherwise :meth:`orprune.Pruner.apply`, then the
factorized layers).
"""

from __future__ import annotations

import dataclasses
import time
import types
import warnings
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from orprune._pipeline_steps import check_fraction, forward_order, resolve_ties
from orprune._refit import has_intercept
from orprune._status import FEASIBLE
from orprune.budget.allocation import Allocation, AllocationProblem, CostModel, TableCost, allocate
from orprune.budget.output_errors import probe_batches
from orprune.factorize import factorization_options, output_positions
from orprune.layer.low_rank import RankCurve, rank_curve, select_rank
from orprune.layer.problem import LayerProblem, StatisticsAccumulator
from orprune.mixed_surgery import joint_surgery
from orprune.network.calibration import collect_statistics
from orprune.network.costs import count_macs_params
from orprune.network.factorization import (
    LayerFactors,
    apply_factorization,
    factorizable_layers,
    following_norms,
    reconstructed_copy,
)
from orprune.network.graph import call_model, weight_matrix
from orprune.network.residual_targets import find_residual_targets
from orprune.pipeline import Pruner
from orprune.prune_result import PruneResult

__all__ = ["MODES", "MixedPruner", "MixedResult", "prune_and_factorize"]

#: ``"mixed"``: both kinds of options; ``"channels"``: every layer whole (channel pruning alone);
#: ``"factorize"``: every unit at full width (factorization alone). All three solve the same objective.
MODES = ("mixed", "channels", "factorize")


def rank_unit(layer: str) -> tuple[str, str]:
    """The allocation's key of a layer's rank options (distinct from every unit name, a string)."""
    return ("rank", layer)


@dataclass(frozen=True)
class MixedResult:
    """Outcome of :meth:`MixedPruner.prune`.

    Attributes
    ----------
    model : nn.Module
        The pruned and factorized copy.
    macs_before, macs_after, params_before, params_after : int
        As torch-pruning counts them (:func:`orprune.count_macs_params`).
    keep : mapping unit -> int
        Channels kept per unit.
    ranks : mapping layer -> int or None
        Rank of every layer offered factorization, None when kept whole.
    allocation : Allocation
        The MILP's certificate over units and rank options (``keep`` holds the rank options' MACs labels under
        the keys ``("rank", layer)``); ``costs["macs"]`` / ``costs["params"]`` are the model's counted costs.
    pruning : PruneResult
        The channel stage (its plan: kept channels and refitted consumers; in a real mix those refits saw the
        factorized layers before them, :func:`orprune.mixed_surgery.joint_refit`).
    factors : mapping layer -> LayerFactors
    mode : str
    prune_time : float
    """

    model: nn.Module
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    keep: Mapping[str, int]
    ranks: Mapping[str, int | None]
    allocation: Allocation
    pruning: PruneResult
    factors: Mapping[str, LayerFactors]
    mode: str
    prune_time: float

    @property
    def objective(self) -> float:
        """The allocation's summed relative errors (channel curves and rank curves)."""
        return self.allocation.objective


class MixedPruner:
    """Channel pruning and factorization in one allocation: curves once (:meth:`fit`), any budget (:meth:`prune`).

    Parameters
    ----------
    max_ranks : int, default 32
        Rank options per layer (a grid of the ranks that save MACs, and the whole layer).
    min_rank : int, default 1
    **options
        Passed to :class:`orprune.Pruner`: the channel curves, the ridge, ``errors`` (``"output"``: units and
        ranks are both priced by the network's relative output error with the unit / layer alone changed),
        the positions, ``ignored_layers`` (also never factorized), ``max_features`` (wider layers are not
        factorized either), ``sequential`` / ``residual_targets`` (also for the factorized layers' refit).

    Attributes
    ----------
    pruner_ : Pruner
        The fitted channel pruner.
    curves_ : dict layer -> RankCurve
        Certified rank curves of the layers offered factorization.
    rank_output_errors_ : dict layer -> array or None
        With ``errors="output"``: each layer's relative output error at each rank option (whole last, 0).
    rank_options_ : dict layer -> (ranks, macs)
        Each layer's rank options (``-1``: whole, last) and their MACs labels.
    touching_ : dict layer -> tuple of str
        The units that slice each layer: they must keep their full width when it is factorized.
    """

    def __init__(self, *, max_ranks: int = 32, min_rank: int = 1, **options: Any) -> None:
        for name, value in (("max_ranks", max_ranks), ("min_rank", min_rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        self.max_ranks, self.min_rank, self.options = max_ranks, min_rank, options

    def fit(self, model: nn.Module, calibration: Iterable[Any]) -> MixedPruner:
        """Channel curves (:meth:`orprune.Pruner.fit`) and every factorizable layer's rank curve."""
        p = self.pruner_ = Pruner(**self.options).fit(model, calibration)
        original, example = p.model_, p.example_inputs_
        names = factorizable_layers(original, p.ignored_layers)
        positions = output_positions(original, names, example)
        names = [n for n in names if n in positions and weight_matrix(original.get_submodule(n)).shape[0]
                 <= p.max_features]
        self.norms_ = following_norms(original, example, names)
        consumers = {c.name: c for c in p.graph_.consumers}
        self.intercepts_ = {n: has_intercept(consumers[n], original) if n in consumers
                            else (original.get_submodule(n).bias is not None or n in self.norms_) for n in names}
        missing = [n for n in names if n not in p.problems_]
        stats = collect_statistics(original, missing, p.batches_, positions_per_image=p.positions_per_image,
                                   seed=p.seed, progress=False) if missing else {}
        self.statistics_ = {**{n: p.statistics_[n] for n in names if n in p.statistics_}, **stats}
        problems = {n: p.problems_[n] if n in p.problems_ else self._problem(n, stats[n]) for n in names}
        self.curves_: dict[str, RankCurve] = {}
        self.rank_options_: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.positions_ = positions
        for n in names:
            prob = problems[n]
            ranks, labels = factorization_options(prob.n_features, prob.n_outputs, positions[n], self.max_ranks,
                                                  self.min_rank)
            if ranks.size > 1:  # some rank saves MACs
                self.curves_[n], self.rank_options_[n] = rank_curve(prob), (ranks, labels)
        self.problems_ = {n: problems[n] for n in self.curves_}
        self.rank_output_errors_ = self._rank_output_errors() if p.errors == "output" else None
        self.touching_ = {n: tuple(sorted({c.unit for c in p.graph_.consumers if c.name == n}
                                          | {u.name for u in p.graph_.units if u.root == n or n in u.carried}))
                          for n in self.curves_}
        return self

    def _rank_output_errors(self) -> dict[str, np.ndarray]:
        """Each layer's relative output error at each of its ranks, the layer alone factorized (original
        statistics' optimal map and bias), on the pruner's probe images; 0 for "whole" (last)."""
        p = self.pruner_
        probe = probe_batches(p.batches_, p.probe_images)
        with torch.no_grad():
            reference = [call_model(p.model_, b).double() for b in probe]
        scale = sum(float((r**2).sum()) for r in reference)
        out = {}
        for n, (ranks, _) in tqdm(self.rank_options_.items(), desc="rank output errors", disable=not p.progress,
                                  leave=False):
            errs = np.zeros(ranks.size)
            for i, r in enumerate(ranks[:-1]):
                one = reconstructed_copy(p.model_, {n: self._layer_factors(n, p.model_, self.statistics_[n],
                                                                          self.problems_[n], int(r))}, self.norms_)
                with torch.no_grad():
                    errs[i] = sum(float(((call_model(one, b).double() - ref) ** 2).sum())
                                  for b, ref in zip(probe, reference)) / scale
            out[n] = errs
        return out

    def _layer_factors(self, name: str, base: nn.Module, acc: StatisticsAccumulator, prob: LayerProblem,
                       rank: int) -> LayerFactors:
        """The optimal rank-``rank`` factors of ``prob`` and, with an intercept, the compensated bias."""
        sel = select_rank(prob, rank)
        bias = None
        if self.intercepts_[name]:
            mean_x, mean_y = acc.means()
            module = base.get_submodule(name)
            old = module.bias.detach().double().numpy() if module.bias is not None else 0.0
            bias = old + mean_y - mean_x @ sel.weights
        return LayerFactors(sel.left, sel.right, bias)

    def _problem(self, name: str, acc: StatisticsAccumulator) -> LayerProblem:
        """A layer's problem built as the pruner builds a consumer's (centred when it has an intercept)."""
        gram, cross, yy = acc.statistics(center=self.intercepts_[name])
        scale = float(np.mean(np.diag(gram)))
        return LayerProblem(gram, cross, yy, ridge=self.pruner_.ridge * (scale if scale > 0 else 1.0),
                            assume_psd=True)

    # ------------------------------------------------------------------ the allocation
    def allocation_problem(self, mode: str = "mixed", rank_weight: float = 1.0) -> tuple[AllocationProblem,
                                                                                         dict[str, Any]]:
        """The MILP's data: options and errors of units and rank units, and the costs (MACs, params, links).

        Rank unit ``("rank", layer)`` has the options labelled by their MACs (whole last, error 0), its errors
        multiplied by ``rank_weight`` (the exchange rate between rank and channel errors, 1: as measured). Each
        link ``"link:<layer>|<unit>"`` is a :class:`~orprune.network.cost_model.TableCost` with budget 1:
        ``[layer factorized] + [unit below full width] <= 1``.
        """
        self._check_fitted()
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
        if isinstance(rank_weight, bool) or not isinstance(rank_weight, (int, float)) or not 0 < rank_weight < np.inf:
            raise ValueError(f"`rank_weight` must be a positive finite number, got {rank_weight!r}.")
        p = self.pruner_
        options: dict[Hashable, np.ndarray] = {}
        errors: dict[Hashable, np.ndarray] = {}
        for u, curve in p.curves_.items():
            sl = slice(-1, None) if mode == "factorize" else slice(None)
            unit_errors = curve.errors if p.output_errors_ is None else p.output_errors_[u]
            options[u], errors[u] = curve.keep_counts[sl], unit_errors[sl]
        macs_shift = params_shift = 0.0
        macs_lin, params_lin = dict(p.costs_.macs.linear), dict(p.costs_.params.linear)
        for n, (ranks, labels) in self.rank_options_.items():
            key, whole = rank_unit(n), float(labels[-1])
            errs = (np.r_[self.curves_[n].relative_errors[ranks[:-1]], 0.0] if self.rank_output_errors_ is None
                    else self.rank_output_errors_[n])
            sl = slice(-1, None) if mode == "channels" else slice(None)
            options[key], errors[key] = labels[sl], rank_weight * errs[sl]
            macs_lin[key], macs_shift = 1.0, macs_shift + whole  # MACs of the option replace the whole layer's
            params_lin[key], params_shift = 1.0 / self.positions_[n], params_shift + whole / self.positions_[n]
        costs: dict[str, Any] = {
            "macs": CostModel(p.costs_.macs.constant - macs_shift, macs_lin, dict(p.costs_.macs.bilinear)),
            "params": CostModel(p.costs_.params.constant - params_shift, params_lin, dict(p.costs_.params.bilinear)),
        }
        if mode == "mixed":
            for n, units in self.touching_.items():
                key = rank_unit(n)
                for u in units:
                    full = p.graph_[u].n_channels
                    costs[f"link:{n}|{u}"] = TableCost(
                        options={key: options[key], u: options[u]},
                        unary={key: (options[key] != options[key][-1]).astype(float),
                               u: (options[u] != full).astype(float)})
        # a chunk's balance ties keep counts (a ShuffleNetV2 stage's units): those chains hold here too
        return AllocationProblem(options=options, errors=errors, ties=resolve_ties(None, p.graph_)), costs

    def prune(self, *, macs: float | None = None, params: float | None = None, mode: str = "mixed",
              time_limit: float | None = None) -> MixedResult:
        """A pruned and factorized copy of the fitted model within the budgets.

        Parameters
        ----------
        macs, params : float, optional
            Fractions of the original MACs / parameters to keep at most, in (0, 1]. At least one.
        mode : {"mixed", "channels", "factorize"}, default "mixed"
            ``"channels"`` / ``"factorize"`` restrict the same MILP to one kind of option.
        time_limit : float, optional
            Seconds for the allocation MILP.
        """
        start = time.perf_counter()
        keep, ranks, chosen, budgets = self.choose(macs=macs, params=params, mode=mode, time_limit=time_limit)
        result = self.apply(keep, ranks, allocation=chosen, mode=mode)
        for what in ("macs", "params"):
            achieved = getattr(result, f"{what}_after")
            if what in budgets and achieved > budgets[what] * (1 + 1e-9):
                warnings.warn(f"pruned and factorized model has {achieved:,} {what}, above the budget "
                              f"{budgets[what]:,.0f}.", RuntimeWarning, stacklevel=2)
        return dataclasses.replace(result, prune_time=time.perf_counter() - start)

    def choose(self, *, macs: float | None = None, params: float | None = None, mode: str = "mixed",
               time_limit: float | None = None, rank_weight: float = 1.0) -> tuple[
                   dict[str, int], dict[str, int | None], Allocation, dict[str, float]]:
        """The allocation of :meth:`prune` without the surgery: ``(keep, ranks, allocation, budgets)``.

        ``rank_weight`` multiplies the rank errors (:meth:`allocation_problem`)."""
        self._check_fitted()
        macs, params = check_fraction(macs, "macs"), check_fraction(params, "params")
        if macs is None and params is None:
            raise ValueError("give a budget: `macs` and/or `params` as a fraction in (0, 1].")
        p = self.pruner_
        problem, costs = self.allocation_problem(mode, rank_weight)
        full = p.costs_.evaluate()
        budgets = {name: f * full[name] for name, f in (("macs", macs), ("params", params)) if f is not None}
        budgets.update({name: 1.0 for name in costs if name.startswith("link:")})
        try:
            chosen = allocate(problem, costs=costs, budgets=budgets, time_limit=time_limit)
        except ValueError as exc:
            raise ValueError(f"the budget cannot be met by pruning and factorizing: {exc}") from exc
        keep = {u: int(chosen.keep[u]) for u in p.curves_}
        ranks: dict[str, int | None] = {}
        for n, (options, labels) in self.rank_options_.items():
            r = int(options[np.flatnonzero(labels == chosen.keep[rank_unit(n)])[0]])
            ranks[n] = None if r < 0 else r
        return keep, ranks, chosen, budgets

    def labels(self, ranks: Mapping[str, int | None]) -> dict[tuple[str, str], int]:
        """The rank units' option labels (MACs) of ``ranks`` (layer -> rank or None; missing layers whole)."""
        self._check_fitted()
        out = {}
        for n, (options, labels) in self.rank_options_.items():
            r = ranks.get(n)
            hit = np.flatnonzero(options == (-1 if r is None else r))
            if hit.size != 1:
                raise ValueError(f"`ranks[{n!r}]` = {r!r} is not one of the layer's rank options {options[:-1]}.")
            out[rank_unit(n)] = int(labels[hit[0]])
        return out

    def apply(self, keep: Mapping[str, int], ranks: Mapping[str, int | None], *, allocation: Allocation | None = None,
              mode: str = "mixed") -> MixedResult:
        """The model for given keep counts and ranks (the surgery of :meth:`prune`, without the allocation).

        ``keep``: unit -> count (one of its curve's counts; missing units keep all); ``ranks``: layer -> rank or
        None (one of its options; missing layers whole). A factorized layer's units must keep their full width.
        """
        self._check_fitted()
        start = time.perf_counter()
        p = self.pruner_
        keep = {u: int(keep.get(u, p.graph_[u].n_channels)) for u in p.curves_}
        labels = self.labels(ranks)  # checks the ranks
        ranks = {n: ranks.get(n) for n in self.rank_options_}
        for n, r in ranks.items():
            narrow = [u for u in self.touching_[n] if keep[u] < p.graph_[u].n_channels]
            if r is not None and narrow:
                raise ValueError(f"layer {n!r} is factorized but the units {narrow} that slice it are pruned.")
        if allocation is None:
            problem, costs = self.allocation_problem("mixed")
            choice = {**keep, **labels}
            allocation = Allocation(keep=types.MappingProxyType(choice), objective=problem.objective(choice),
                                    bound=-np.inf, gap=np.inf, status=FEASIBLE,
                                    costs=types.MappingProxyType({k: c.evaluate(choice) for k, c in costs.items()}),
                                    solve_time=0.0, message="given keep counts and ranks", formulation="none")
        channel_part = dataclasses.replace(allocation, keep=types.MappingProxyType(keep))
        factored = {n: r for n, r in ranks.items() if r is not None}
        if p.sequential and factored and any(k < p.graph_[u].n_channels for u, k in keep.items()):
            pruning, factors = joint_surgery(self, channel_part, factored)  # a real mix: one forward-order refit
        else:
            pruning = p.apply(channel_part)
            factors = self._factorize(pruning.model, factored)
        model = apply_factorization(pruning.model, factors, self.norms_)
        macs_after, params_after = count_macs_params(model, p.example_inputs_)
        return MixedResult(model=model, macs_before=p.macs_before_, macs_after=macs_after,
                           params_before=p.params_before_, params_after=params_after,
                           keep=types.MappingProxyType(keep), ranks=types.MappingProxyType(ranks),
                           allocation=allocation, pruning=pruning, factors=types.MappingProxyType(factors), mode=mode,
                           prune_time=time.perf_counter() - start)

    def _factorize(self, base: nn.Module, ranks: Mapping[str, int]) -> dict[str, LayerFactors]:
        """Factors of the chosen layers of the channel-pruned ``base``, refitted in forward order."""
        p = self.pruner_
        original, example = p.model_, p.example_inputs_
        order = [c.name for c in forward_order(original, [types.SimpleNamespace(name=n) for n in ranks], example)]
        found = (find_residual_targets(original, order, example) if p.sequential and p.residual_targets and order
                 else {})
        factors: dict[str, LayerFactors] = {}
        for n in tqdm(order, desc="factorize", disable=not p.progress, leave=False):
            if p.sequential:
                working = apply_factorization(base, factors, self.norms_)
                offsets = {n: found[n].offset(original)} if n in found else None
                acc = collect_statistics(working, [n], p.batches_, reference=original, offsets=offsets,
                                         positions_per_image=p.positions_per_image, seed=p.seed, progress=False)[n]
                prob = self._problem(n, acc)
            else:
                acc, prob = self.statistics_[n], self.problems_[n]
            factors[n] = self._layer_factors(n, base, acc, prob, ranks[n])
        return factors

    def _check_fitted(self) -> None:
        if not hasattr(self, "curves_"):
            raise RuntimeError("this MixedPruner is not fitted yet; call `fit(model, calibration)` first.")


def prune_and_factorize(model: nn.Module, calibration: Iterable[Any], *, macs: float | None = None,
                        params: float | None = None, mode: str = "mixed", **options: Any) -> MixedResult:
    """Prune channels and factorize layers of ``model`` in one allocation, within ``macs`` / ``params``.

    Shorthand for ``MixedPruner(**options).fit(model, calibration).prune(macs=..., params=..., mode=...)``;
    the budgets and ``mode`` are checked before any work.
    """
    check_fraction(macs, "macs"), check_fraction(params, "params")
    if macs is None and params is None:
        raise ValueError("give a budget: `macs` and/or `params` as a fraction in (0, 1].")
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
    return MixedPruner(**options).fit(model, calibration).prune(macs=macs, params=params, mode=mode)
