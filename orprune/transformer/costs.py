"""Params and MACs of a transformer as linear functions of the units' keep counts.

One kept channel of a unit costs the weights (and biases) of its rows in q/k/v or gate/up/fc1 and
of its columns in the output projection; every other parameter is a constant. MACs are those of
one sequence of ``seq_len`` tokens: ``seq_len`` times the unit's weights, plus for attention
``2 * heads * head_dim * seq_len^2`` (scores and weighted values, without causal halving).
"""

from __future__ import annotations

from torch import nn

from orprune.network.cost_model import CostModel
from orprune.transformer.adapters import HEADS, TransformerUnit, is_conv1d, weight_out_in

__all__ = ["unit_costs"]


def _per_channel(model: nn.Module, unit: TransformerUnit) -> tuple[int, int]:
    """(params, weight MACs per token) of one channel of ``unit``."""
    params = macs = 0
    for module_name, _offset, size in unit.rows:
        module = model.get_submodule(module_name)
        n_in = weight_out_in(module).shape[1]
        params += size * (n_in + (getattr(module, "bias", None) is not None))
        macs += size * n_in
    n_out = weight_out_in(model.get_submodule(unit.out)).shape[0]
    params += unit.group_size * n_out
    macs += unit.group_size * n_out
    return params, macs


def unit_costs(model: nn.Module, units: list[TransformerUnit], seq_len: int = 1) -> dict[str, CostModel]:
    """``{"params": CostModel, "macs": CostModel}`` over the units' keep counts (exact at full width)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"`seq_len` must be a positive integer, got {seq_len!r}.")
    total_params = sum(p.numel() for p in model.parameters())
    unit_modules = {m for u in units for m, _, _ in u.rows} | {u.out for u in units}
    other_macs = sum(weight_out_in(m).numel() for name, m in model.named_modules()
                     if (isinstance(m, nn.Linear) or is_conv1d(m)) and name not in unit_modules)
    params, macs = {}, {}
    for unit in units:
        p, m = _per_channel(model, unit)
        params[unit.name] = float(p)
        attention = 2 * unit.heads_per_channel * unit.head_dim * seq_len**2 if unit.kind == HEADS else 0
        macs[unit.name] = float(seq_len * m + attention)
    constant = total_params - sum(params[u.name] * u.n_channels for u in units)
    return {"params": CostModel(constant=float(constant), linear=params),
            "macs": CostModel(constant=float(seq_len * other_macs), linear=macs)}
