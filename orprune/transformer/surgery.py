"""Surgery on transformer units: slice rows and columns, write refit weights, update head counts.

:func:`apply_updates` removes the dropped channels of each unit (rows of q/k/v or gate/up/fc1,
columns of o_proj or down_proj/fc2) and writes new output-projection weights and biases;
``mask=True`` instead keeps every shape and only writes the weights (the dropped columns are zero),
which gives the same outputs: the masked model the tests compare against.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from orprune.transformer.adapters import TransformerUnit, find_units, is_conv1d, weight_out_in
from orprune.transformer.torch_attention import split_attention

__all__ = ["UnitUpdate", "apply_updates", "kept_widths", "restore_widths", "WIDTHS_ATTRIBUTE"]

#: Name of the config attribute that records each unit's kept channel count (saved in config.json).
WIDTHS_ATTRIBUTE = "orprune_widths"


@dataclass(frozen=True)
class UnitUpdate:
    """What pruning does to one unit.

    Attributes
    ----------
    kept : ndarray of int
        Kept channels, increasing.
    weight : ndarray or None, shape (out_features, n_channels * group_size)
        New weight of the output projection in ``(out, in)`` layout over *all* input columns
        (those of dropped channels zero); ``None`` keeps the old weights of the kept columns.
    bias : ndarray or None, shape (out_features,)
        New bias of the output projection (added when the module had none); ``None`` keeps it.
    """

    kept: np.ndarray
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None


def _rows(unit: TransformerUnit, module_name: str, kept: np.ndarray) -> torch.Tensor:
    parts = [offset + kept[:, None] * size + np.arange(size) for m, offset, size in unit.rows if m == module_name]
    return torch.as_tensor(np.concatenate([p.ravel() for p in parts]), dtype=torch.long)


def _columns(unit: TransformerUnit, kept: np.ndarray) -> torch.Tensor:
    return torch.as_tensor((kept[:, None] * unit.group_size + np.arange(unit.group_size)).ravel(), dtype=torch.long)


def _set_weight(module: nn.Module, weight_oi: torch.Tensor) -> None:
    """Replace the weight given in ``(out, in)`` layout and update the size attributes."""
    weight_oi = weight_oi.detach()
    data = weight_oi.T.contiguous() if is_conv1d(module) else weight_oi.contiguous()
    module.weight = nn.Parameter(data, requires_grad=module.weight.requires_grad)
    if is_conv1d(module):
        module.nf = weight_oi.shape[0]
    else:
        module.out_features, module.in_features = weight_oi.shape


def _set_bias(module: nn.Module, bias: torch.Tensor | None) -> None:
    if bias is None:
        return
    if getattr(module, "bias", None) is None:
        module.bias = nn.Parameter(bias.detach().clone())
    else:
        module.bias = nn.Parameter(bias.detach().clone(), requires_grad=module.bias.requires_grad)


def _slice_rows(module: nn.Module, rows: torch.Tensor) -> None:
    bias = module.bias[rows] if getattr(module, "bias", None) is not None else None
    _set_weight(module, weight_out_in(module)[rows])
    _set_bias(module, bias)


def _write_out(module: nn.Module, unit: TransformerUnit, update: UnitUpdate, mask: bool) -> None:
    old = weight_out_in(module)
    like = dict(dtype=old.dtype, device=old.device)
    full = old.clone() if update.weight is None else torch.as_tensor(update.weight, **like)
    if mask:
        dropped = np.setdiff1d(np.arange(unit.n_channels), update.kept)
        full = full.clone()
        full[:, _columns(unit, dropped)] = 0
        _set_weight(module, full)
    else:
        _set_weight(module, full[:, _columns(unit, update.kept)])
    if update.bias is not None:
        _set_bias(module, torch.as_tensor(update.bias, **like))


def _set_head_counts(attention: nn.Module, unit: TransformerUnit, k: int) -> None:
    """The attributes each architecture's forward reads (LLaMA infers the count from the shapes)."""
    width = k * unit.heads_per_channel * unit.head_dim
    for attr, value in (("num_heads", k * unit.heads_per_channel), ("num_attention_heads", k * unit.heads_per_channel),
                        ("num_key_value_heads", k), ("all_head_size", width), ("split_size", width)):
        if isinstance(getattr(attention, attr, None), int):
            setattr(attention, attr, value)


def apply_updates(model: nn.Module, units: list[TransformerUnit], updates: Mapping[str, UnitUpdate], *,
                  mask: bool = False) -> nn.Module:
    """Apply ``updates`` (unit name -> :class:`UnitUpdate`) to ``model`` in place and return it.

    With ``mask=False`` the dropped channels are removed, head-count attributes and
    ``model.config.orprune_widths`` updated; with ``mask=True`` only the output projections change.
    """
    by_name = {u.name: u for u in units}
    unknown = set(updates) - set(by_name)
    if unknown:
        raise ValueError(f"`updates` names unknown units {sorted(unknown)}.")
    with torch.no_grad():
        for name, update in updates.items():
            unit = by_name[name]
            kept = np.unique(np.asarray(update.kept, dtype=int))
            if kept.size and (kept[0] < 0 or kept[-1] >= unit.n_channels):
                raise ValueError(f"`updates[{name!r}].kept` must index 0..{unit.n_channels - 1}.")
            update = UnitUpdate(kept, update.weight, update.bias)
            _write_out(model.get_submodule(unit.out), unit, update, mask)
            if mask:
                continue
            for module_name in dict.fromkeys(m for m, _, _ in unit.rows):
                _slice_rows(model.get_submodule(module_name), _rows(unit, module_name, kept))
            if unit.attention is not None:
                _set_head_counts(model.get_submodule(unit.attention), unit, kept.size)
    if not mask:
        _record_widths(model, {name: int(np.unique(u.kept).size) for name, u in updates.items()})
    return model


def _record_widths(model: nn.Module, widths: Mapping[str, int]) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    recorded = dict(getattr(config, WIDTHS_ATTRIBUTE, None) or {})
    recorded.update(widths)
    setattr(config, WIDTHS_ATTRIBUTE, recorded)


def kept_widths(model: nn.Module) -> dict[str, int]:
    """Kept channels of every unit of ``model`` as its shapes say (unit name -> count)."""
    return {u.name: u.n_channels for u in find_units(model)}


def restore_widths(model: nn.Module, widths: Mapping[str, int] | None = None,
                   state_dict: Mapping[str, Any] | None = None) -> nn.Module:
    """Shrink a freshly built ``model`` to the pruned ``widths`` (default: its config's
    ``orprune_widths``), then load ``state_dict`` if given.

    Every ``nn.MultiheadAttention`` is first replaced by its :class:`SplitMultiheadAttention`
    (as the pruner did). The first ``k`` channels of each unit are kept (their values are overwritten by the state
    dict); output projections gain a bias where ``state_dict`` has one (baselines that compensate
    with a bias add it to bias-free layers).
    """
    if widths is None:
        widths = getattr(getattr(model, "config", None), WIDTHS_ATTRIBUTE, None)
        if widths is None:
            raise ValueError("`widths` is None and `model.config` records no `orprune_widths`.")
    units = find_units(split_attention(model))
    by_name = {u.name: u for u in units}
    missing = set(widths) - set(by_name)
    if missing:
        raise ValueError(f"`widths` names units the model does not have: {sorted(missing)}.")
    updates = {}
    for name, k in widths.items():
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= by_name[name].n_channels:
            raise ValueError(f"`widths[{name!r}]` must be an integer in [1, {by_name[name].n_channels}] (a unit "
                             f"never loses every channel), got {k!r}.")
        updates[name] = UnitUpdate(np.arange(int(k)))
    apply_updates(model, units, updates)
    if state_dict is not None:
        with torch.no_grad():
            for unit in units:
                key = f"{unit.out}.bias"
                module = model.get_submodule(unit.out)
                if key in state_dict and getattr(module, "bias", None) is None:
                    module.bias = nn.Parameter(torch.zeros_like(torch.as_tensor(state_dict[key])))
        model.load_state_dict(state_dict)
    return model
