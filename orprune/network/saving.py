"""Save a pruned model so that it loads in a fresh process with plain ``torch.load``.

``torch.save(model)`` pickles the module's class by reference: loading needs the class importable
under the same name and ``weights_only=False`` (unsafe on untrusted files, and not the default
since torch 2.6). :func:`save` writes only tensors, numbers and strings: the state dict and each
module's pruned widths. :func:`load` re-applies those widths to a freshly built instance of the
same architecture (the user's own class, at its original width) and loads the weights.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["FORMAT", "load", "save"]

#: The ``format`` entry of a file written by :func:`save`.
FORMAT = "orprune.pruned/1"
#: Module attributes that hold widths (what channel pruning changes), saved when present.
_WIDTHS = ("in_channels", "out_channels", "in_features", "out_features", "num_features", "num_channels",
           "num_groups", "groups", "normalized_shape", "embed_dim")


def _widths(module: nn.Module) -> dict[str, Any]:
    out = {}
    for name in _WIDTHS:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            out[name] = value
        elif isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
            out[name] = list(value)
    return out


def save(model: nn.Module, path: str | os.PathLike, *, extra: Mapping[str, Any] | None = None) -> None:
    """Write ``model`` (e.g. ``PruneResult.model``) as a state dict plus its modules' widths.

    The file loads with ``torch.load(path)`` (weights only) as a dict; :func:`load` turns it back
    into a module. ``extra`` (plain numbers / strings / lists / dicts) is stored as ``"extra"``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    cls = type(model)
    torch.save({
        "format": FORMAT,
        "class": f"{cls.__module__}:{cls.__qualname__}",
        "widths": {name: w for name, m in model.named_modules() if (w := _widths(m))},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": dict(extra or {}),
    }, path)


def _read(path: str | os.PathLike) -> dict[str, Any]:
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)} was not written by orprune.save (no {FORMAT!r} format entry).")
    return data


def _build(qualified: str) -> nn.Module:
    module_name, _, qualname = qualified.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj()
    except Exception as exc:
        raise ValueError(
            f"cannot rebuild {qualified} by itself ({type(exc).__name__}: {exc}); pass `model=`, an instance of "
            "the unpruned architecture, e.g. orprune.load(path, MyNet()).") from exc


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """The pruned model saved by :func:`save`, in eval mode.

    Parameters
    ----------
    path : path
    model : nn.Module, optional
        An instance of the architecture before pruning (any width, any weights): its modules are
        narrowed to the saved widths and the saved weights loaded into it (in place). Default: the
        saved class built without arguments, which works for classes importable here whose
        constructor needs no arguments.
    """
    data = _read(path)
    model = _build(data["class"]) if model is None else model
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    modules = dict(model.named_modules())
    missing = sorted(set(data["widths"]) - set(modules))
    if missing:
        raise ValueError(f"`model` has no module(s) {missing[:5]} of the saved {data['class']}: pass an instance of "
                         "the architecture that was pruned.")
    for name, widths in data["widths"].items():
        for attr, value in widths.items():
            setattr(modules[name], attr, tuple(value) if isinstance(value, list) else value)
    for key, tensor in data["state_dict"].items():
        owner_name, _, attr = key.rpartition(".")
        owner = modules.get(owner_name)
        current = getattr(owner, attr, None) if owner is not None else None
        if isinstance(current, torch.Tensor) and current.shape != tensor.shape:
            resized = torch.empty_like(tensor, dtype=current.dtype)
            if isinstance(current, nn.Parameter):
                setattr(owner, attr, nn.Parameter(resized, requires_grad=current.requires_grad))
            else:
                setattr(owner, attr, resized)
    try:
        model.load_state_dict(data["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ValueError(f"the saved weights do not fit `model` ({type(model).__name__}): {exc}") from exc
    return model.eval()
