r"""Measured latency of a network as a table over the keep counts of its units.

Every module whose channels a unit prunes (conv, Linear, BatchNorm, activations, pooling) is rebuilt at
each width its units' keep options give it and timed on an input of its real shape at the user's batch
size and thread count; a conv is timed at every pair (input option, output option), since its time
depends on both. The network's latency is then

.. math:: L(k) = s \Big(\sum_j t_j[k_j] + \sum_{(i,j)} T_{ij}[k_i, k_j]\Big),
    \qquad s = L_\text{measured} / (\text{the sum at full width}),

a :class:`~orprune.network.cost_model.TableCost`. What the per-module times leave of the whole model's
measured time (functional ops, residual adds, Python dispatch) is spread over the tables in proportion, so
that the tables sum to the measured latency at full width. The model, what is exact and what is not, is in
``formulations/latency_tables.md``. Timings are cached on disk, keyed by the
device, torch version, thread count, batch size and every module's shape.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import skip_init
from torch_pruning.ops import OPTYPE
from tqdm.auto import tqdm

from orprune.network.cost_model import TableCost
from orprune.network.costs import _NORMS, _POOLS, _Channels, _recorder
from orprune.network.graph import PruningGraph, build_dependency_graph, call_model
from orprune.network.timing import call_times, fastest_time, torch_threads

__all__ = ["LatencyModel", "call_times", "default_cache_dir", "fastest_time", "latency_tables", "torch_threads"]

#: Modules that are the same object at any width (no per-channel state).
_STATELESS = (nn.ReLU, nn.ELU, nn.LeakyReLU, nn.ReLU6, nn.GELU, nn.Upsample) + _POOLS


@dataclass(frozen=True)
class _Side:
    """A module's input or output width: ``const + mult * k_unit`` (``unit`` None: fixed at ``const``)."""

    unit: str | None
    const: float
    mult: float

    def at(self, k: float) -> int:
        return int(round(self.const + self.mult * k))


@dataclass(frozen=True)
class _Timed:
    """One module call whose cost a table holds."""

    name: str
    module: nn.Module
    kind: str  # "conv", "depthwise", "linear", "channel" (norms, activations, pools)
    shape: tuple[int, ...]  # its input at the user's batch size
    inp: _Side
    out: _Side


def _side(affine: Any) -> _Side | None:
    """One unit at most: a width fed by two units (a concatenation) is not tabulated."""
    if len(affine.coef) > 1:
        return None
    (unit, mult), = affine.coef.items() if affine.coef else ((None, 0.0),)
    return _Side(unit, affine.const, mult)


def _cell(t: _Timed, c_in: int, c_out: int) -> tuple[nn.Module, tuple[int, ...]]:
    """The module of ``t`` rebuilt with ``c_in`` input and ``c_out`` output channels, and its input shape.

    Weights are slices of the real ones (no uninitialised memory, whose denormals would slow the kernels).
    """
    m = t.module
    if t.kind in ("conv", "depthwise"):
        groups = c_out if t.kind == "depthwise" else 1
        new = skip_init(type(m), c_in, c_out, m.kernel_size, stride=m.stride, padding=m.padding,
                        dilation=m.dilation, groups=groups, bias=m.bias is not None, padding_mode=m.padding_mode)
        shape = (t.shape[0], c_in, *t.shape[2:])
    elif t.kind == "linear":
        new = skip_init(nn.Linear, c_in, c_out, bias=m.bias is not None)
        shape = (*t.shape[:-1], c_in)
    else:
        shape = (t.shape[0], c_out, *t.shape[2:])
        if isinstance(m, _STATELESS):
            return m, shape
        new = type(m)(c_out, eps=m.eps, momentum=m.momentum, affine=m.affine,
                      track_running_stats=m.track_running_stats)
    with torch.no_grad():
        for name, value in m.state_dict().items():
            if name in new.state_dict() and value.dim() > 0:
                index = tuple(slice(0, n) for n in new.state_dict()[name].shape)
                new.state_dict()[name].copy_(value[index])
    return new.eval(), shape


def _signature(module: nn.Module, shape: tuple[int, ...]) -> str:
    """A cell's cache key: the rebuilt module's description and its input shape (module names left out, so
    layers of the same shape share their cells)."""
    return f"{module!r}|{list(shape)}|float32"


def _timed_calls(model: nn.Module, graph: PruningGraph, example: Any, batch_size: int) -> tuple[list[_Timed], list]:
    """Every module call a unit's keep count changes, and those whose widths cannot be tabulated."""
    calls: list[tuple[nn.Module, tuple, tuple, Any]] = []
    batches: list[int] = []
    dg, _ = build_dependency_graph(model, example, during_forward=_recorder(calls, batches))
    ch = _Channels(dg, model, graph)
    scale = batch_size / (batches[0] if batches else 1)
    names = {m: n for n, m in model.named_modules()}
    timed, loose = [], []
    for module, in_shapes, out_shape, grad_fn in calls:
        node = ch.nodes.get(module) or ch.by_grad_fn.get(grad_fn)
        if node is None or not in_shapes or len(in_shapes[0]) < 2:
            continue
        shape = (max(1, int(round(in_shapes[0][0] * scale))), *in_shapes[0][1:])
        name = names.get(module, type(module).__name__)
        kind = None
        if isinstance(module, nn.modules.conv._ConvNd):
            if node.type == OPTYPE.DEPTHWISE_CONV and module.in_channels == module.out_channels:
                kind, inp, out = "depthwise", ch.out_of(node, module.out_channels), ch.out_of(node, module.out_channels)
            elif module.groups == 1:
                kind, inp, out = "conv", ch.in_of(node, module.in_channels), ch.out_of(node, module.out_channels)
        elif isinstance(module, nn.Linear):
            kind, inp, out = "linear", ch.in_of(node, module.in_features), ch.out_of(node, module.out_features)
        elif isinstance(module, (nn.modules.batchnorm._BatchNorm, *_STATELESS)):
            kind = "channel"
            inp = out = ch.out_of(node, (in_shapes[0] if isinstance(module, _NORMS + _POOLS) else out_shape)[1])
        if kind is None:  # another module: held constant, said so when a unit changes its width
            if node in ch.out or node in ch.inp:
                loose.append(name)
            continue
        if inp.constant and out.constant:
            continue  # no unit changes it: part of the constant
        sides = _side(inp), _side(out)
        if None in sides:
            loose.append(name)
            continue
        timed.append(_Timed(name, module, kind, shape, *sides))
    return timed, loose


def _device_name() -> str:
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    return f"cpu {name} {platform.machine()} {capability}"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/orprune/latency`` (``~/.cache/orprune/latency``)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "orprune" / "latency"


@dataclass(frozen=True)
class LatencyModel:
    """Measured latency tables of a network.

    Attributes
    ----------
    cost : TableCost
        Seconds per call at the batch size, over the units' keep options; ``cost.evaluate(full widths)``
        equals ``full``.
    full : float
        Measured seconds per call of the whole unpruned model.
    tabulated : float
        Sum of the per-module times at full width; ``cost`` is the tables times ``full / tabulated``.
    batch_size, threads : int
    modules : tuple of str
        Modules whose latency the tables hold.
    untabulated : tuple of str
        Modules a unit changes but the tables do not hold (a width set by several units, as after a
        concatenation; grouped convs, GroupNorm, PReLU): held at their full-width time in the constant.
    measured, cached : int
        Table cells timed now and read from the cache.
    cache_file : str or None
    """

    cost: TableCost
    full: float
    tabulated: float
    batch_size: int
    threads: int
    modules: tuple[str, ...]
    untabulated: tuple[str, ...]
    measured: int
    cached: int
    cache_file: str | None

    def predict(self, keep: Mapping[str, int]) -> float:
        """Predicted seconds per call at ``keep`` (every unit's count one of its options)."""
        return self.cost.evaluate(keep)


def _check_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return value


def latency_tables(
    model: nn.Module,
    graph: PruningGraph,
    inputs: torch.Tensor,
    options: Mapping[str, np.ndarray],
    *,
    threads: int = 1,
    repeats: int = 5,
    cache_dir: str | Path | None | bool = None,
    timer: Callable[[nn.Module, torch.Tensor], float] | None = None,
    progress: bool = True,
) -> LatencyModel:
    """Measure the latency of ``model`` on ``inputs`` as tables over the keep ``options`` of its units.

    Parameters
    ----------
    model : nn.Module
        The unpruned model (on the CPU; not modified).
    graph : PruningGraph
        Its units (:func:`orprune.find_groups`).
    inputs : Tensor
        A batch of the size latency is wanted for (its first dimension is the batch size).
    options : mapping unit -> 1-D array of int
        Keep counts of each unit (the tables' rows and columns); every unit of ``graph``.
    threads : int, default 1
        Torch intra-op threads while timing.
    repeats : int, default 5
        Timed calls per table cell (after one warm-up call); the fastest is kept.
    cache_dir : path, None or False
        Where timings are cached (None: :func:`default_cache_dir`; False: no cache). One file per device,
        torch version, thread count, batch size and timer settings; each cell is keyed by its module's
        shape, so layers and networks of the same shapes share cells.
    timer : callable (module, input) -> seconds, optional
        Replaces :func:`fastest_time` (tests pass a deterministic one).
    progress : bool

    Returns
    -------
    LatencyModel
    """
    if not isinstance(graph, PruningGraph):
        raise ValueError(f"`graph` must be a PruningGraph from `find_groups`, got {type(graph).__name__}.")
    if not torch.is_tensor(inputs) or inputs.dim() < 1:
        raise ValueError("`inputs` must be a tensor whose first dimension is the batch.")
    threads, repeats = _check_int(threads, "threads"), _check_int(repeats, "repeats")
    missing = [u for u in graph.names if u not in options]
    if missing:
        raise ValueError(f"`options` lacks the units {missing}.")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("`model` must be on the CPU: latency tables are measured on the CPU only.")
    batch_size = int(inputs.shape[0])
    model = model.eval()
    timed, loose = _timed_calls(model, graph, inputs[:1], batch_size)
    if loose:
        warnings.warn(f"the latency of {sorted(set(loose))} is held at its full-width value (a width set by several "
                      "units, or a module the tables do not rebuild).", UserWarning, stacklevel=2)
    full_width = {u.name: u.n_channels for u in graph.units}
    opts = {u: np.asarray(options[u], dtype=np.int64) for u in graph.names}

    def widths(t: _Timed, k_in: float, k_out: float) -> tuple[int, int]:
        return t.inp.at(k_in), t.out.at(k_out)

    # every cell: one per module and pair of options (a 1-D row when one unit, or the same, sets both sides)
    requests: dict[str, tuple[nn.Module, tuple[int, ...]]] = {}
    plans = []
    for t in timed:
        a, b = t.inp.unit, t.out.unit
        units = [u for u in dict.fromkeys((a, b)) if u is not None]

        def key(k: Mapping[str | None, float], t: _Timed = t) -> str:
            c_in, c_out = widths(t, k.get(t.inp.unit, 0), k.get(t.out.unit, 0))
            module, shape = _cell(t, c_in, c_out)
            sig = _signature(module, shape)
            requests.setdefault(sig, (module, shape))
            return sig

        grid = [opts[u] for u in units]
        cells = np.empty([g.size for g in grid], dtype=object)
        for index in np.ndindex(*cells.shape):
            cells[index] = key({u: int(g[i]) for u, g, i in zip(units, grid, index)})
        plans.append((t, units, cells, key({u: full_width[u] for u in units})))

    context = {"device": _device_name(), "torch": torch.__version__, "threads": threads, "batch_size": batch_size,
               "timer": "fastest" if timer is None else getattr(timer, "__qualname__", repr(timer)),
               "repeats": repeats}
    path = None
    if cache_dir is not False:
        digest = hashlib.sha1(json.dumps(context, sort_keys=True).encode()).hexdigest()[:16]
        path = Path(default_cache_dir() if cache_dir in (None, True) else cache_dir) / f"latency-{digest}.json"
    seconds: dict[str, float] = {}
    if path is not None and path.exists():
        with contextlib.suppress(ValueError, OSError):
            stored = json.loads(path.read_text())
            if stored.get("context") == context:
                seconds.update(stored.get("cells", {}))
    todo = [sig for sig in requests if sig not in seconds]
    clock = timer if timer is not None else (lambda m, x: fastest_time(m, x, repeats))
    try:
        with torch_threads(threads), torch.no_grad():
            for sig in tqdm(todo, desc="latency tables", disable=not progress, leave=False):
                module, shape = requests[sig]
                seconds[sig] = float(clock(module, torch.randn(shape)))
            full = float(clock(_Whole(model), inputs))
    finally:
        if path is not None and todo:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"context": context, "cells": seconds}, indent=0, sort_keys=True))
            tmp.replace(path)
    unary: dict[str, np.ndarray] = {}
    pairwise: dict[tuple[str, str], np.ndarray] = {}
    order = {u: i for i, u in enumerate(graph.names)}
    tabulated = []
    for _t, units, cells, full_key in plans:
        table = np.vectorize(seconds.__getitem__, otypes=[np.float64])(cells)
        tabulated.append(seconds[full_key])
        if len(units) == 1:
            unary[units[0]] = unary.get(units[0], 0.0) + table
        else:
            pair = tuple(units)
            if order[pair[0]] > order[pair[1]]:
                pair, table = pair[::-1], table.T
            pairwise[pair] = pairwise.get(pair, 0.0) + table
    tabulated_sum = math.fsum(tabulated)
    # What the modules leave of the whole model's time (functional ReLUs and adds, dispatch; and the machine's
    # drift between the two measurements) is spread over the tables in proportion: scale = full / tabulated.
    scale = full / tabulated_sum if tabulated_sum > 0 else 1.0
    cost = TableCost(options=opts, constant=0.0 if tabulated_sum > 0 else full,
                     unary={u: scale * t for u, t in unary.items()},
                     pairwise={p: scale * t for p, t in pairwise.items()})
    return LatencyModel(cost=cost, full=full, tabulated=tabulated_sum, batch_size=batch_size, threads=threads,
                        modules=tuple(dict.fromkeys(t.name for t in timed)), untabulated=tuple(sorted(set(loose))),
                        measured=len(todo), cached=len(requests) - len(todo),
                        cache_file=None if path is None else str(path))


class _Whole(nn.Module):
    """The model called on its inputs the way the pipeline calls it (tensor, tuple or dict)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Any) -> Any:
        return call_model(self.model, x)
