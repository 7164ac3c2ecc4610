"""The masked form of a LayerNorm / GroupNorm over pruned channels: normalise over the kept channels only.

Zeroing a dropped channel's consumer weights does not make a norm over the channels compute what the
pruned norm computes: the dropped channels still enter its mean and variance. :class:`KeptChannelsNorm`
is a forward hook that replaces the norm's output by the pruned norm (torch-pruning's slicing of the
module) applied to the kept channels, with zeros at the dropped ones, so ``masked_copy`` and
``apply_pruning`` give the same function (``formulations/channel_norms.md``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

__all__ = ["KeptChannelsNorm", "channel_count", "mask_norm"]


def channel_count(module: nn.Module) -> int:
    """Channels a LayerNorm (over the channels alone) or a GroupNorm normalises."""
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return module.normalized_shape[0]
    raise ValueError(f"`module` must be a GroupNorm or a LayerNorm over one dimension, got {module!r}.")


def _channel_dim(module: nn.Module) -> int | None:
    """The dimension of the norm's input holding the channels, when the module type says it; None when
    it must be found from the input's shape (a LayerNorm subclass with its own forward)."""
    if isinstance(module, nn.GroupNorm) or getattr(module, "data_format", None) == "channels_first":
        return 1
    if type(module).forward is nn.LayerNorm.forward or getattr(module, "data_format", None) == "channels_last":
        return -1
    return None


class KeptChannelsNorm:
    """Forward hook: the norm's output recomputed over the ``kept`` channels only, zero elsewhere.

    Parameters
    ----------
    module : nn.LayerNorm or nn.GroupNorm
        The norm the hook is registered on (its current weight and bias are read at every call).
    kept : sequence of int
        Kept channels (for a GroupNorm, as many in every group).
    """

    def __init__(self, module: nn.Module, kept: Any):
        n = channel_count(module)
        self.kept = torch.as_tensor(sorted(int(c) for c in kept), dtype=torch.long)
        if self.kept.numel() == 0 or int(self.kept[-1]) >= n or int(self.kept[0]) < 0:
            raise ValueError(f"`kept` must hold channels in [0, {n}), at least one.")
        dropped = sorted(set(range(n)) - set(self.kept.tolist()))
        pruned = copy.deepcopy(module)
        pruned._forward_hooks.clear()
        if isinstance(module, nn.GroupNorm):
            size = n // module.num_groups
            per_group = {sum(c // size == j for c in dropped) for j in range(module.num_groups)}
            if len(per_group) != 1:
                raise ValueError(f"a GroupNorm of {module.num_groups} groups must lose as many channels from "
                                 f"every group; `kept` holds {self.kept.numel()} of {n}.")
            tp.prune_groupnorm_out_channels(pruned, dropped)
        else:
            tp.prune_layernorm_out_channels(pruned, dropped)
        self.pruned, self.n, self.dim = pruned, n, _channel_dim(module)

    def _dim(self, x: torch.Tensor) -> int:
        if self.dim is not None:
            return self.dim
        found = [d for d in range(x.dim()) if x.shape[d] == self.n]
        if len(found) != 1:
            raise ValueError(f"cannot tell which dimension of an input of shape {tuple(x.shape)} holds the "
                             f"{self.n} normalised channels of {type(self.pruned).__name__}.")
        return found[0]

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        dim = self._dim(x)
        kept = self.kept.to(x.device)
        params = {name: p.index_select(0, kept) for name, p in module.named_parameters(recurse=False)}
        y = torch.func.functional_call(self.pruned, params, (x.index_select(dim, kept),))
        return torch.zeros_like(output).index_copy(dim, kept, y)


def mask_norm(module: nn.Module, kept: Any) -> None:
    """Register a :class:`KeptChannelsNorm` on ``module`` (in place)."""
    module.register_forward_hook(KeptChannelsNorm(module, kept))
