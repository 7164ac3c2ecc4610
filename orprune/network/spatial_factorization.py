"""Spatial factorized surgery: a ``kh x kw`` conv becomes a ``kh x 1`` conv then a ``1 x kw`` conv.

The first conv (``C -> r``, kernel ``(kh, 1)``) carries the vertical stride, padding and dilation, the second
(``r -> N``, kernel ``(1, kw)``) the horizontal ones and the bias. For zero padding the composite computes
exactly the conv with weights ``W[n, c, i, j] = sum_t V[t, c, i] Z[n, t, j]`` (:func:`spatial_weights`): the
first conv has no bias, so its output is zero in the columns the second conv pads. MACs per sample:
``H_out W_in r C kh + H_out W_out N r kw`` instead of ``H_out W_out N C kh kw``. See ``formulations/low_rank.md``,
section 12.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from orprune._validation import as_finite_array

__all__ = ["spatial_layer"]


def spatial_layer(module: nn.Conv2d, vertical: Any, horizontal: Any, bias: Any = None) -> nn.Sequential:
    """The ``kh x 1`` then ``1 x kw`` replacement of the conv ``module``.

    Parameters
    ----------
    module : nn.Conv2d
        ``groups=1``, zero padding given as numbers (not ``"same"``).
    vertical : array_like, shape (r, C, kh)
    horizontal : array_like, shape (N, r, kw)
    bias : array_like, shape (N,), optional
        The second conv's bias; None keeps the module's (no bias if it has none).

    Returns
    -------
    nn.Sequential
        Children ``0`` (``kh x 1``) and ``1`` (``1 x kw``). Each rank component's two factors are scaled to
        equal norms (the same map), as the channel-wise surgery does for fine-tuning.
    """
    if not isinstance(module, nn.Conv2d) or module.groups != 1:
        raise ValueError("`module` must be an nn.Conv2d with groups=1.")
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        raise ValueError("`module` must use zero padding given as numbers (not 'same'/'valid' or another mode).")
    v = torch.from_numpy(as_finite_array(vertical, "vertical", ndim=3))
    z = torch.from_numpy(as_finite_array(horizontal, "horizontal", ndim=3))
    r = v.shape[0]
    (kh, kw), c, n = module.kernel_size, module.in_channels, module.out_channels
    if tuple(v.shape) != (r, c, kh) or tuple(z.shape) != (n, r, kw) or r < 1:
        raise ValueError(f"`vertical` must have shape (r, {c}, {kh}) and `horizontal` ({n}, r, {kw}), got "
                         f"{tuple(v.shape)} and {tuple(z.shape)}.")
    a, b = v.flatten(1).norm(dim=1), z.transpose(0, 1).flatten(1).norm(dim=1)
    d = torch.where((a > 0) & (b > 0), (b / torch.where(a > 0, a, 1.0)).sqrt(), torch.ones_like(a))
    v, z = v * d[:, None, None], z / d[None, :, None]
    value = None if bias is None else torch.from_numpy(as_finite_array(bias, "bias", ndim=1))
    if value is not None and value.shape[0] != n:
        raise ValueError(f"`bias` must have {n} entries, got {value.shape[0]}.")
    has_bias = value is not None or module.bias is not None
    (sh, sw), (ph, pw), (dh, dw) = module.stride, module.padding, module.dilation
    first = nn.Conv2d(c, r, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1), bias=False)
    second = nn.Conv2d(r, n, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw), bias=has_bias)
    ref = module.weight
    first, second = first.to(ref), second.to(ref)
    with torch.no_grad():
        first.weight.copy_(v[..., None].to(ref))
        second.weight.copy_(z[:, :, None, :].to(ref))
        if has_bias:
            second.bias.copy_((value if value is not None else module.bias.detach()).to(ref))
    return nn.Sequential(first, second).train(module.training)
