"""Coarse-to-fine gates on a layer's weights: a group gate per input channel times a band-stop entry gate.

A gated layer computes with ``W * m(W)`` instead of ``W``: the mask is a function of the weights themselves
(weight sharing, no mask variables beyond two thresholds per layer), ``m_ij = z_c(i) e_ij`` with

.. math::

    e_{ij} = \\beta_\\tau(w_{ij} / s; a), \\qquad z_c = \\beta_\\tau(\\rho_c / s; b), \\qquad
    \\beta_\\tau(u; t) = \\sigma\\big(\\tfrac{u - t}{\\tau}\\big) + \\sigma\\big(\\tfrac{-u - t}{\\tau}\\big),

``rho_c`` the root-mean-square of channel ``c``'s weights, ``s`` the layer's weight RMS at construction and
``a, b > 0`` learned thresholds. ``beta`` is a band-stop in ``u``: close to 0 for ``|u| < t``, close to 1
outside, increasing in ``|u|``; ``tau -> 0`` makes it a step. See ``formulations/coarse_to_fine.md``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["band_stop", "GatedWeight"]


def band_stop(u: torch.Tensor, threshold: torch.Tensor, temperature: float) -> torch.Tensor:
    """The symmetrised shifted sigmoid ``sigma((u - t)/tau) + sigma((-u - t)/tau)``, in ``[2 sigma(-t/tau), 1)``."""
    return torch.sigmoid((u - threshold) / temperature) + torch.sigmoid((-u - threshold) / temperature)


class GatedWeight(nn.Module):
    """Parametrisation ``W -> W * m(W)`` of one Linear / Conv weight (``torch.nn.utils.parametrize``).

    Groups are input channels: ``W[:, c]`` (with its kernel taps for a convolution), the channels of
    :class:`orprune.LayerProblem` for that layer.

    Parameters
    ----------
    weight : torch.Tensor
        The layer's weight at construction, shape ``(out, in, *kernel)``; fixes the scale ``s``.
    entry_threshold, group_threshold : float
        Initial thresholds ``a`` and ``b`` in units of ``s``, ``> 0``.
    """

    def __init__(self, weight: torch.Tensor, entry_threshold: float, group_threshold: float) -> None:
        super().__init__()
        scale = float(weight.detach().pow(2).mean().sqrt())
        self.register_buffer("scale", torch.tensor(scale if scale > 0 else 1.0, dtype=weight.dtype))
        self.log_entry = nn.Parameter(torch.tensor(math.log(entry_threshold), dtype=weight.dtype))
        self.log_group = nn.Parameter(torch.tensor(math.log(group_threshold), dtype=weight.dtype))
        self.register_buffer("hard_mask", None)
        self.temperature = 0.5

    @property
    def entry_threshold(self) -> torch.Tensor:
        return self.log_entry.exp()

    @property
    def group_threshold(self) -> torch.Tensor:
        return self.log_group.exp()

    def group_gates(self, weight: torch.Tensor) -> torch.Tensor:
        """``z_c`` of each input channel, shape ``(in,)``."""
        u = weight / self.scale
        rms = u.transpose(0, 1).reshape(u.shape[1], -1).pow(2).mean(1).add(1e-12).sqrt()
        return band_stop(rms, self.group_threshold, self.temperature)

    def entry_gates(self, weight: torch.Tensor) -> torch.Tensor:
        """``e_ij`` of each weight, the shape of ``weight``."""
        return band_stop(weight / self.scale, self.entry_threshold, self.temperature)

    def soft_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """``m = z_c e_ij``, the shape of ``weight`` (entry <= group by construction)."""
        shape = (1, -1) + (1,) * (weight.dim() - 2)
        return self.group_gates(weight).reshape(shape) * self.entry_gates(weight)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.hard_mask is not None:
            return weight * self.hard_mask
        return weight * self.soft_mask(weight)
