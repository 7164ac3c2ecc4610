"""Channel selection for grouped convolutions: block-diagonal least squares and tied channels.

A convolution with ``groups = G`` maps input group ``j`` (channels ``[j*w, (j+1)*w)``) to output group
``j`` only. Its least squares over the dense-equivalent weight matrix (zero outside the diagonal blocks)
is :func:`block_diagonal`: with the Gram entries between different groups and the cross entries between
an input group and another group's outputs set to zero, the minimiser over dense ``W`` is zero outside
the blocks and its error is the sum of the groups' errors (``formulations/grouped_convolutions.md``).

Removing input (or output) channels keeps the conv valid with the same ``G`` only if every group loses
the same positions (torch-pruning slices the per-group weight dimension once for all groups), so one
decision removes the channels ``c + j*n`` for ``j < G``: :func:`tie_channels` merges them into one
channel of a problem with ``G`` times the group size.
"""

from __future__ import annotations

import numpy as np

from orprune._validation import check_integer
from orprune.layer.problem import LayerProblem

__all__ = ["block_diagonal", "tie_channels", "tie_layout"]


def block_diagonal(gram: np.ndarray, cross: np.ndarray, groups: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(gram, cross)`` of a grouped layer's own least squares: entries across groups set to zero.

    Parameters
    ----------
    gram : ndarray, shape (C*g, C*g)
    cross : ndarray, shape (C*g, n_out)
    groups : int
        ``G``, dividing ``C`` and ``n_out``.
    group_size : int
        ``g``, feature columns per input channel.
    """
    n_features, n_out = cross.shape
    groups = check_integer(groups, "groups", 1, max(n_features, 1))
    if gram.shape != (n_features, n_features) or n_features % group_size or (n_features // group_size) % groups \
            or n_out % groups:
        raise ValueError(f"`groups` = {groups} must divide the input channels and the outputs of shapes "
                         f"{gram.shape}, {cross.shape} with `group_size` = {group_size}.")
    in_group = np.arange(n_features) // group_size // (n_features // group_size // groups)
    out_group = np.arange(n_out) // (n_out // groups)
    gram = np.where(in_group[:, None] == in_group[None, :], gram, 0.0)
    cross = np.where(in_group[:, None] == out_group[None, :], cross, 0.0)
    return gram, cross


def tie_channels(problem: LayerProblem, tie: int) -> LayerProblem:
    """The problem whose channel ``c`` is ``problem``'s channels ``c + j * C / tie``, ``j < tie``.

    Its objective at a mask ``t`` equals ``problem.objective`` at the mask keeping those channels;
    the group size is ``tie * g``.
    """
    tie = check_integer(tie, "tie", 1, problem.n_channels)
    if problem.n_channels % tie:
        raise ValueError(f"`tie` = {tie} must divide the {problem.n_channels} channels.")
    n = problem.n_channels // tie
    return tie_layout(problem, np.arange(n)[:, None] + n * np.arange(tie)[None, :])


def tie_layout(problem: LayerProblem, layout: np.ndarray) -> LayerProblem:
    """The problem whose channel ``c`` is ``problem``'s channels ``layout[c, :]`` (one decision each).

    ``layout``, shape ``(n, t)``, must hold every channel of ``problem`` once: the general form of
    :func:`tie_channels` (a unit through a ``chunk`` read by a layer in ``t`` parts after a concatenation,
    :mod:`orprune.network.chunks`). Its objective at a mask ``z`` equals ``problem.objective`` at the mask
    keeping the channels of the rows ``z`` keeps; the group size is ``t * g``.
    """
    layout = np.asarray(layout, dtype=np.int64)
    if layout.ndim == 1:
        layout = layout[:, None]
    if layout.ndim != 2 or not np.array_equal(np.sort(layout.ravel()), np.arange(problem.n_channels)):
        raise ValueError(f"`layout` must be an (n, t) array holding each of the {problem.n_channels} channels once.")
    if layout.shape[1] == 1 and np.array_equal(layout[:, 0], np.arange(problem.n_channels)):
        return problem
    g = problem.group_size
    cols = (layout.ravel()[:, None] * g + np.arange(g)[None, :]).ravel()  # decision-major
    weights = None if problem.weights is None else problem.weights[cols]
    return LayerProblem(problem.gram[np.ix_(cols, cols)], problem.cross[cols], problem.yy,
                        group_size=g * layout.shape[1], ridge=problem.ridge, weights=weights)
