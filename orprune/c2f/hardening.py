"""From learned soft gates to hard masks meeting the entry budget exactly, through the hierarchical MIP.

Two steps (``formulations/coarse_to_fine.md``, section 4):

1. the budget ``K = round(target * N)`` is split over the layers in proportion to their soft kept counts
   (largest remainders, capped at each layer's size), so the split sums to ``K`` exactly; each layer keeps
   the channels whose group gate is at least 1/2, raised to the fewest that can hold its entries;
2. each layer's mask is :func:`orprune.select_hierarchical` with those two counts, on the learned scores
   (an identity-Gram problem whose error is the score energy removed) or on calibration data
   (a :class:`orprune.LayerProblem`), then topped up to exactly ``K_l`` entries inside the kept channels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from orprune._status import FEASIBLE, OPTIMAL, SOLUTION_PRESENT
from orprune.layer.hierarchical import select_hierarchical
from orprune.layer.nm import nm_refit
from orprune.layer.problem import LayerProblem

__all__ = ["GatingMasks", "harden_layer", "score_problem", "split_budget"]


@dataclass(frozen=True)
class GatingMasks:
    """Hard coarse-to-fine masks of every gated layer.

    Attributes
    ----------
    masks : dict of str to ndarray of bool
        Per layer, the kept weights, shape of the layer's weight.
    groups : dict of str to ndarray of bool
        Per layer, the kept input channels; every kept weight lies in a kept channel.
    entries, n_groups : dict of str to int
        Per layer, the kept weights ``K_l`` and kept channels ``k_l``.
    kept, total : int
        Kept weights over all gated layers (``round(target * total)`` exactly) and their number.
    target : float
    status : str
        ``"optimal"`` when every layer's selection was solved exactly, else ``"feasible"``.
    solver, source : str
        The :func:`~orprune.select_hierarchical` solver, and ``"scores"`` or ``"data"``.
    solve_time : float
    weights : dict of str to ndarray
        With ``source="data"``: per layer the least-squares weights of the mask (the weight's shape).
    """

    masks: dict[str, np.ndarray]
    groups: dict[str, np.ndarray]
    entries: dict[str, int]
    n_groups: dict[str, int]
    kept: int
    total: int
    target: float
    status: str
    solver: str
    source: str
    solve_time: float
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for table in (self.masks, self.groups, self.weights):
            for array in table.values():
                array.flags.writeable = False

    @property
    def success(self) -> bool:
        return self.status in SOLUTION_PRESENT

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.total


def split_budget(total: int, weights: np.ndarray, capacities: np.ndarray) -> np.ndarray:
    """Integers ``n_l <= capacities[l]`` summing to ``total``, proportional to ``weights`` (largest remainders).

    Layers whose proportional share exceeds their capacity get their capacity and the rest is shared again.
    """
    weights = np.asarray(weights, float)
    capacities = np.asarray(capacities, int)
    if not 0 <= total <= capacities.sum():
        raise ValueError(f"`total` must lie in [0, {capacities.sum()}], got {total}.")
    if np.any(weights < 0) or not np.all(np.isfinite(weights)):
        raise ValueError("`weights` must be finite and >= 0.")
    if weights.sum() <= 0:
        weights = capacities.astype(float)
    out = np.zeros(len(capacities), int)
    free = capacities > 0
    remaining = total
    while True:  # cap the layers whose share exceeds their capacity, then share the rest again
        w = np.where(free, weights, 0.0)
        if w.sum() <= 0:
            w = np.where(free, capacities, 0).astype(float)
        share = remaining * w / w.sum() if w.sum() > 0 else np.zeros_like(w)
        over = free & (share >= capacities)
        if not over.any():
            break
        out[over] = capacities[over]
        remaining -= int(capacities[over].sum())
        free &= ~over
    base = np.floor(share).astype(int)
    base[~free] = 0
    short = remaining - int(base.sum())
    order = np.argsort(-(share - base), kind="stable")
    for index in order:  # at most one extra each; free layers have share < capacity, so base + 1 <= capacity
        if short == 0:
            break
        if free[index]:
            base[index] += 1
            short -= 1
    out[free] = base[free]
    return out


def score_problem(scores: np.ndarray, group_size: int) -> LayerProblem:
    """The identity-Gram problem whose error is the removed score energy ``sum_{ij not kept} s_ij^2``.

    With ``G = I``, ``B = S`` and ``yy = ||S||^2`` the least-squares error of a mask is ``||S||^2 - sum of the kept
    s_ij^2``, so :func:`~orprune.select_hierarchical` keeps the channels and entries of largest learned score.
    """
    scores = np.asarray(scores, float)
    yy = float(np.sum(scores**2))
    return LayerProblem(np.eye(scores.shape[0]), scores, yy * (1 + 1e-12) + 1e-300, group_size=group_size,
                        assume_psd=True)


def harden_layer(
    scores: np.ndarray,
    n_groups: int,
    n_entries: int,
    group_size: int,
    *,
    problem: LayerProblem | None = None,
    solver: str = "greedy",
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, str]:
    """One layer's hard mask in the ``(C*g, outputs)`` layout, with exactly ``n_entries`` kept weights.

    Returns ``(mask, groups, weights, status)``; ``weights`` are the least-squares weights of the final mask when
    ``problem`` is given, else ``None``.
    """
    channels = scores.shape[0] // group_size
    if n_entries == 0:
        return np.zeros(scores.shape, bool), np.zeros(channels, bool), (np.zeros(scores.shape) if problem else None), \
            OPTIMAL
    prob = problem if problem is not None else score_problem(scores, group_size)
    result = select_hierarchical(prob, n_groups, n_entries, solver=solver)
    mask, groups = result.mask.copy(), result.groups.copy()
    missing = n_entries - int(mask.sum())
    if missing > 0:  # entries of zero gain: top up inside the kept channels by learned score
        allowed = np.repeat(groups, group_size)[:, None] & ~mask
        candidates = np.flatnonzero(allowed.ravel())
        best = candidates[np.argsort(-np.abs(scores).ravel()[candidates], kind="stable")[:missing]]
        mask.ravel()[best] = True
    weights = None
    if problem is not None:
        weights = nm_refit(problem, mask)[0]
    status = result.status if missing <= 0 else FEASIBLE
    return mask, groups, weights, status


def weight_layout(weight: np.ndarray) -> np.ndarray:
    """``(out, in, *kernel)`` -> ``(in * prod(kernel), out)``: the feature rows of :class:`orprune.LayerProblem`."""
    return weight.reshape(weight.shape[0], -1).T


def from_layout(matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`weight_layout`."""
    return matrix.T.reshape(shape)


def group_counts(group_gates: np.ndarray, entries: int, per_group: int) -> int:
    """Channels with gate >= 1/2, raised to the fewest that hold ``entries`` weights (0 when nothing is kept)."""
    if entries == 0:
        return 0
    return int(min(len(group_gates), max(int(np.sum(group_gates >= 0.5)), math.ceil(entries / per_group))))
