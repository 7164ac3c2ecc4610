"""Factorized surgery: a layer of rank-``r`` map ``W = left @ right`` becomes two thinner layers.

* ``Conv2d`` (``groups=1``), channel-wise scheme: a ``kh x kw`` conv from ``C`` to ``r`` channels with the
  original stride, padding and dilation (weights ``left``), then a 1x1 conv from ``r`` to ``N`` channels
  (weights ``right``, the bias). In the layout of :func:`~orprune.network.graph.weight_matrix` the composite
  computes exactly ``X (left @ right)`` on the unfolded patches ``X``.
* ``Linear``: ``Linear(in, r, bias=False)`` then ``Linear(r, out)``.

The two layers replace the original under its name, as an ``nn.Sequential`` (children ``0`` and ``1``).
:func:`reconstructed_copy` writes ``left @ right`` into the original layers instead: both give the same
outputs (up to rounding), the factorized one with ``P r (C kh kw + N)`` instead of ``P C kh kw N`` MACs.
A new bias for a layer that has none is folded into the BatchNorm that alone reads the layer's output
(``norms``, from :func:`following_norms`), as :mod:`orprune.network.surgery` does, else it becomes the
second layer's bias. See ``formulations/low_rank.md``, section 6.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from orprune.network.graph import _following_norm, build_dependency_graph, set_weight_matrix, weight_matrix

__all__ = ["LayerFactors", "apply_factorization", "balanced", "factorizable_layers", "factorized_layer",
           "following_norms", "reconstructed_copy"]


def _array(value: Any, name: str, ndim: int) -> torch.Tensor:
    try:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().to(torch.float64, copy=True)
        else:  # a copy: the caller keeps its array
            t = torch.from_numpy(np.array(value, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"`{name}` must be a numeric array.") from exc
    if t.ndim != ndim:
        raise ValueError(f"`{name}` must have {ndim} dimensions, got shape {tuple(t.shape)}.")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"`{name}` must be finite; it holds NaN or inf values.")
    return t


@dataclass(frozen=True)
class LayerFactors:
    """A layer's rank-``r`` map and bias.

    Attributes
    ----------
    left : array_like, shape (C*g, r)
        First factor, layout of :func:`~orprune.network.graph.weight_matrix` (``RankSelection.left``).
    right : array_like, shape (r, n_out)
        Second factor (``RankSelection.right``).
    bias : array_like, shape (n_out,), optional
        The new bias (for a centred problem ``old_bias + mean_y - mean_x @ (left @ right)``); None
        keeps the layer's bias.
    """

    left: Any
    right: Any
    bias: Any = None

    def __post_init__(self) -> None:
        left, right = _array(self.left, "left", 2), _array(self.right, "right", 2)
        if left.shape[1] != right.shape[0] or left.shape[1] < 1:
            raise ValueError(f"`left` (n, r) and `right` (r, n_out) must share a rank r >= 1, got shapes "
                             f"{tuple(left.shape)} and {tuple(right.shape)}.")
        object.__setattr__(self, "left", left)
        object.__setattr__(self, "right", right)
        if self.bias is not None:
            bias = _array(self.bias, "bias", 1)
            if bias.shape[0] != right.shape[1]:
                raise ValueError(f"`bias` must have {right.shape[1]} entries, got {bias.shape[0]}.")
            object.__setattr__(self, "bias", bias)

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    @property
    def weights(self) -> torch.Tensor:
        return self.left @ self.right


def _check_layer(module: nn.Module, name: str) -> None:
    ok = isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)
    if not ok:
        raise ValueError(f"layer {name!r} is a {type(module).__name__}; only Linear and Conv2d with groups=1 "
                         "can be factorized.")


def factorizable_layers(model: nn.Module, ignored_layers: Any = ()) -> list[str]:
    """Names of the ``Linear`` and ``Conv2d`` (``groups=1``) modules of ``model``, in module order."""
    names = {m: n for n, m in model.named_modules()}
    ignored = set()
    for layer in ignored_layers:
        if not isinstance(layer, str) and layer not in names:
            raise ValueError("`ignored_layers` must hold modules of `model` or their qualified names.")
        ignored.add(layer if isinstance(layer, str) else names[layer])
    out = []
    for name, module in model.named_modules():
        if any(name == i or name.startswith(i + ".") or i == "" for i in ignored):
            continue
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1):
            out.append(name)
    return out


def balanced(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product ``left @ right`` with each rank component's two factors of equal norm.

    ``select_rank`` whitens the intermediate channels against the *summed* Gram matrix, so its left factor is
    of order ``1 / sqrt(samples)`` and its right factor of order ``sqrt(samples)``: a function-preserving
    rescaling ``left_t * d_t``, ``right_t / d_t`` with ``d_t = sqrt(||right_t|| / ||left_t||)`` keeps SGD on
    the two layers well conditioned (a fine-tune of the unbalanced form diverges). Zero components stay.
    """
    a, b = left.norm(dim=0), right.norm(dim=1)
    d = torch.where((a > 0) & (b > 0), (b / torch.where(a > 0, a, 1.0)).sqrt(), torch.ones_like(a))
    return left * d, right / d[:, None]


def factorized_layer(module: nn.Module, factors: LayerFactors, *, bias: bool | None = None) -> nn.Sequential:
    """The two-layer replacement of ``module`` for ``factors`` (see the module docstring).

    ``bias``: whether the second layer has a bias (default: when ``module`` has one or ``factors``
    gives one). Its value is ``factors.bias``, else the module's bias, else zero. The two weights are the
    :func:`balanced` split of ``left @ right`` (the same map).
    """
    _check_layer(module, type(module).__name__)
    if not isinstance(factors, LayerFactors):
        raise ValueError(f"`factors` must be LayerFactors, got {type(factors).__name__}.")
    n, n_out = weight_matrix(module).shape
    if tuple(factors.weights.shape) != (n, n_out):
        raise ValueError(f"`factors` give a ({factors.left.shape[0]}, {factors.right.shape[1]}) map; the layer "
                         f"needs ({n}, {n_out}).")
    ref, r = module.weight, factors.rank
    left, right = balanced(factors.left, factors.right)
    has_bias = (module.bias is not None or factors.bias is not None) if bias is None else bool(bias)
    if isinstance(module, nn.Linear):
        first, second = nn.Linear(n, r, bias=False), nn.Linear(r, n_out, bias=has_bias)
        w1, w2 = left.T, right.T
    else:
        first = nn.Conv2d(module.in_channels, r, module.kernel_size, module.stride, module.padding,
                          module.dilation, bias=False, padding_mode=module.padding_mode)
        second = nn.Conv2d(r, n_out, 1, bias=has_bias)
        w1 = left.T.reshape(r, module.in_channels, *module.kernel_size)
        w2 = right.T.reshape(n_out, r, 1, 1)
    first, second = first.to(ref), second.to(ref)
    with torch.no_grad():
        first.weight.copy_(w1.to(ref))
        second.weight.copy_(w2.to(ref))
        if has_bias:
            value = factors.bias if factors.bias is not None else module.bias
            second.bias.copy_(value.to(ref) if value is not None else torch.zeros(n_out))
    return nn.Sequential(first, second).train(module.training)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _check(model: nn.Module, factors: Mapping[str, LayerFactors], norms: Mapping[str, str] | None) -> dict:
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(factors, Mapping) or not all(isinstance(f, LayerFactors) for f in factors.values()):
        raise ValueError("`factors` must map layer names to LayerFactors.")
    for name in factors:
        try:
            _check_layer(model.get_submodule(name), name)
        except AttributeError as exc:
            raise ValueError(f"`factors` names {name!r}, which is not a module of `model`.") from exc
    return dict(norms or {})


def _fold_bias(model: nn.Module, name: str, module: nn.Module, bias: torch.Tensor, norms: Mapping[str, str]) -> bool:
    """Fold a new bias of a bias-free layer into its BatchNorm (``BN(y + b) = BN'(y)``, ``mu' = mu - b``)."""
    if module.bias is not None or name not in norms:
        return False
    norm = model.get_submodule(norms[name])
    with torch.no_grad():
        norm.running_mean.sub_(bias.to(norm.running_mean))
    return True


def apply_factorization(model: nn.Module, factors: Mapping[str, LayerFactors],
                        norms: Mapping[str, str] | None = None) -> nn.Module:
    """A copy of ``model`` whose layers named in ``factors`` are replaced by their two-layer form.

    Parameters
    ----------
    model : nn.Module
        Not modified.
    factors : mapping layer name -> LayerFactors
    norms : mapping layer name -> BatchNorm name, optional
        The BatchNorm that alone reads a layer's output (:func:`following_norms`): a new bias of a
        bias-free layer goes into its running mean instead of a new parameter.
    """
    norms = _check(model, factors, norms)
    model = copy.deepcopy(model)
    for name, f in factors.items():
        module = model.get_submodule(name)
        if f.bias is not None and _fold_bias(model, name, module, f.bias, norms):
            _replace(model, name, factorized_layer(module, LayerFactors(f.left, f.right), bias=False))
        else:
            _replace(model, name, factorized_layer(module, f))
    return model


def reconstructed_copy(model: nn.Module, factors: Mapping[str, LayerFactors],
                       norms: Mapping[str, str] | None = None) -> nn.Module:
    """A copy of ``model`` with ``left @ right`` (and the bias) written into the original layers: same
    architecture, same function as :func:`apply_factorization`'s result."""
    norms = _check(model, factors, norms)
    model = copy.deepcopy(model)
    for name, f in factors.items():
        module = model.get_submodule(name)
        set_weight_matrix(module, f.weights)
        if f.bias is None or _fold_bias(model, name, module, f.bias, norms):
            continue
        if module.bias is not None:
            with torch.no_grad():
                module.bias.copy_(f.bias.to(module.bias))
        else:
            module.bias = nn.Parameter(f.bias.to(module.weight))
    return model


def following_norms(model: nn.Module, example_inputs: Any, layers: Any = None) -> dict[str, str]:
    """Layer name -> the BatchNorm that alone reads its output (for bias folding), from one trace."""
    names = {m: n for n, m in model.named_modules()}
    dg, _ = build_dependency_graph(model, example_inputs)
    wanted = set(factorizable_layers(model) if layers is None else layers)
    out = {}
    for module, name in names.items():
        if name in wanted and module in dg.module2node:
            norm = _following_norm(dg, module, names)
            if norm is not None:
                out[name] = norm
    return out
