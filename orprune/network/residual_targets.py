"""Residual-aware targets for the sequential refit (``formulations/least_squares_reconstruction.md``, section 6).

A consumer whose output (after the BatchNorm that alone reads it, if any) is an operand of an
addition, ``out = BN(conv(h)) + s``, is refitted in the sequential pass on inputs from the partially
pruned network. In that network the other operand ``s`` (the shortcut, the residual stream) carries
the error of everything pruned before, so matching the consumer's own original output leaves the
sum wrong by ``s_orig - s_pruned``. Since the BatchNorm is a per-channel affine map
``BN(z) = a z + const`` with ``a = gamma / sqrt(var + eps)`` in eval mode,

.. math:: BN(\\hat z) + s_{pruned} = BN(z_{orig}) + s_{orig}
          \\iff \\hat z = z_{orig} + (s_{orig} - s_{pruned}) / a,

so the consumer is refitted to that corrected target and absorbs the stream's error on its output
channels instead of passing it on (channels with ``a = 0`` keep their target).

This module finds, with ``torch.fx``, which consumers feed an addition and where the other operand
can be observed by a module hook (the output of a module called once, or the first input of one);
:mod:`orprune.network.calibration` applies the offset while accumulating the statistics. Models that fx
cannot trace, and patterns it does not recognise, simply get no correction.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from orprune.network.graph import Consumer, call_model

__all__ = ["PassTaps", "ResidualTarget", "TargetOffset", "Tap", "find_residual_targets"]

_log = logging.getLogger(__name__)

_ADDS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


@dataclass(frozen=True)
class Tap:
    """Where a tensor is observed: the ``"output"`` or the first positional ``"input"`` of a module."""

    module: str
    port: str = "output"

    def __post_init__(self) -> None:
        if self.port not in ("output", "input"):
            raise ValueError(f"`port` must be 'output' or 'input', got {self.port!r}.")


@dataclass(frozen=True)
class TargetOffset:
    """A correction of one consumer's least-squares targets.

    The target rows gain ``scale * (sum_t reference_t - sum_t model_t)`` where ``t`` runs over
    ``taps``, each sampled at the consumer's positions (the tapped tensors have the consumer's output
    shape). ``scale`` has one entry per output channel (``None``: 1).
    """

    taps: tuple[Tap, ...]
    scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not self.taps or not all(isinstance(t, Tap) for t in self.taps):
            raise ValueError("`taps` must be a non-empty tuple of Tap.")
        if self.scale is not None and (not torch.is_tensor(self.scale) or self.scale.dim() != 1):
            raise ValueError("`scale` must be a 1-D tensor (one entry per output channel) or None.")


class PassTaps:
    """One consumer's tapped tensors during one forward pass, summed at its sampled positions.

    Taps may run before the consumer (the block input) or after it (a shortcut): a tap that comes
    first is kept whole (one batch's activation) until the consumer's positions are known.
    """

    def __init__(self, name: str, offset: TargetOffset, sample: Callable[[torch.Tensor, Any], torch.Tensor]):
        self.name, self.offset, self.sample = name, offset, sample
        self.tapped: list[torch.Tensor | None] = [None] * len(offset.taps)
        self.seen: tuple[Any, torch.Size] | None = None  # (positions, output shape) once the consumer ran
        self.then: Callable[[torch.Tensor], None] | None = None

    @property
    def waiting(self) -> bool:
        """Whether the pass still owes the consumer's call or a tapped tensor."""
        return self.seen is None or self.then is not None

    @property
    def late(self) -> bool:
        """The consumer ran but a tap did not."""
        return self.seen is not None and self.then is not None

    def tap(self, i: int, value: torch.Tensor) -> None:
        """Record tap ``i``: sampled at once if the positions are known, else a copy until they are."""
        if self.tapped[i] is not None:
            raise ValueError(f"consumer {self.name!r}: module {self.offset.taps[i].module!r} ran twice in one "
                             "pass; a residual offset needs each tapped module to run once.")
        self.tapped[i] = value.detach().clone() if self.seen is None else self._rows(value)
        self._complete()

    def expect(self, output: torch.Tensor, positions: Any, then: Callable[[torch.Tensor], None]) -> None:
        """The consumer ran: ``then(sum of the tapped rows)`` once every tap is recorded."""
        if self.seen is not None:
            raise ValueError(f"consumer {self.name!r} ran twice in one pass; a residual offset needs one call.")
        self.seen, self.then = (positions, output.shape), then
        self.tapped = [t if t is None else self._rows(t) for t in self.tapped]
        self._complete()

    def _rows(self, value: torch.Tensor) -> torch.Tensor:
        if value.shape != self.seen[1]:
            raise ValueError(f"consumer {self.name!r}: a tapped tensor has shape {tuple(value.shape)}, not the "
                             f"output's {tuple(self.seen[1])}.")
        return self.sample(value, self.seen[0])

    def _complete(self) -> None:
        if self.then is None or any(t is None for t in self.tapped):
            return
        total = torch.stack([t.double() for t in self.tapped]).sum(0)
        then, self.then = self.then, None
        then(total)


@dataclass(frozen=True)
class ResidualTarget:
    """A consumer whose (normalised) output is added to other tensors.

    Attributes
    ----------
    consumer : str
    norm : str or None
        The BatchNorm between the consumer and the addition.
    taps : tuple of Tap
        Where each other operand of the addition (or of a chain of additions) is observed.
    """

    consumer: str
    norm: str | None
    taps: tuple[Tap, ...]

    def offset(self, model: nn.Module) -> TargetOffset:
        """The correction with ``scale = 1 / a`` from ``model``'s BatchNorm (0 where ``a = 0``)."""
        if self.norm is None:
            return TargetOffset(self.taps)
        bn = model.get_submodule(self.norm)
        var = bn.running_var.detach().double()
        gamma = torch.ones_like(var) if bn.weight is None else bn.weight.detach().double()
        a = gamma / torch.sqrt(var + bn.eps)
        scale = torch.where(a != 0, 1.0 / torch.where(a != 0, a, 1.0), 0.0)
        return TargetOffset(self.taps, scale)


# ------------------------------------------------------------------------------------ analysis
def _add_operands(node: fx.Node) -> tuple[Any, Any] | None:
    """``(lhs, rhs)`` of a plain addition (``+``, ``+=``, ``torch.add``, ``Tensor.add``), else None."""
    is_add = ((node.op == "call_function" and node.target in _ADDS)
              or (node.op == "call_method" and node.target in _ADD_METHODS))
    if not is_add or len(node.args) != 2 or set(node.kwargs) - {"alpha"} or node.kwargs.get("alpha", 1) != 1:
        return None
    return node.args[0], node.args[1]


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_fixed_norm(module: nn.Module) -> bool:
    """A BatchNorm that is a fixed per-channel affine map in eval mode."""
    return (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
            and module.running_var is not None)


def _mutates(node: fx.Node, value: fx.Node) -> bool:
    """Whether ``node`` may change ``value`` in place (an in-place op reading it first)."""
    if node.op == "call_method" and str(node.target).endswith("_"):
        return bool(node.args) and node.args[0] is value
    if node.op == "call_function" and node.target is operator.iadd:
        return bool(node.args) and node.args[0] is value
    if node.op == "call_function" and node.kwargs.get("inplace", False):
        return True
    return False


def _tap(node: fx.Node, add: fx.Node, calls: dict[str, int], modules: dict[str, nn.Module]) -> Tap | None:
    """A module hook that sees ``node``'s value (as ``add`` reads it), from a module called once per pass."""
    if any(u is not add and (_mutates(u, node) or (u.op == "call_module"
                                                   and getattr(modules.get(u.target), "inplace", False)))
           for u in node.users):
        return None  # the value a hook sees may not be the value the addition reads
    if node.op == "call_module" and calls.get(node.target) == 1:
        return Tap(str(node.target), "output")
    for user in node.users:
        if user.op == "call_module" and calls.get(user.target) == 1 and user.args and user.args[0] is node:
            return Tap(str(user.target), "input")
    return None


def _ancestors(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen


def _analyse(graph: fx.Graph, names: list[str], modules: dict[str, nn.Module]) -> dict[str, ResidualTarget]:
    calls: dict[str, int] = {}
    call_node: dict[str, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
            call_node[node.target] = node
    found: dict[str, ResidualTarget] = {}
    for name in names:
        if calls.get(name) != 1:
            _log.debug("residual targets: %s is called %s times per pass; no correction", name, calls.get(name, 0))
            continue
        node = call_node[name]
        cur, norm = node, None
        user = _single_user(cur)
        if (user is not None and user.op == "call_module" and calls.get(user.target) == 1
                and _is_fixed_norm(modules[user.target]) and list(user.all_input_nodes) == [cur]):
            norm, cur = str(user.target), user
        others: list[tuple[fx.Node, fx.Node]] = []  # (operand, its addition)
        while (user := _single_user(cur)) is not None and (operands := _add_operands(user)) is not None:
            lhs, rhs = operands
            other = rhs if lhs is cur else lhs if rhs is cur else None
            if not isinstance(other, fx.Node) or other is cur:
                break
            others.append((other, user))
            cur = user
        if not others:
            continue
        taps = [_tap(o, add, calls, modules) for o, add in others]
        if any(t is None for t in taps) or node in _ancestors(o for o, _ in others):  # x + f(x)
            _log.debug("residual targets: the other operand of %s cannot be observed; no correction", name)
            continue
        found[name] = ResidualTarget(name, norm, tuple(taps))
    return found


@torch.no_grad()
def _shapes_agree(model: nn.Module, targets: dict[str, ResidualTarget], example_inputs: Any) -> set[str]:
    """Consumers whose tapped tensors have exactly their output's shape in one forward pass."""
    seen: dict[tuple[str, str], list[torch.Size | None]] = {}

    def record(key: tuple[str, str]) -> Any:
        def hook(_module: nn.Module, args: tuple, out: Any) -> None:
            value = out if key[1] == "output" else (args[0] if args else None)
            seen.setdefault(key, []).append(value.shape if torch.is_tensor(value) else None)
        return hook

    keys = {(t.consumer, "output") for t in targets.values()}
    keys |= {(tap.module, tap.port) for t in targets.values() for tap in t.taps}
    modes = {m: m.training for m in model.modules()}
    handles = [model.get_submodule(k[0]).register_forward_hook(record(k)) for k in keys]
    try:
        model.eval()
        call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    ok = set()
    for t in targets.values():
        out = seen.get((t.consumer, "output"), [])
        taps = [seen.get((tap.module, tap.port), []) for tap in t.taps]
        if len(out) == 1 and out[0] is not None and all(s == out for s in taps):
            ok.add(t.consumer)
        else:
            _log.debug("residual targets: %s's operands do not match its output shape; no correction", t.consumer)
    return ok


def find_residual_targets(
    model: nn.Module, consumers: Iterable[Consumer | str], example_inputs: Any = None
) -> dict[str, ResidualTarget]:
    """Consumers whose output, after an optional BatchNorm, is added to other tensors.

    Parameters
    ----------
    model : nn.Module
        Traced with ``torch.fx.symbolic_trace`` (not modified).
    consumers : iterable of Consumer or str
        Candidate layers (module names).
    example_inputs : optional
        If given, one eval-mode forward pass checks that every tapped tensor has the consumer's
        output shape (no broadcasting) and that each hook fires once.

    Returns
    -------
    dict of str -> ResidualTarget
        Only the consumers where the pattern was recognised; empty when fx cannot trace the model
        (a debug-level log record says why).
    """
    names = list(dict.fromkeys(c.name if isinstance(c, Consumer) else c for c in consumers))
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # any tracing failure means: no correction, never a failed prune
        _log.debug("residual targets: torch.fx cannot trace %s (%s); no correction", type(model).__name__, exc)
        return {}
    modules = dict(model.named_modules())
    found = _analyse(graph, [n for n in names if n in modules], modules)
    if found and example_inputs is not None:
        try:
            keep = _shapes_agree(model, found, example_inputs)
        except Exception as exc:
            _log.debug("residual targets: the checking pass failed (%s); no correction", exc)
            return {}
        found = {n: t for n, t in found.items() if n in keep}
    return found
