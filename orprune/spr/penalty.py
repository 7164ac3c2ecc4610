"""Structured Perspective Regularization (SPR) of Cacciola, Frangioni, Li and Lodi (arXiv 2206.14056).

The penalty of one channel group is the indicator MIP's perspective relaxation with the indicator
projected out in closed form; the derivation is in ``formulations/perspective_regularizer.md``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch

__all__ = ["spr_penalty", "spr_optimal_y"]

Weights = Union[torch.Tensor, Sequence[torch.Tensor]]
Bound = Union[float, torch.Tensor, np.ndarray, Sequence]


def spr_penalty(weights: Weights, alpha: float, lam: float, M: Bound) -> torch.Tensor:
    r"""Structured Perspective Regularization of each channel group.

    For the weight vector :math:`w` of one group, with bounds :math:`|w_i| \le M_i y`, the penalty is the
    value of the perspective relaxation of the indicator model minimised over the indicator:

    .. math::

        \mathrm{SPR}(w) = \min_{y} \Big\{ \lambda y + \alpha \frac{\|w\|_2^2}{y} \;:\;
            r(w) \le y \le 1 \Big\},
        \qquad r(w) = \max_i \frac{|w_i|}{M_i}.

    With :math:`t = \sqrt{\alpha/\lambda}\,\|w\|_2` the minimiser is :math:`y^* = \min(1, \max(r, t))`:

    * :math:`\max(r, t) \ge 1`: :math:`\alpha \|w\|_2^2 + \lambda` (indicator at 1, unpruned cost);
    * :math:`r \le t < 1`: :math:`2\sqrt{\alpha\lambda}\,\|w\|_2` (interior stationary point);
    * :math:`t < r < 1`: :math:`\alpha \|w\|_2^2 / r + \lambda r` (big-M bound active), which is
      :math:`\alpha M \|w\|_2^2 / \|w\|_\infty + \lambda \|w\|_\infty / M` for a scalar bound.

    The function is convex and continuous in :math:`w`; see ``formulations/perspective_regularizer.md``.

    Parameters
    ----------
    weights : torch.Tensor of shape (n_groups, d) or sequence of 1-D tensors
        One row (or one tensor, lengths may differ) per group. Must be finite and floating point.
    alpha : float
        Weight of the quadratic term, ``>= 0``.
    lam : float
        Cost of the indicator (of keeping the group), ``>= 0``.
    M : float, array of shape (n_groups,), or per-entry bounds
        Big-M bound(s), ``> 0``; ``inf`` is allowed and means "no bound" (the penalty then is the reverse
        Huber function). Per-entry bounds have the shape of ``weights`` (a tensor of the same shape, or a
        sequence of 1-D tensors of the same lengths). ``M`` is treated as a constant (no gradient).

    Returns
    -------
    torch.Tensor of shape (n_groups,)
        Penalties, differentiable with respect to ``weights``. At :math:`w = 0` the value is 0 and the
        gradient is the zero subgradient (never NaN).

    Notes
    -----
    Limits: ``lam = 0`` gives :math:`y^* = 1` and :math:`\alpha\|w\|_2^2` (weight decay); ``alpha = 0``
    gives :math:`\lambda \min(1, r(w))` (a weighted group :math:`\ell_\infty` penalty, capped at
    :math:`\lambda`); both zero give 0.
    """
    alpha = _check_scalar(alpha, "alpha")
    lam = _check_scalar(lam, "lam")
    dense, inv_m = _check_weights_and_bound(weights, M)
    sq, r = group_stats(dense, inv_m)
    return spr_from_stats(sq, r, alpha, lam)


def spr_optimal_y(weights: Weights, alpha: float, lam: float, M: Bound) -> torch.Tensor:
    r"""Optimal relaxed indicator :math:`y^* = \min(1, \max(r(w), \sqrt{\alpha/\lambda}\|w\|_2))` per group.

    Same arguments as :func:`spr_penalty`; the result is detached. :math:`y^* = 1` means the relaxation
    keeps the group at full cost, small :math:`y^*` marks a candidate for removal. With ``lam = 0`` it
    is 1 for every group.
    """
    alpha = _check_scalar(alpha, "alpha")
    lam = _check_scalar(lam, "lam")
    dense, inv_m = _check_weights_and_bound(weights, M)
    with torch.no_grad():
        return optimal_y_from_stats(*group_stats(dense, inv_m), alpha, lam)


def group_stats(dense: torch.Tensor, inv_m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared L2 norm and bound ratio ``r = max_i |w_i| / M_i`` of each row (no validation)."""
    sq = (dense * dense).sum(dim=1)
    if dense.shape[1] == 0:
        return sq, torch.zeros_like(sq)
    return sq, (dense.abs() * inv_m).amax(dim=1)


def spr_from_stats(sq: torch.Tensor, r: torch.Tensor, alpha: float,
                   lam: Union[float, torch.Tensor]) -> torch.Tensor:
    """SPR from per-group ``sq = ||w||_2^2`` and ``r = max_i |w_i|/M_i`` (no validation).

    ``lam`` is a float or a tensor of per-group indicator costs, all ``> 0`` (the cost-weighted
    penalty). Shared by :func:`spr_penalty` and :class:`~orprune.spr.PerspectiveRegularizer`.
    Every branch is evaluated on safe inputs so that :func:`torch.where` never routes a NaN or inf
    gradient.
    """
    if not isinstance(lam, torch.Tensor) and lam == 0.0:
        return alpha * sq  # y* = 1 for every w: plain weight decay (also covers alpha = lam = 0)
    pos = sq > 0
    # sqrt has an infinite derivative at 0; the double where gives the zero subgradient there.
    norm = torch.where(pos, torch.sqrt(torch.where(pos, sq, torch.ones_like(sq))), torch.zeros_like(sq))
    t = _sqrt(alpha / lam) * norm
    with torch.no_grad():
        at_one = torch.maximum(r, t) >= 1.0
        interior = ~at_one & (r <= t)
        at_bound = ~at_one & ~interior  # t < r < 1, so r > 0 here
    v_one = alpha * sq + lam
    v_interior = (2.0 * _sqrt(alpha * lam)) * norm
    r_safe = torch.where(at_bound, r, torch.ones_like(r))
    v_bound = alpha * sq / r_safe + lam * r_safe
    return torch.where(at_one, v_one, torch.where(interior, v_interior, v_bound))


def optimal_y_from_stats(sq: torch.Tensor, r: torch.Tensor, alpha: float,
                         lam: Union[float, torch.Tensor]) -> torch.Tensor:
    """:math:`y^* = \\min(1, \\max(r, \\sqrt{\\alpha/\\lambda}\\|w\\|))` from per-group ``sq`` and ``r``, as
    :func:`spr_from_stats` takes them (``lam`` a float or per-group tensor); 1 when ``lam`` is 0."""
    if not isinstance(lam, torch.Tensor) and lam == 0.0:
        return torch.ones_like(sq)
    return torch.clamp(torch.maximum(r, _sqrt(alpha / lam) * torch.sqrt(sq)), max=1.0)


def _sqrt(value: Union[float, torch.Tensor]) -> Union[float, torch.Tensor]:
    return torch.sqrt(value) if isinstance(value, torch.Tensor) else math.sqrt(value)


# ---------------------------------------------------------------------------------------------------
# validation


def _check_scalar(value: object, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"`{name}` must be a real number >= 0; got {value!r}.")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be finite and >= 0; got {value!r}.")
    return value


def _check_weights_and_bound(weights: Weights, M: Bound) -> tuple[torch.Tensor, torch.Tensor]:
    """Return dense weights (n_groups, d) and inverse bounds broadcastable to them."""
    if isinstance(weights, torch.Tensor):
        if weights.ndim != 2:
            raise ValueError(
                f"`weights` must be a 2-D tensor (n_groups, d) or a sequence of 1-D tensors; "
                f"got a tensor of shape {tuple(weights.shape)}."
            )
        dense, lengths = weights, None
    elif isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)):
        items = list(weights)
        if not all(isinstance(w, torch.Tensor) and w.ndim == 1 for w in items):
            raise ValueError("`weights` given as a sequence must contain only 1-D torch tensors.")
        if not items:
            return torch.zeros(0, 0), torch.ones(0, 1)
        if len({(w.dtype, w.device) for w in items}) > 1:
            raise ValueError("`weights` tensors must share one dtype and one device.")
        lengths = [int(w.shape[0]) for w in items]
        dense = torch.nn.utils.rnn.pad_sequence(items, batch_first=True)  # zero padding: no effect
        if dense.shape[1] == 0:
            dense = items[0].new_zeros(len(items), 0)
    else:
        raise ValueError(
            f"`weights` must be a 2-D torch tensor or a sequence of 1-D tensors; got {type(weights).__name__}."
        )
    if not dense.is_floating_point():
        raise ValueError(f"`weights` must be floating point; got dtype {dense.dtype}.")
    finite = torch.isfinite(dense.detach())
    if not bool(finite.all()):
        bad = torch.nonzero(~finite.all(dim=1)).flatten().tolist()
        raise ValueError(f"`weights` must be finite; found NaN or inf in group(s) {bad[:10]}.")
    return dense, _inverse_bound(M, dense, lengths)


def _inverse_bound(M: Bound, dense: torch.Tensor, lengths: list[int] | None) -> torch.Tensor:
    n, d = dense.shape
    opts = {"dtype": dense.dtype, "device": dense.device}
    if isinstance(M, torch.Tensor) and M.ndim == 0:
        M = M.item()
    if isinstance(M, numbers.Real) and not isinstance(M, bool):
        m = torch.full((1, 1), float(M), **opts)
    elif lengths is not None and isinstance(M, Sequence) and any(isinstance(x, torch.Tensor) and x.ndim == 1
                                                                 for x in M):
        if len(M) != n or any(not isinstance(x, torch.Tensor) or x.shape != (k,) for x, k in zip(M, lengths)):
            raise ValueError("`M` given per entry must be a sequence of 1-D tensors with the lengths of `weights`.")
        m = torch.ones(n, d, **opts)  # padding entries are zero weights: any positive bound will do
        for i, (x, k) in enumerate(zip(M, lengths)):
            m[i, :k] = x.detach().to(**opts)
    else:
        try:
            m = torch.as_tensor(np.asarray(M.detach().cpu() if isinstance(M, torch.Tensor) else M,
                                           dtype=np.float64)).to(**opts)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"`M` must be a positive number or an array of positive numbers; got {M!r}.") from exc
        if m.shape == (n,):
            m = m.reshape(n, 1)
        elif lengths is None and m.shape == (n, d):
            pass
        else:
            raise ValueError(
                f"`M` must be a scalar, have shape ({n},) (one bound per group) or the shape of `weights` "
                f"(one bound per entry); got shape {tuple(m.shape)}."
            )
    if bool(torch.isnan(m).any()) or bool((m <= 0).any()):
        raise ValueError("`M` must be > 0 (inf allowed, meaning no bound); found a value <= 0 or NaN.")
    return 1.0 / m  # 1/inf = 0: an unbounded entry never forces y up
