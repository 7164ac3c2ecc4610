"""Channel selection with some channels always kept: the fixed columns eliminated by a Schur complement.

A consumer that reads a concatenation ``[a, b]`` has one design matrix over every input channel; when
only the channels of ``b`` are being selected, those of ``a`` are kept whatever the selection. Writing
``F`` for the fixed features, ``T`` for the kept free ones and ``H = G + r I``,

.. math::

    f(F \\cup T) = \\min_{W_F, W_T} \\|Y - X_F W_F - X_T W_T\\|_F^2 + r\\|W_F\\|_F^2 + r\\|W_T\\|_F^2

and minimising over ``W_F`` in closed form (``W_F = H_{FF}^{-1}(B_F - H_{FT} W_T)``) leaves a problem of
the same form over the free channels only, with

.. math::

    G' = G_{SS} - H_{SF} H_{FF}^{-1} H_{FS},\\quad B' = B_S - H_{SF} H_{FF}^{-1} B_F,\\quad
    y' = \\|Y\\|^2 - \\operatorname{tr}(B_F^T H_{FF}^{-1} B_F)

and the same ridge ``r``, so that ``f'(T) = f(F \\cup T)`` for every ``T``: every solver, exact or
heuristic, solves the fixed-columns problem by solving ``f'`` (``formulations/fixed_columns.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import scipy.linalg

from orprune._validation import channel_mask, check_integer
from orprune.layer.problem import LayerProblem
from orprune.layer.result import Selection, relative_gap
from orprune.layer.selection import select

__all__ = ["FixedChannels", "fix_channels", "select_with_fixed"]


@dataclass(frozen=True)
class FixedChannels:
    """A layer problem with some channels always kept, and the equivalent problem over the others.

    Attributes
    ----------
    problem : LayerProblem
        The whole problem, over all ``C`` channels.
    fixed : ndarray of bool, shape (C,)
        Channels that are always kept.
    reduced : LayerProblem
        Over the free channels (in increasing order): ``reduced.objective(t) ==
        problem.objective(lift(t))`` for every mask ``t`` of the free channels.
    """

    problem: LayerProblem
    fixed: np.ndarray
    reduced: LayerProblem

    @property
    def free(self) -> np.ndarray:
        """Indices of the free channels; channel ``i`` of :attr:`reduced` is channel ``free[i]``."""
        return np.flatnonzero(~self.fixed)

    def lift(self, mask: Any) -> np.ndarray:
        """The whole problem's mask: the fixed channels and the free channels kept in ``mask``."""
        free_mask = channel_mask(mask, self.reduced.n_channels)
        full = self.fixed.copy()
        full[self.free[free_mask]] = True
        return full

    def lift_selection(self, selection: Selection) -> Selection:
        """A selection of :attr:`reduced` as a selection of :attr:`problem` (same objective and bound)."""
        mask = self.lift(selection.mask)
        weights, objective = self.problem.refit(mask)
        bound = min(selection.bound, objective)
        return replace(selection, mask=mask, weights=weights, objective=objective, bound=bound,
                       gap=relative_gap(objective, bound, self.problem.yy))


def _factor_solve(h: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``h^{-1} rhs`` for a PSD ``h`` (the pseudo-inverse when singular: no ridge, collinear columns)."""
    try:
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(h), rhs)
    except np.linalg.LinAlgError:
        return scipy.linalg.lstsq(h, rhs, cond=1e-12)[0]


def fix_channels(problem: LayerProblem, fixed: Any) -> FixedChannels:
    """Eliminate the always-kept channels ``fixed`` of ``problem`` (module docstring).

    Parameters
    ----------
    problem : LayerProblem
    fixed : array_like of bool, shape (C,), or channel indices
        Channels kept whatever the selection; at least one channel must stay free.

    Returns
    -------
    FixedChannels
    """
    if not isinstance(problem, LayerProblem):
        raise ValueError(f"`problem` must be a LayerProblem, got {type(problem).__name__}.")
    try:
        fixed = channel_mask(fixed, problem.n_channels).copy()
    except ValueError as exc:
        raise ValueError(f"`fixed` must be a boolean mask of the {problem.n_channels} channels or channel "
                         f"indices: {exc}") from exc
    if fixed.all():
        raise ValueError("`fixed` must leave at least one channel free.")
    fixed.flags.writeable = False
    free_cols = problem.columns(~fixed)
    gram_ss = problem.gram[np.ix_(free_cols, free_cols)]
    cross_s = problem.cross[free_cols]
    weights = None if problem.weights is None else problem.weights[free_cols]
    if not fixed.any():
        reduced = LayerProblem(gram_ss, cross_s, problem.yy, group_size=problem.group_size,
                               ridge=problem.ridge, weights=weights)
        return FixedChannels(problem, fixed, reduced)
    fixed_cols = problem.columns(fixed)
    h_ff = problem.gram[np.ix_(fixed_cols, fixed_cols)] + problem.ridge * np.eye(fixed_cols.size)
    h_fs = problem.gram[np.ix_(fixed_cols, free_cols)]  # the ridge is diagonal: H_FS = G_FS
    cross_f = problem.cross[fixed_cols]
    solved = _factor_solve(h_ff, np.hstack([h_fs, cross_f]))
    a, c = solved[:, : free_cols.size], solved[:, free_cols.size :]  # H_FF^-1 H_FS, H_FF^-1 B_F
    gram = gram_ss - h_fs.T @ a
    gram = 0.5 * (gram + gram.T)
    cross = cross_s - h_fs.T @ c
    yy = max(float(problem.yy - np.sum(cross_f * c)), 0.0)
    reduced = LayerProblem(gram, cross, yy, group_size=problem.group_size, ridge=problem.ridge, weights=weights)
    return FixedChannels(problem, fixed, reduced)


def select_with_fixed(problem: LayerProblem, k: int, fixed: Any, *, solver: str = "auto",
                      time_limit: float | None = None, **options: Any) -> Selection:
    """Keep ``k`` channels of ``problem`` including every channel of ``fixed``.

    .. math::

        \\min_{S \\supseteq F,\\ |S| = k}\\ \\min_W \\|Y - X_S W\\|_F^2 + r \\|W\\|_F^2

    Solved as :func:`orprune.select` on :func:`fix_channels`'s reduced problem with ``k - |F|``
    channels, and returned over all channels (the objective, bound and status of the reduced solve
    hold for this problem unchanged).
    """
    split = fix_channels(problem, fixed)
    n_fixed = int(split.fixed.sum())
    k = check_integer(k, "k", n_fixed, problem.n_channels)
    return split.lift_selection(select(split.reduced, k - n_fixed, solver=solver, time_limit=time_limit, **options))
