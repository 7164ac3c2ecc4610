"""Build the candidate allocations of one budget, keep the one with the smallest measured output error.

The allocation MILP of :class:`orprune.MixedPruner` is exact for its objective, a sum of per-option errors
each measured with that option alone; the network's error after the surgery (sequential refits, residual
targets, interactions) is not that sum, and channel and rank options need not be mispriced alike
(``formulations/low_rank.md``, section 11). :func:`guarded_prune` therefore solves the MILP in each mode
(``"mixed"``, ``"channels"``, ``"factorize"``) at the same budgets, builds each distinct choice once, measures
every built model's output error on probe images (held out from the calibration when the caller gives them)
and returns the best, with the comparison. The MILP still decides *within* each mode; the probe decides
*between* the modes, on the quantity the MILP's objective stands for. With all three modes one more candidate,
``"calibrated"``, is the mixed MILP with the rank errors re-weighted by the exchange rate between the two kinds
of error that the pure candidates measured.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from orprune._pipeline_steps import batch_inputs
from orprune.budget.output_errors import probe_batches
from orprune.mixed import MODES, MixedPruner, MixedResult
from orprune.network.graph import call_model

__all__ = ["CALIBRATED", "METRICS", "Candidate", "GuardedResult", "guarded_prune", "probe_metrics"]

#: ``"output"``: ``sum ||f(x) - f_0(x)||^2 / sum ||f_0(x)||^2`` over the probe inputs (the quantity
#: ``errors="output"`` prices option by option); ``"disagreement"``: the fraction of probe inputs whose
#: top-1 class (argmax over dim 1) differs from the original model's, ties broken by ``"output"``. Neither
#: uses labels.
METRICS = ("output", "disagreement")

#: The mode name of the mixed allocation at the measured exchange rate between rank and channel errors.
CALIBRATED = "calibrated"


@dataclass(frozen=True)
class Candidate:
    """One built allocation of :func:`guarded_prune`.

    Attributes
    ----------
    modes : tuple of str
        The modes whose MILP chose this allocation (modes choosing the same keep counts and ranks share it;
        ``"calibrated"``: the mixed MILP at the measured exchange rate, see :func:`guarded_prune`).
    result : MixedResult
    output_error : float
        Relative squared output error on the probe inputs.
    disagreement : float
        Fraction of probe inputs whose top-1 output differs from the original model's (nan when the outputs
        have no class dimension).
    """

    modes: tuple[str, ...]
    result: MixedResult
    output_error: float
    disagreement: float

    def score(self, metric: str) -> tuple[float, float]:
        return (self.output_error, 0.0) if metric == "output" else (self.disagreement, self.output_error)


@dataclass(frozen=True)
class GuardedResult:
    """Outcome of :func:`guarded_prune`.

    Attributes
    ----------
    result : MixedResult
        The chosen candidate (smallest probe ``metric``).
    chosen : str
        Its first mode.
    candidates : tuple of Candidate
        Every distinct built allocation, in the order of ``modes``.
    metric : str
    probe_images : int
        Number of probe inputs measured.
    held_out : bool
        Whether the probe inputs were given (False: the first calibration batches, in-sample).
    rank_weight : float or None
        The exchange rate of the ``"calibrated"`` candidate (None: not built).
    """

    result: MixedResult
    chosen: str
    candidates: tuple[Candidate, ...]
    metric: str
    probe_images: int
    held_out: bool
    rank_weight: float | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.result.model

    def by_mode(self) -> dict[str, Candidate]:
        """Each mode's candidate (a shared one under each of its modes)."""
        return {mode: c for c in self.candidates for mode in c.modes}


def _outputs(model: torch.nn.Module, batches: Sequence[Any]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = [call_model(model.eval(), b) for b in batches]
    if not all(torch.is_tensor(o) for o in out):
        raise ValueError("the guard measures models whose output is one tensor per batch.")
    return [o.detach().double() for o in out]


def probe_metrics(outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> tuple[float, float]:
    """``(output_error, disagreement)`` of a model's probe outputs against the original model's (see METRICS)."""
    scale = sum(float(r.square().sum()) for r in reference)
    if not scale > 0:
        raise ValueError("the original model's output on the probe inputs is zero: no relative error.")
    error = sum(float((o - r).square().sum()) for o, r in zip(outputs, reference)) / scale
    if not all(r.ndim >= 2 and r.shape[1] > 1 for r in reference):
        return error, float("nan")
    differ = sum(int((o.argmax(1) != r.argmax(1)).sum()) for o, r in zip(outputs, reference))
    return error, differ / sum(r.argmax(1).numel() for r in reference)


def guarded_prune(fitted: MixedPruner, probe: Iterable[Any] | None = None, *, macs: float | None = None,
                  params: float | None = None, modes: Sequence[str] = MODES, metric: str = "output",
                  calibrate: bool = True, time_limit: float | None = None) -> GuardedResult:
    """The allocation of each of ``modes`` at the same budgets, built, measured on ``probe``; the best kept.

    Parameters
    ----------
    fitted : MixedPruner
        A fitted pruner (:meth:`orprune.MixedPruner.fit`).
    probe : iterable of batches, optional
        Inputs (tensors or (input, target) batches; targets are ignored) on which every candidate's output is
        compared with the original model's. Give images *not* in the calibration: the refits fit the
        calibration, so an in-sample probe favours the candidate that fits it best. None: the first
        ``probe_images`` calibration images (in-sample; ``held_out`` False).
    macs, params : float, optional
        Budgets as in :meth:`orprune.MixedPruner.prune`; every candidate meets them.
    modes : sequence of str, default ("mixed", "channels", "factorize")
        The candidates. Modes whose MILP chooses the same keep counts and ranks are built once.
    metric : {"output", "disagreement"}, default "output"
        What is minimised over the candidates (``METRICS``); both are reported.
    calibrate : bool, default True
        With all three modes: one more candidate, ``"calibrated"``, the mixed MILP with the rank errors
        multiplied by the exchange rate the two pure candidates measure, ``(err_f / obj_f) / (err_c / obj_c)``
        (probe output error per unit of the MILP's objective, factorization over channel pruning;
        ``rank_weight``), so that the two kinds of price are on the scale of the network's error.
    time_limit : float, optional
        Seconds per allocation MILP.

    Returns
    -------
    GuardedResult
        The chosen model has the smallest probe ``metric`` of the candidates: with the default modes, never a
        larger one than channel pruning alone or factorization alone at the same budget.
    """
    if not isinstance(fitted, MixedPruner):
        raise ValueError(f"`fitted` must be a fitted MixedPruner, got {type(fitted).__name__}.")
    fitted._check_fitted()
    if metric not in METRICS:
        raise ValueError(f"`metric` must be one of {METRICS}, got {metric!r}.")
    if not isinstance(calibrate, bool):
        raise ValueError(f"`calibrate` must be True or False, got {calibrate!r}.")
    if isinstance(modes, str) or not modes or any(m not in MODES for m in modes) or len(set(modes)) < len(modes):
        raise ValueError(f"`modes` must be distinct modes of {MODES}, got {modes!r}.")
    p = fitted.pruner_
    if probe is None:
        batches, held_out = probe_batches(p.batches_, p.probe_images), False
    else:
        if torch.is_tensor(probe):
            raise ValueError("`probe` must be an iterable of batches; wrap one tensor as [tensor].")
        batches, held_out = [batch_inputs(b) for b in probe], True
        if not batches:
            raise ValueError("`probe` is empty: the guard needs at least one batch of inputs.")
    reference = _outputs(p.model_, batches)
    candidates: list[Candidate] = []

    def add(mode: str, rank_weight: float = 1.0) -> None:
        keep, ranks, allocation, _ = fitted.choose(macs=macs, params=params, mode="mixed" if mode == CALIBRATED
                                                   else mode, time_limit=time_limit, rank_weight=rank_weight)
        for i, c in enumerate(candidates):  # the same allocation as an earlier mode: built once
            if dict(c.result.keep) == keep and dict(c.result.ranks) == ranks:
                candidates[i] = dataclasses.replace(c, modes=(*c.modes, mode))
                return
        built = fitted.apply(keep, ranks, allocation=allocation, mode=mode)
        error, differ = probe_metrics(_outputs(built.model, batches), reference)
        candidates.append(Candidate((mode,), built, error, differ))

    for mode in modes:
        add(mode)
    weight = None
    if calibrate and set(MODES) <= set(modes):
        pure = {m: c for c in candidates for m in c.modes}
        (obj_c, err_c), (obj_f, err_f) = ((pure[m].result.objective, pure[m].output_error)
                                          for m in ("channels", "factorize"))
        if min(obj_c, err_c, obj_f, err_f) > 0:
            weight = (err_f / obj_f) / (err_c / obj_c)  # measured output error per unit of summed error, ranks / units
            add(CALIBRATED, weight)
    if metric == "disagreement" and any(c.disagreement != c.disagreement for c in candidates):
        raise ValueError("`metric='disagreement'` needs outputs with a class dimension (dim 1).")
    best = min(candidates, key=lambda c: c.score(metric))  # first of equals: the earlier mode
    return GuardedResult(result=best.result, chosen=best.modes[0], candidates=tuple(candidates), metric=metric,
                         probe_images=sum(int(r.shape[0]) for r in reference), held_out=held_out, rank_weight=weight)
