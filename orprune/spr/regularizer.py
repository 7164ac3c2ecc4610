"""Structured Perspective Regularization over a model's channel groups, as a torch module."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch
from torch import nn

from orprune.spr.group_costs import channel_group_costs
from orprune.spr.groups import ChannelGroup, trace_channel_groups
from orprune.spr.penalty import _check_scalar, optimal_y_from_stats, spr_from_stats

__all__ = ["PerspectiveRegularizer"]


class PerspectiveRegularizer(nn.Module):
    r"""Summed SPR penalty of a model's channel groups; add ``forward()`` to the training loss.

    Each prunable channel :math:`j` (found with torch-pruning's dependency graph) owns a weight vector
    :math:`w_j`: its output filter (conv rows or Linear rows, with bias) and the per-channel entries of
    every normalisation layer and coupled producer (residual adds tie several convs to one channel),
    each entry once. The regulariser is

    .. math::

        R(\theta) = \sum_j \min_{y_j} \Big\{ \lambda y_j + \alpha \frac{\|w_j\|_2^2}{y_j} :
            \max_i \frac{|w_{j,i}|}{M_{j,i}} \le y_j \le 1 \Big\},

    evaluated in closed form by :func:`~orprune.spr.spr_penalty`; the derivation is in
    ``formulations/perspective_regularizer.md``. The paper's parametrisation ``lam = 1 - alpha`` with an
    outer multiplier ``s`` is ``alpha=s*alpha, lam=s*(1-alpha)`` here.

    Parameters
    ----------
    model : torch.nn.Module
        The network. It is not registered as a submodule: the regulariser holds no parameters.
    alpha, lam : float
        Quadratic weight and indicator cost, ``>= 0``. Read at every ``forward()``, so a schedule may
        change them during training.
    M : "auto", float or mapping of module name to float
        Big-M bounds. ``"auto"``: per layer, ``m_scale`` times the largest absolute value among that
        layer's penalised parameters at construction (a conv and its BatchNorm are separate layers, so a
        group mixing them has per-entry bounds). A float applies to every entry; ``inf`` means no bound.
    m_scale : float
        Multiplier of the ``"auto"`` bounds, ``> 0``. Above 1 leaves room for weights to grow before
        the bound saturates the penalty at :math:`\alpha\|w\|^2 + \lambda`.
    example_inputs : Any
        Inputs for one forward pass, used to trace the dependency graph.
    ignored_layers : iterable of modules or module names
        Layers whose output channels are never grouped. Output channels nothing consumes (e.g. the
        classifier's logits) are skipped automatically.
    include_consumers : bool
        Also penalise the input slices of consuming layers. Default ``False``, as the authors do
        (filter + BatchNorm affine); consumer slices are listed in :attr:`groups_` either way.
    relative : bool
        Evaluate the closed form on each group's weights divided by its layer's scale
        :math:`c_L = (\frac{1}{|L|}\sum_{k \in L} \|w_k\|_2^2)^{1/2}` (the root-mean-square group norm of
        its torch-pruning dependency group :math:`L`): :math:`R = \sum_j \mathrm{SPR}(w_j / c_{L(j)})`.
        Scaling all of one layer's groups by a constant (which a BatchNorm network's function ignores)
        then leaves the penalty unchanged, so the pull separates groups within a layer instead of
        shrinking the layer. ``M`` is then in relative units: ``"auto"`` is ``m_scale`` times the
        layer's largest absolute entry divided by :math:`c_L` at construction. Derivation:
        ``formulations/perspective_regularizer.md``, section 9.
    detach_scale : bool
        With ``relative=True``, treat :math:`c_L` as a constant in the gradient (the value is the same).
        By default it is differentiated, which makes the gradient orthogonal to each layer's weights.
    root_module_types : tuple of types
        Layer types whose output channels root a dependency group.
    costs : None, "macs", "params" or array of shape (n_groups,)
        Price the indicator of each group by what keeping it costs: group :math:`j` pays
        :math:`\lambda \kappa_j` instead of :math:`\lambda`, with :math:`\kappa_j` its cost divided by
        the mean cost (so ``lam`` keeps its scale). ``"macs"`` / ``"params"``: the MACs / parameters
        its channel saves at full width (:func:`~orprune.spr.channel_group_costs`), the
        Lagrangian of a MACs (params) budget on the indicator MIP
        (``formulations/perspective_regularizer.md``, section 10). ``None`` (default): every group
        pays :math:`\lambda`, as in the paper. Costs must be finite and ``> 0``.

    Attributes
    ----------
    groups_ : tuple of ChannelGroup
        Group ``j`` -> root module name and channel, every member module with its channel indices.
        Aligned with :meth:`penalties` and :meth:`group_norms`.
    bounds_ : dict of str to float
        The bound ``M`` used for each penalised layer (in relative units when ``relative=True``).
    scales_ : ndarray of shape (n_layers,) or None
        With ``relative=True``, each dependency group's scale :math:`c_L` at construction (the one that
        converts the ``"auto"`` bounds to relative units), indexed by ``ChannelGroup.dependency_group``
        order of first appearance (see :attr:`layer_of_group_`); ``None`` otherwise.
    cost_weights_ : ndarray of shape (n_groups,) or None
        :math:`\kappa_j` of each group (mean 1) when ``costs`` is given.
    layer_of_group_ : ndarray of shape (n_groups,)
        Layer (dependency group) index ``0..n_layers-1`` of each channel group.
    n_layers : int
        Number of layers (torch-pruning dependency groups holding channel groups).

    Notes
    -----
    Index tensors are built once; ``forward()`` is one gather per parameter tensor, two segment
    reductions and the closed form. Rebuild the regulariser after the model changes shape.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        alpha: float,
        lam: float,
        M: Union[str, float, Mapping[str, float]] = "auto",
        m_scale: float = 1.0,
        example_inputs: Any,
        ignored_layers: Iterable[Union[nn.Module, str]] = (),
        include_consumers: bool = False,
        root_module_types: tuple[type, ...] = (nn.Conv2d, nn.Linear),
        relative: bool = False,
        detach_scale: bool = False,
        costs: Union[None, str, np.ndarray, Sequence[float]] = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"`model` must be a torch.nn.Module; got {type(model).__name__}.")
        self.alpha = _check_scalar(alpha, "alpha")
        self.lam = _check_scalar(lam, "lam")
        if (isinstance(m_scale, bool) or not isinstance(m_scale, numbers.Real)
                or not math.isfinite(m_scale) or m_scale <= 0):
            raise ValueError(f"`m_scale` must be a finite number > 0; got {m_scale!r}.")
        self.m_scale = float(m_scale)
        if example_inputs is None:
            raise ValueError("`example_inputs` is required to trace the model's channel dependencies.")
        self.M = M
        self.include_consumers = bool(include_consumers)
        for flag, name in ((relative, "relative"), (detach_scale, "detach_scale")):
            if not isinstance(flag, (bool, np.bool_)):
                raise ValueError(f"`{name}` must be True or False; got {flag!r}.")
        self.relative, self.detach_scale = bool(relative), bool(detach_scale)
        modules = dict(model.named_modules())
        ignored = []
        for layer in ignored_layers:
            if isinstance(layer, str):
                if layer not in modules:
                    raise ValueError(f"`ignored_layers` names a module not in the model: {layer!r}.")
                layer = modules[layer]
            ignored.append(layer)

        groups, entries = trace_channel_groups(
            model, example_inputs, ignored_layers=ignored,
            include_consumers=self.include_consumers, root_module_types=tuple(root_module_types),
        )
        if not groups:
            raise ValueError("`model` has no prunable channel groups (every layer is ignored or an output).")
        self.groups_: tuple[ChannelGroup, ...] = groups
        penalised: dict[str, set[str]] = {}
        for name, pname in entries:
            penalised.setdefault(name, set()).add(pname)
        layer_ids = {d: k for k, d in enumerate(dict.fromkeys(g.dependency_group for g in groups))}
        layer_of_group = np.array([layer_ids[g.dependency_group] for g in groups], dtype=np.int64)
        self.n_layers = len(layer_ids)
        dtype = next(iter(model.parameters())).dtype
        self.register_buffer("_layer", torch.as_tensor(layer_of_group), persistent=False)
        layer_of_group.flags.writeable = False
        self.layer_of_group_ = layer_of_group
        self.register_buffer("_layer_size", torch.bincount(self._layer, minlength=self.n_layers).to(dtype),
                             persistent=False)

        # Plain list (not registered): the model stays the owner of its parameters.
        self._sources: list[tuple[nn.Module, str, int]] = []
        gids, modules_of_entries = [], []
        for k, ((mod_name, pname), parts) in enumerate(entries.items()):
            param = getattr(modules[mod_name], pname)
            self._sources.append((modules[mod_name], pname, param.numel()))
            flat = np.concatenate([f for _, f in parts])
            self.register_buffer(f"_index{k}", torch.as_tensor(flat, dtype=torch.long), persistent=False)
            gids.append(np.concatenate([np.full(f.size, g) for g, f in parts]))
            modules_of_entries.append((mod_name, flat.size))
        self.register_buffer("_group_id", torch.as_tensor(np.concatenate(gids), dtype=torch.long),
                             persistent=False)
        self.register_buffer("_inv_m", torch.ones(len(self._group_id), dtype=dtype), persistent=False)
        self.scales_ = None
        if self.relative:
            with torch.no_grad():
                self.scales_ = torch.sqrt(self._layer_scale_sq(self._stats()[0])).cpu().double().numpy()
            self.scales_.flags.writeable = False
        self.bounds_ = self._resolve_bounds(M, modules, penalised)
        inv_m = np.concatenate([np.full(size, 1.0 / self.bounds_[name]) for name, size in modules_of_entries])
        self._inv_m.copy_(torch.as_tensor(inv_m, dtype=dtype))
        self.cost_weights_ = self._cost_weights(costs, model, example_inputs)
        self.register_buffer("_lam_weight", None if self.cost_weights_ is None
                             else torch.tensor(self.cost_weights_, dtype=dtype), persistent=False)

    @property
    def n_groups(self) -> int:
        """Number of channel groups."""
        return len(self.groups_)

    def forward(self) -> torch.Tensor:
        """Summed SPR over all channel groups (a scalar, differentiable w.r.t. the model's weights)."""
        return self.penalties().sum()

    def penalties(self) -> torch.Tensor:
        """SPR of each channel group, shape ``(n_groups,)``, aligned with :attr:`groups_`."""
        sq, r = self._penalised_stats()
        return spr_from_stats(sq, r, self.alpha, self._group_lam(sq))

    def _group_lam(self, like: torch.Tensor) -> Union[float, torch.Tensor]:
        """``lam``, or each group's ``lam * kappa_j`` with cost weights (a float when ``lam`` is 0)."""
        if self._lam_weight is None or self.lam == 0.0:
            return self.lam
        return self.lam * self._lam_weight.to(device=like.device, dtype=like.dtype)

    def _cost_weights(self, costs: Any, model: nn.Module, example_inputs: Any) -> np.ndarray | None:
        if costs is None:
            return None
        if isinstance(costs, str):
            values = channel_group_costs(model, self.groups_, example_inputs, kind=costs)
        else:
            try:
                values = np.asarray(costs, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"`costs` must be None, 'macs', 'params' or an array of numbers; got {costs!r}.") from exc
            if values.shape != (self.n_groups,):
                raise ValueError(f"`costs` must have shape ({self.n_groups},), one per channel group; "
                                 f"got shape {values.shape}.")
        if not np.all(np.isfinite(values)) or np.any(values <= 0):
            raise ValueError("`costs` must be finite and > 0 for every channel group.")
        weights = values / values.mean()
        weights.flags.writeable = False
        return weights

    @torch.no_grad()
    def group_norms(self) -> torch.Tensor:
        """L2 norm of each group's penalised weight vector, shape ``(n_groups,)``, detached."""
        return torch.sqrt(self._stats()[0])

    @torch.no_grad()
    def relative_norms(self) -> torch.Tensor:
        """Group norms divided by their layer's root-mean-square group norm :math:`c_L`, detached.

        Within a layer they have mean square 1; a layer with all-zero weights gives zeros. Available
        whether or not the penalty is ``relative``.
        """
        sq = self._stats()[0]
        return torch.sqrt(sq / self._group_scale_sq(self._layer_scale_sq(sq)))

    @torch.no_grad()
    def optimal_y(self) -> torch.Tensor:
        """Relaxed indicator :math:`y^*_j \\in [0, 1]` of each group at the current weights, detached.

        With ``relative=True``, of the scaled weights :math:`w_j / c_L` that the penalty sees.
        """
        sq, r = self._penalised_stats()
        return optimal_y_from_stats(sq, r, self.alpha, self._group_lam(sq))

    def _stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group ``||w||_2^2`` and ``max_i |w_i| / M_i`` by segment reductions over gathered entries."""
        parts = []
        for k, (module, pname, numel) in enumerate(self._sources):
            param = getattr(module, pname)
            if param.numel() != numel:
                raise RuntimeError(
                    f"parameter `{pname}` of a grouped module changed size ({numel} -> {param.numel()}); "
                    "build a new PerspectiveRegularizer after pruning."
                )
            index = getattr(self, f"_index{k}")
            parts.append(param.reshape(-1)[index.to(param.device)])
        vals = torch.cat(parts)
        gid = self._group_id.to(vals.device)
        inv_m = self._inv_m.to(device=vals.device, dtype=vals.dtype)
        sq = vals.new_zeros(self.n_groups).index_add(0, gid, vals * vals)
        r = vals.new_zeros(self.n_groups).scatter_reduce(0, gid, vals.abs() * inv_m, "amax", include_self=True)
        return sq, r

    def _layer_scale_sq(self, sq: torch.Tensor) -> torch.Tensor:
        """Mean squared group norm :math:`c_L^2` of each layer, shape ``(n_layers,)``."""
        layer = self._layer.to(sq.device)
        total = sq.new_zeros(self.n_layers).index_add(0, layer, sq)
        return total / self._layer_size.to(device=sq.device, dtype=sq.dtype)

    def _penalised_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(||v||^2, r(v))`` of the vectors the penalty sees: ``v = w`` or, relative, ``v = w / c_L``."""
        sq, r = self._stats()
        if not self.relative:
            return sq, r
        c_sq = self._layer_scale_sq(sq)
        if self.detach_scale:
            c_sq = c_sq.detach()
        c_sq = self._group_scale_sq(c_sq)
        return sq / c_sq, r / torch.sqrt(c_sq)

    def _group_scale_sq(self, layer_scale_sq: torch.Tensor) -> torch.Tensor:
        """Each group's layer scale :math:`c_L^2`, shape ``(n_groups,)``.

        An all-zero layer has ``sq = r = 0`` in every group, so any positive scale gives ``v = 0``: its
        zero scale is replaced by 1 without routing a gradient through the replaced entries.
        """
        safe = torch.where(layer_scale_sq > 0, layer_scale_sq, torch.ones_like(layer_scale_sq))
        return safe[self._layer.to(layer_scale_sq.device)]

    def _resolve_bounds(self, M: Any, modules: dict[str, nn.Module],
                        penalised: dict[str, set[str]]) -> dict[str, float]:
        names = sorted(penalised)
        if isinstance(M, str):
            if M != "auto":
                raise ValueError(f"`M` must be 'auto', a positive number or a mapping; got {M!r}.")
            bounds = {}
            zero = []
            layers = self._layers_by_module()
            for name in names:
                peak = max(float(getattr(modules[name], pn).detach().abs().max()) for pn in penalised[name])
                if peak == 0.0:
                    zero.append(name)
                bounds[name] = self.m_scale * peak / self._scale_of(name, layers) if peak > 0 else math.inf
            if zero:
                warnings.warn(f"`M='auto'`: layers {zero} have all-zero weights; no bound (M = inf) for them.",
                              stacklevel=3)
            return bounds
        if isinstance(M, Mapping):
            unknown = sorted(set(M) - set(modules))
            if unknown:
                raise ValueError(f"`M` names modules not in the model: {unknown}.")
            missing = [n for n in names if n not in M]
            if missing:
                raise ValueError(f"`M` must give a bound for every penalised layer; missing {missing}.")
            return {n: _check_bound(M[n], f"M[{n!r}]") for n in names}
        return {n: _check_bound(M, "M") for n in names}

    def _layers_by_module(self) -> dict[str, set[int]]:
        """Penalised module name -> the layers (dependency groups) holding its entries, in one pass."""
        layers: dict[str, set[int]] = {}
        for j, group in enumerate(self.groups_):
            for m in group.members:
                if m.penalized:
                    layers.setdefault(m.module, set()).add(int(self.layer_of_group_[j]))
        return layers

    def _scale_of(self, module: str, layers: dict[str, set[int]]) -> float:
        """The construction-time :math:`c_L` of the one layer whose groups hold ``module``'s entries (1 if not relative)."""
        if self.scales_ is None:
            return 1.0
        held = layers.get(module, set())
        if len(held) != 1:  # a penalised producer belongs to exactly one dependency group
            raise ValueError(f"`relative=True`: module {module!r} has entries in {len(held)} layers; "
                             "give `M` explicitly (in relative units).")
        scale = float(self.scales_[next(iter(held))])
        return scale if scale > 0 else 1.0


def _check_bound(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value) or value <= 0:
        raise ValueError(f"`{name}` must be a number > 0 (inf allowed, meaning no bound); got {value!r}.")
    return float(value)
