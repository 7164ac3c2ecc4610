"""Coarse-to-fine gating of a model's Linear and Conv2d layers, with a budget penalty and a final hardening."""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from orprune._status import FEASIBLE, OPTIMAL
from orprune.c2f.gates import GatedWeight
from orprune.c2f.hardening import (
    GatingMasks,
    from_layout,
    group_counts,
    harden_layer,
    split_budget,
    weight_layout,
)
from orprune.layer.problem import LayerProblem

__all__ = ["CoarseToFineGating"]


def _check_fraction(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1], got {value!r}.")
    return float(value)


def _check_positive(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")
    return float(value)


class CoarseToFineGating(nn.Module):
    r"""Coarse-to-fine (group, then entry) gates on a model's layers, trained with a budget penalty.

    Each gated layer computes with :math:`W \odot m(W)`, :math:`m_{ij} = z_{c(i)} e_{ij}`: a band-stop gate
    :math:`e_{ij}` on each weight's magnitude and a band-stop gate :math:`z_c` on each input channel's RMS,
    both relative to the layer's weight RMS at construction, with two learned thresholds per layer
    (:class:`~orprune.c2f.gates.GatedWeight`). A channel's weights can be kept only when the channel is kept
    (``entry <= group``, the constraint of :func:`orprune.select_hierarchical`): the gate arbitrates per
    channel between removing it whole and removing single weights. The penalty

    .. math::

        P = \Big(\frac{1}{N}\sum_{\ell}\sum_{ij} m^{\ell}_{ij} - \rho\Big)^2

    drives the soft kept fraction to the target :math:`\rho`; add ``strength * gating()`` to the loss and
    lower :attr:`temperature` during training so the gates become steps. :meth:`harden` then fixes hard
    masks with exactly ``round(rho * N)`` kept weights. Model: ``formulations/coarse_to_fine.md``.

    The gates are registered on the model's modules (``torch.nn.utils.parametrize``), so the model's
    ``parameters()`` include the thresholds (:meth:`gate_parameters`); the model is modified in place
    (:meth:`remove` restores plain layers holding the masked weights).

    Parameters
    ----------
    model : torch.nn.Module
    target : float
        Fraction :math:`\rho` of the gated layers' weights to keep, in ``[0, 1]``.
    layers : iterable of str, optional
        Names of the Linear / Conv2d modules to gate; default every such module (convolutions with
        ``groups == 1``) not in ``ignored_layers``.
    ignored_layers : iterable of str
        Module names never gated (e.g. a classifier).
    entry_threshold, group_threshold : float
        Initial thresholds ``a`` and ``b`` (units of the layer's weight RMS), ``> 0``. Small values start
        with every gate open.
    temperature : float
        Initial temperature ``tau > 0`` of the band-stop gates.
    """

    def __init__(
        self,
        model: nn.Module,
        target: float,
        *,
        layers: Iterable[str] | None = None,
        ignored_layers: Iterable[str] = (),
        entry_threshold: float = 0.05,
        group_threshold: float = 0.05,
        temperature: float = 0.5,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        self.target = _check_fraction(target, "target")
        entry_threshold = _check_positive(entry_threshold, "entry_threshold")
        group_threshold = _check_positive(group_threshold, "group_threshold")
        modules = dict(model.named_modules())
        ignored = set(ignored_layers)
        unknown = sorted(ignored - set(modules))
        if unknown:
            raise ValueError(f"`ignored_layers` names modules not in the model: {unknown}.")
        if layers is None:
            names = [n for n, m in modules.items() if _gateable(m) and n not in ignored]
        else:
            names = list(dict.fromkeys(layers))
            for name in names:
                if name not in modules:
                    raise ValueError(f"`layers` names a module not in the model: {name!r}.")
                if not _gateable(modules[name]):
                    raise ValueError(f"`layers`: {name!r} is not a Linear or Conv2d (groups=1) with a weight.")
            names = [n for n in names if n not in ignored]
        if not names:
            raise ValueError("`model` has no Linear or Conv2d layer to gate.")
        self._modules_by_name: dict[str, nn.Module] = {}
        for name in names:
            module = modules[name]
            if parametrize.is_parametrized(module, "weight"):
                raise ValueError(f"layer {name!r} already has a weight parametrisation (gated twice?).")
            parametrize.register_parametrization(
                module, "weight", GatedWeight(module.weight, entry_threshold, group_threshold), unsafe=True)
            self._modules_by_name[name] = module
        self.layer_names: tuple[str, ...] = tuple(names)
        self.total = sum(self.raw_weight(n).numel() for n in names)
        self.temperature = temperature

    # ------------------------------------------------------------------ access
    def gate(self, name: str) -> GatedWeight:
        """The :class:`GatedWeight` of layer ``name``."""
        return self._modules_by_name[name].parametrizations.weight[0]

    def raw_weight(self, name: str) -> torch.Tensor:
        """The layer's unmasked weight (the trained parameter)."""
        return self._modules_by_name[name].parametrizations.weight.original

    def gate_parameters(self) -> list[nn.Parameter]:
        """The learned thresholds (two per layer): train them without weight decay."""
        return [p for n in self.layer_names for p in (self.gate(n).log_entry, self.gate(n).log_group)]

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = _check_positive(value, "temperature")
        for name in self.layer_names:
            self.gate(name).temperature = self._temperature

    @property
    def hard(self) -> bool:
        """Whether the layers use fixed masks (:meth:`harden` or :meth:`fix_masks`); ``False`` after :meth:`remove`."""
        return bool(self.layer_names) and self.gate(self.layer_names[0]).hard_mask is not None

    # ------------------------------------------------------------------ penalty
    def soft_masks(self) -> dict[str, torch.Tensor]:
        """Per layer, the soft mask ``m = z e`` at the current temperature (differentiable)."""
        return {n: self.gate(n).soft_mask(self.raw_weight(n)) for n in self.layer_names}

    def kept_fraction(self) -> torch.Tensor:
        """Soft kept fraction :math:`\\frac{1}{N}\\sum m_{ij}` over all gated weights (differentiable)."""
        return sum(m.sum() for m in self.soft_masks().values()) / self.total

    def penalty(self) -> torch.Tensor:
        """The budget penalty ``(kept_fraction - target)^2``."""
        return (self.kept_fraction() - self.target) ** 2

    def forward(self) -> torch.Tensor:
        return self.penalty()

    # ------------------------------------------------------------------ hardening
    @torch.no_grad()
    def harden(
        self,
        *,
        problems: Mapping[str, LayerProblem] | None = None,
        solver: str = "greedy",
        refit: bool = False,
    ) -> GatingMasks:
        """Fix hard masks with exactly ``round(target * N)`` kept weights; the layers then use them.

        Per layer: ``K_l`` from :func:`~orprune.c2f.hardening.split_budget` of the soft kept counts, ``k_l`` the
        channels with group gate >= 1/2 (at least enough to hold ``K_l``), the mask from
        :func:`orprune.select_hierarchical` on the learned scores ``m_ij |w_ij|`` (identity Gram) or, for the
        layers in ``problems``, on their calibration statistics.

        Parameters
        ----------
        problems : mapping of layer name to LayerProblem, optional
            Data for some layers, in the layer's layout (``in * kernel`` feature rows, ``group_size`` the kernel
            size, ``out`` outputs; targets the layer's pre-bias outputs).
        solver : {"greedy", "exact"}
            Passed to :func:`orprune.select_hierarchical`.
        refit : bool
            With ``problems``, write each such layer's least-squares weights of its mask into the layer.
        """
        start = time.perf_counter()
        problems = dict(problems or {})
        unknown = sorted(set(problems) - set(self.layer_names))
        if unknown:
            raise ValueError(f"`problems` names layers that are not gated: {unknown}.")
        if solver not in ("greedy", "exact"):
            raise ValueError(f"`solver` must be 'greedy' or 'exact', got {solver!r}.")
        if not isinstance(refit, bool):
            raise ValueError(f"`refit` must be True or False, got {refit!r}.")
        for name, prob in problems.items():
            weight = self.raw_weight(name)
            group = int(np.prod(weight.shape[2:], dtype=int))
            if not isinstance(prob, LayerProblem) or (prob.n_features, prob.n_outputs, prob.group_size) != \
                    (weight[0].numel(), weight.shape[0], group):
                raise ValueError(f"`problems[{name!r}]` must be a LayerProblem with {weight[0].numel()} features, "
                                 f"{weight.shape[0]} outputs and group size {group}.")
        for name in self.layer_names:
            self.gate(name).hard_mask = None
        soft = {n: m.detach() for n, m in self.soft_masks().items()}
        sizes = np.array([soft[n].numel() for n in self.layer_names])
        budget = int(round(self.target * self.total))
        entries = split_budget(budget, np.array([float(soft[n].sum()) for n in self.layer_names]), sizes)
        out = dict(masks={}, groups={}, entries={}, n_groups={}, weights={})
        status = OPTIMAL
        for name, n_entries in zip(self.layer_names, entries):
            gate, weight = self.gate(name), self.raw_weight(name).detach()
            per_group = weight[:, 0].numel()
            scores = weight_layout((soft[name] * weight.abs()).double().cpu().numpy())
            n_groups = group_counts(gate.group_gates(weight).double().cpu().numpy(), int(n_entries), per_group)
            mask, groups, weights, layer_status = harden_layer(
                scores, n_groups, int(n_entries), int(np.prod(weight.shape[2:], dtype=int)),
                problem=problems.get(name), solver=solver)
            if layer_status != OPTIMAL:
                status = FEASIBLE
            mask = from_layout(mask, tuple(weight.shape))
            gate.hard_mask = torch.as_tensor(mask, dtype=weight.dtype, device=weight.device)
            if weights is not None:
                out["weights"][name] = from_layout(weights, tuple(weight.shape))
                if refit:
                    self.raw_weight(name).copy_(torch.as_tensor(out["weights"][name], dtype=weight.dtype))
            out["masks"][name], out["groups"][name] = mask, groups
            out["entries"][name], out["n_groups"][name] = int(mask.sum()), int(groups.sum())
        kept = sum(out["entries"].values())
        source = "data" if problems else "scores"
        return GatingMasks(out["masks"], out["groups"], out["entries"], out["n_groups"], kept, self.total,
                           self.target, status, solver, source, time.perf_counter() - start, out["weights"],
                           {"budget": budget, "data_layers": sorted(problems)})

    @torch.no_grad()
    def fix_masks(self, masks: Mapping[str, object]) -> None:
        """Use the given hard masks (one per gated layer, the weight's shape; nonzero = kept), e.g. a baseline's."""
        missing = sorted(set(self.layer_names) - set(masks))
        if missing or set(masks) - set(self.layer_names):
            raise ValueError(f"`masks` must hold exactly the gated layers {list(self.layer_names)}; "
                             f"missing {missing}, unknown {sorted(set(masks) - set(self.layer_names))}.")
        fixed = {}
        for name in self.layer_names:
            weight = self.raw_weight(name)
            mask = torch.as_tensor(np.asarray(masks[name]) != 0, dtype=weight.dtype, device=weight.device)
            if mask.shape != weight.shape:
                raise ValueError(f"`masks[{name!r}]` must have shape {tuple(weight.shape)}, got {tuple(mask.shape)}.")
            fixed[name] = mask
        for name, mask in fixed.items():
            self.gate(name).hard_mask = mask

    def soften(self) -> None:
        """Drop the hard masks: the layers use the soft gates again."""
        for name in self.layer_names:
            self.gate(name).hard_mask = None

    @torch.no_grad()
    def remove(self) -> None:
        """Write ``W * mask`` (hard masks if set, else soft) into plain weights and drop the gates."""
        for name in self.layer_names:
            parametrize.remove_parametrizations(self._modules_by_name[name], "weight", leave_parametrized=True)
        self._modules_by_name = {}
        self.layer_names = ()


def _gateable(module: nn.Module) -> bool:
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return isinstance(module, nn.Linear)

