r"""Trained Rank Pruning (Xu et al., arXiv 1812.02402 / 2004.14566) as a regulariser and a step callback.

During training, every layer's weight matrix :math:`W_l` (layout of
:func:`~orprune.network.graph.weight_matrix`) is pulled towards low rank by the nuclear norm
:math:`\sum_l \|W_l\|_*` (its subgradient :math:`U V^T` enters through autograd of the singular values), and
every ``period`` optimizer steps it is replaced by its truncated SVD at the smallest rank keeping an
``energy`` fraction of :math:`\sum_i s_i^2`. After training, :meth:`TrainedRankRegularizer.decompose` splits
each layer into two thinner ones (:func:`orprune.apply_factorization`), with the data-free SVD factors
TRP uses, or with the optimal maps of :func:`orprune.select_rank` on calibration statistics.
See ``formulations/low_rank.md``, section 8.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from orprune.layer.low_rank import select_rank
from orprune.layer.problem import LayerProblem
from orprune.network.calibration import collect_statistics
from orprune.network.factorization import (
    LayerFactors,
    apply_factorization,
    factorizable_layers,
    following_norms,
)
from orprune.network.graph import set_weight_matrix, weight_matrix

__all__ = ["TrainedRankRegularizer", "energy_rank"]


def energy_rank(singular_values: Any, energy: float) -> int:
    """Smallest ``r >= 1`` with ``sum_{i<=r} s_i^2 >= energy * sum_i s_i^2`` (``s`` decreasing)."""
    s = torch.as_tensor(singular_values, dtype=torch.float64)
    power = s * s
    total = float(power.sum())
    if total <= 0.0:
        return 1
    kept = torch.cumsum(power, 0) / total
    return max(1, int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=torch.float64))) + 1)


def _fraction(value: Any, name: str, *, open_low: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a real number, got {value!r}.")
    if not (0 < value <= 1 if open_low else 0 <= value <= 1):
        raise ValueError(f"`{name}` must lie in (0, 1], got {value}.")
    return float(value)


class TrainedRankRegularizer(nn.Module):
    r"""Nuclear norm of every layer's weights, periodic energy truncation, final decomposition.

    .. math:: R(\theta) = \sum_l \|W_l\|_* = \sum_l \sum_i s_i(W_l)

    Add ``strength * regularizer()`` to the loss (:func:`orprune.training.train`'s ``regularizer``) and
    call :meth:`after_step` after every optimizer step (or train inside :meth:`every_step`): every
    ``period`` steps each layer is truncated to :meth:`ranks` at ``energy``.

    Parameters
    ----------
    model : nn.Module
        Not registered as a submodule (the regulariser holds no parameters).
    energy : float, default 0.98
        Fraction of :math:`\sum_i s_i^2` each truncation keeps, in (0, 1].
    period : int, default 20
        Optimizer steps between truncations (TRP's ``m``).
    layers : iterable of str, optional
        Layers to regularise; default every ``Linear`` / ``Conv2d`` (``groups=1``) except ``ignored_layers``.
    ignored_layers : iterable of nn.Module or str
        Left alone (e.g. the classifier).

    Attributes
    ----------
    layers_ : tuple of str
    steps_, truncations_ : int
        Optimizer steps seen by :meth:`after_step`, truncations done.
    ranks_ : dict of str -> int or None
        The ranks of the last truncation.
    """

    def __init__(self, model: nn.Module, *, energy: float = 0.98, period: int = 20,
                 layers: Iterable[str] | None = None, ignored_layers: Iterable[nn.Module | str] = ()) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        self.energy = _fraction(energy, "energy")
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"`period` must be a positive integer, got {period!r}.")
        self.period = period
        allowed = factorizable_layers(model, ignored_layers)
        names = allowed if layers is None else list(layers)
        bad = [n for n in names if n not in allowed]
        if bad:
            raise ValueError(f"`layers` names {bad}, which are not Linear / Conv2d (groups=1) layers of `model` "
                             "outside `ignored_layers`.")
        if not names:
            raise ValueError("`model` has no layer to regularise.")
        self.layers_ = tuple(names)
        self._modules_list = [model.get_submodule(n) for n in names]  # plain list: not submodules
        self._model = [model]
        self.steps_ = 0
        self.truncations_ = 0
        self.ranks_: dict[str, int] | None = None

    def forward(self) -> torch.Tensor:
        """Summed nuclear norms (differentiable; the subgradient of each is ``U V^T``)."""
        return sum(torch.linalg.svdvals(weight_matrix_live(m)).sum() for m in self._modules_list)

    @torch.no_grad()
    def singular_values(self) -> dict[str, torch.Tensor]:
        """Each layer's singular values, decreasing (detached, float64)."""
        return {n: torch.linalg.svdvals(weight_matrix(m).double()) for n, m in zip(self.layers_, self._modules_list)}

    def ranks(self, energy: float | None = None) -> dict[str, int]:
        """Each layer's energy rank at ``energy`` (default: the regulariser's)."""
        energy = self.energy if energy is None else _fraction(energy, "energy")
        return {n: energy_rank(s, energy) for n, s in self.singular_values().items()}

    @torch.no_grad()
    def truncate(self, energy: float | None = None) -> dict[str, int]:
        """Replace every layer's weights by their truncated SVD at its energy rank; returns the ranks."""
        ranks = {}
        for name, module in zip(self.layers_, self._modules_list):
            w = weight_matrix(module).double()
            u, s, vt = torch.linalg.svd(w, full_matrices=False)
            r = energy_rank(s, self.energy if energy is None else energy)
            set_weight_matrix(module, (u[:, :r] * s[:r]) @ vt[:r])
            ranks[name] = r
        self.truncations_ += 1
        self.ranks_ = ranks
        return dict(ranks)

    def after_step(self) -> None:
        """Count one optimizer step; truncate every ``period`` steps."""
        self.steps_ += 1
        if self.steps_ % self.period == 0:
            self.truncate()

    @contextlib.contextmanager
    def every_step(self) -> Iterator[TrainedRankRegularizer]:
        """Call :meth:`after_step` after every optimizer step inside the block (a global post-step hook,
        so any training loop, e.g. :func:`orprune.training.train`, works unchanged)."""
        handle = register_optimizer_step_post_hook(lambda *_: self.after_step())
        try:
            yield self
        finally:
            handle.remove()

    @torch.no_grad()
    def decompose(self, calibration: Iterable[Any] | None = None, *, ranks: dict[str, int] | None = None,
                  ridge: float = 1e-4, positions_per_image: int | None = 32) -> nn.Module:
        """A copy of the model with each layer split in two at its rank (when that saves MACs).

        The ranks: ``ranks``, else those of the last :meth:`truncate`, else the energy ranks of the
        current weights (:meth:`ranks`).

        Without ``calibration``: the truncated SVD of the weights (TRP's decomposition; exact when the
        weights already have that rank, as right after :meth:`truncate`). With it: each layer's optimal
        map of that rank for its calibration statistics (:func:`orprune.select_rank`, centred, ridge
        relative to the mean diagonal) and the compensated bias.
        """
        model = self._model[0]
        ranks = dict(ranks if ranks is not None else self.ranks_ if self.ranks_ is not None else self.ranks())
        missing = [n for n in self.layers_ if n not in ranks]
        if missing or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks.values()):
            raise ValueError(f"`ranks` must give a positive integer rank for every layer; missing {missing}.")
        chosen = {}
        for name, module in zip(self.layers_, self._modules_list):
            n, m = weight_matrix(module).shape
            if ranks[name] * (n + m) < n * m:  # only where the two thinner layers are cheaper
                chosen[name] = (module, ranks[name])
        batches = None if calibration is None else [b[0] if isinstance(b, (tuple, list)) else b for b in calibration]
        stats, norms = {}, {}
        if batches and chosen:
            stats = collect_statistics(model, list(chosen), batches, positions_per_image=positions_per_image,
                                       progress=False)
            norms = following_norms(model, batches[0][:1], list(chosen))  # biases fold into BatchNorms
        factors = {}
        for name, (module, r) in chosen.items():
            if calibration is None:
                u, s, vt = torch.linalg.svd(weight_matrix(module).double(), full_matrices=False)
                factors[name] = LayerFactors(u[:, :r] * s[:r], vt[:r])
                continue
            gram, cross, yy = stats[name].statistics(center=True)
            sel = select_rank(LayerProblem(gram, cross, yy, ridge=ridge * float(np.mean(np.diag(gram)))), r)
            mean_x, mean_y = stats[name].means()
            old = module.bias.detach().double().numpy() if module.bias is not None else 0.0
            factors[name] = LayerFactors(sel.left, sel.right, old + mean_y - mean_x @ sel.weights)
        return apply_factorization(model, factors, norms)


def weight_matrix_live(module: nn.Module) -> torch.Tensor:
    """:func:`weight_matrix` without detaching (the regulariser differentiates through it)."""
    if isinstance(module, nn.Linear):
        return module.weight.T
    return module.weight.reshape(module.out_channels, -1).T
