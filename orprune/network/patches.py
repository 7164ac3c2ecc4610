"""Convolution input patches: the design-matrix rows of a ``Conv2d`` consumer.

A convolution is a matrix product over unfolded patches; these helpers build those rows,
channel-major (channel ``c`` owns columns ``[c*kh*kw, (c+1)*kh*kw)``), either all of them or
only at sampled output positions (what calibration accumulates).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["conv_patches", "sampled_patches"]


def _padded(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded as ``conv`` pads it (numeric or string padding, every ``padding_mode``)."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)


def conv_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Unfolded input patches of ``conv``: shape ``(B, C*kh*kw, H_out*W_out)``, channel-major.

    Handles stride, dilation, numeric or string padding and every ``padding_mode``
    (``groups`` must be 1), so that ``weight_matrix(conv).T @ patches + bias`` is the conv output.
    """
    return F.unfold(_padded(conv, x), conv.kernel_size, dilation=conv.dilation, stride=conv.stride)


def sampled_patches(conv: nn.Conv2d, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The rows of :func:`conv_patches` at ``positions`` only: shape ``(B*P, C*kh*kw)``.

    ``positions`` (B, P) indexes each image's flattened output grid. Gathering the ``kh*kw``
    shifted pixels of the sampled positions costs ``P/(H_out*W_out)`` of a full unfold (32 of 784
    positions on a 28x28 layer).
    """
    xp = _padded(conv, x)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    wp = xp.shape[3]
    w_out = (wp - dw * (kw - 1) - 1) // sw + 1
    top = (positions // w_out) * sh * wp + (positions % w_out) * sw  # (B, P) corner in the padded grid
    offsets = (torch.arange(kh, device=x.device)[:, None] * dh * wp
               + torch.arange(kw, device=x.device)[None, :] * dw).reshape(-1)  # (K,)
    index = (top[:, None, :] + offsets[None, :, None]).reshape(x.shape[0], 1, -1)  # (B, 1, K*P)
    cols = xp.flatten(2).gather(2, index.expand(-1, x.shape[1], -1))  # (B, C, K*P)
    n_pos = positions.shape[1]
    return cols.reshape(x.shape[0], -1, n_pos).transpose(1, 2).reshape(-1, cols.shape[1] * kh * kw)
