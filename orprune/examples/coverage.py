"""Coverage runs (issue 21): prune a network to a MACs target with orprune, check the result, and the same
target with torch-pruning's magnitude pruner, for ``tests/test_zoo_coverage.py`` and
``benchmarks/coverage.py``.
"""

from __future__ import annotations

import collections
import copy
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from orprune.examples.baselines import _pruned
from orprune.network.costs import count_macs_params
from orprune.network.surgery import masked_copy
from orprune.pipeline import Pruner

__all__ = ["CoverageRecord", "orprune_coverage", "torch_pruning_coverage"]


@dataclass(frozen=True)
class CoverageRecord:
    """One library on one network.

    Attributes
    ----------
    success : bool
        The target was met (or, for orprune, the best reachable MACs when the target is not).
    macs : float or None
        MACs of the result over the original's (None when nothing was produced).
    target : float
        The MACs fraction asked for: the requested one, or the best reachable one (orprune).
    time : float
        Seconds (orprune: fit + prune).
    reason : str
        Why the requested target was not reachable (the excluded groups), or the error.
    units : int
        Prunable units (orprune) / 0.
    excluded : int
        Channel groups left alone (orprune) / 0.
    max_abs_difference : float or None
        ``max |pruned(x) - masked(x)|`` over the largest ``|masked(x)|`` (orprune).
    shape_kept : bool
        The output shape is unchanged.
    input_unchanged : bool
        The input model's state is unchanged.
    """

    success: bool
    macs: float | None
    target: float
    time: float
    reason: str = ""
    units: int = 0
    excluded: int = 0
    max_abs_difference: float | None = None
    shape_kept: bool = True
    input_unchanged: bool = True


def _reasons(pruner: Pruner) -> str:
    counts = collections.Counter(e.reason.split(" (")[0][:80] for e in pruner.graph_.excluded)
    return "; ".join(f"{n}x {r}" for r, n in counts.most_common())


def orprune_coverage(model: nn.Module, batches: list[torch.Tensor], *, macs: float = 0.5,
                     solver: str = "greedy", positions_per_image: int = 8) -> CoverageRecord:
    """Prune ``model`` to ``macs`` (or the least reachable above it) and check the result."""
    state = copy.deepcopy(model.state_dict())
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            pruner = Pruner(solver=solver, progress=False, positions_per_image=positions_per_image).fit(model, batches)
    except ValueError as exc:
        return CoverageRecord(False, None, macs, time.perf_counter() - start, reason=str(exc)[:200])
    floor = pruner.costs_.evaluate({u: int(c.keep_counts.min()) for u, c in pruner.curves_.items()})["macs"]
    floor /= pruner.macs_before_
    target, reason = macs, ""
    if floor > macs:  # the best reachable, with the reason
        target, reason = min(1.0, floor * (1 + 1e-9)), _reasons(pruner)
    result = pruner.prune(macs=target)
    elapsed = time.perf_counter() - start
    x = batches[0]
    with torch.no_grad():
        pruned, masked, original = result.model(x), masked_copy(model, pruner.graph_, result.plan).eval()(x), model(x)
    difference = float((pruned - masked).abs().max() / masked.abs().max().clamp_min(1e-30))
    unchanged = all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    reached = result.macs_after / result.macs_before
    return CoverageRecord(reached <= target * (1 + 1e-9), reached, target, elapsed, reason, len(pruner.graph_.units),
                          len(pruner.graph_.excluded), difference, pruned.shape == original.shape, unchanged)


def _torch_pruning_at(model: nn.Module, example: torch.Tensor, macs: float, steps: int = 8) -> nn.Module:
    """The least-pruned uniform ratio meeting ``macs``: a grid over the ratio (torch-pruning skips layers a
    large ratio would empty, so the kept MACs are not monotone near 1), then bisection below the first
    grid ratio that meets it."""
    base = count_macs_params(model, example)[0]

    def kept(ratio: float) -> tuple[float, nn.Module]:
        pruned = _pruned(model, example, "magnitude", ratio, None)
        return count_macs_params(pruned, example)[0] / base, pruned

    low, best = 0.0, None
    for ratio in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        fraction, pruned = kept(ratio)
        if fraction <= macs:
            best, high = pruned, ratio
            break
        low = ratio
    if best is None:
        raise ValueError(f"no uniform ratio up to 0.9 reaches {macs:.3f} of the MACs")
    for _ in range(steps):
        mid = 0.5 * (low + high)
        fraction, pruned = kept(mid)
        if fraction <= macs:
            best, high = pruned, mid
        else:
            low = mid
    return best


def torch_pruning_coverage(model: nn.Module, batches: list[torch.Tensor], *, macs: float = 0.5) -> CoverageRecord:
    """torch-pruning's magnitude pruner (uniform ratio, classifier ignored) at ``macs``."""
    example = batches[0][:1]
    state = copy.deepcopy(model.state_dict())
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruned = _torch_pruning_at(model, example, macs)
    except Exception as exc:  # report, do not stop the table
        return CoverageRecord(False, None, macs, time.perf_counter() - start, reason=f"{type(exc).__name__}: "
                              f"{str(exc)[:160]}")
    elapsed = time.perf_counter() - start
    reached = count_macs_params(pruned, example)[0] / count_macs_params(model, example)[0]
    with torch.no_grad():
        shape_kept = pruned.eval()(batches[0]).shape == model(batches[0]).shape
    unchanged = all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    return CoverageRecord(reached <= macs, reached, macs, elapsed, shape_kept=shape_kept, input_unchanged=unchanged)
