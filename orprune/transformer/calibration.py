"""Calibration of transformer units: statistics of each output projection's input and output.

Forward hooks on every unit's output projection (o_proj, down_proj, c_proj, output.dense) collect
its input ``X`` (one row per token) and its output without bias ``Y``, from the model they are
given (the original model: design.md, section 3), into one :class:`StatisticsAccumulator` each.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from orprune.layer.problem import StatisticsAccumulator
from orprune.transformer.adapters import TransformerUnit, weight_out_in

__all__ = ["run_model", "collect_unit_statistics", "projection_hooks"]


def run_model(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple/list, else ``model(batch)``."""
    if isinstance(batch, dict) or (hasattr(batch, "keys") and hasattr(batch, "__getitem__")):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@contextlib.contextmanager
def projection_hooks(model: nn.Module, units: list[TransformerUnit], inputs: bool = True,
                     outputs: bool = True) -> Iterator[dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]]]:
    """Record ``(X, Y - bias)`` of every unit's output projection while the context is open."""
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]] = {u.name: [] for u in units}
    handles = []

    def hook(name: str, module: nn.Module):
        def record(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])
            y = None
            if outputs:
                y = output.detach().reshape(-1, output.shape[-1])
                if getattr(module, "bias", None) is not None:
                    y = y - module.bias.detach()
            seen[name].append((x if inputs else None, y))
        return record

    try:
        for unit in units:
            module = model.get_submodule(unit.out)
            handles.append(module.register_forward_hook(hook(unit.name, module)))
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def collect_unit_statistics(model: nn.Module, units: list[TransformerUnit],
                            batches: Iterable[Any]) -> dict[str, StatisticsAccumulator]:
    """One accumulator per unit over all ``batches`` (``X``: the projection's input, ``Y``: its output
    without bias), with ``model`` in eval mode and without gradients."""
    accs = {}
    for unit in units:
        n_out, n_in = weight_out_in(model.get_submodule(unit.out)).shape
        accs[unit.name] = StatisticsAccumulator(n_in, n_out)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), projection_hooks(model, units) as seen:
            for batch in batches:
                run_model(model, batch)
                for name, pairs in seen.items():
                    for x, y in pairs:
                        accs[name].update(x, y)
                    pairs.clear()
    finally:
        model.train(was_training)
    if any(acc.n_samples == 0 for acc in accs.values()):
        raise ValueError("`batches` is empty or never reached a unit's output projection.")
    return accs
