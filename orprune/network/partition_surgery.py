"""Surgery for partition pruning: a Linear (or 1x1 convolution) whose weight is block diagonal up to permutations.

After :func:`orprune.partition_weights` or :func:`orprune.partition_layer`, input ``i`` only feeds the outputs of
its own part. :class:`PartitionedLinear` stores one dense block per part, gathers each part's inputs, applies the
blocks and scatters the outputs back to their original positions, so it computes exactly what the dense layer
with the cross-part weights zeroed computes, with ``sum_p |inputs_p| |outputs_p|`` weights instead of
``d n``. See ``formulations/partition_pruning.md``.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PartitionedLinear", "masked_dense", "partition_module"]


def _parts(values: Any, n: int, name: str) -> np.ndarray:
    parts = np.asarray(values)
    if parts.shape != (n,) or not np.issubdtype(parts.dtype, np.integer) or parts.min() < 0:
        raise ValueError(f"`{name}` must hold one non-negative integer part per feature ({n}), got {parts!r}.")
    return parts.astype(np.int64)


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight of a Linear or of a plain 1x1 convolution."""
    if isinstance(module, nn.Linear):
        return module.weight
    if isinstance(module, nn.Conv2d):
        plain = (module.kernel_size == (1, 1) and module.stride == (1, 1) and module.padding in ((0, 0), "valid")
                 and module.dilation == (1, 1) and module.groups == 1)
        if not plain:
            raise ValueError("`module` must be a 1x1 convolution with stride 1, no padding, dilation 1 and groups 1.")
        return module.weight[:, :, 0, 0]
    raise ValueError(f"`module` must be an nn.Linear or a 1x1 nn.Conv2d, got {type(module).__name__}.")


class PartitionedLinear(nn.Module):
    """``y = W x + b`` with ``W[j, i] = 0`` whenever input ``i`` and output ``j`` are in different parts.

    Parameters
    ----------
    in_features, out_features : int
    input_parts : array_like of int, shape (in_features,)
    output_parts : array_like of int, shape (out_features,)
    bias : bool, default True
    dim : int, default -1
        The feature dimension of the input: -1 for a Linear, 1 for a 1x1 convolution on (N, C, H, W).

    Attributes
    ----------
    blocks : nn.ParameterList
        ``blocks[p]`` has shape ``(|outputs_p|, |inputs_p|)``, rows and columns in increasing feature order.
    input_index, output_index : buffers
        The inputs of part 0, then of part 1, ...; the position of each output in that part order.

    Notes
    -----
    Build it with :meth:`from_module` from a dense layer and a partition; :meth:`to_dense` gives the equivalent
    masked dense weight.
    """

    def __init__(self, in_features: int, out_features: int, input_parts: Any, output_parts: Any, *,
                 bias: bool = True, dim: int = -1, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        parts_in = _parts(input_parts, in_features, "input_parts")
        parts_out = _parts(output_parts, out_features, "output_parts")
        self.in_features, self.out_features, self.dim = int(in_features), int(out_features), int(dim)
        self.n_parts = int(max(parts_in.max(), parts_out.max())) + 1
        self.in_sizes = [int(np.sum(parts_in == p)) for p in range(self.n_parts)]
        self.out_sizes = [int(np.sum(parts_out == p)) for p in range(self.n_parts)]
        order_out = np.argsort(parts_out, kind="stable")
        self.register_buffer("input_index", torch.as_tensor(np.argsort(parts_in, kind="stable")))
        self.register_buffer("output_index", torch.as_tensor(np.argsort(order_out, kind="stable")))
        self.register_buffer("input_parts", torch.as_tensor(parts_in))
        self.register_buffer("output_parts", torch.as_tensor(parts_out))
        self.blocks = nn.ParameterList(
            [nn.Parameter(torch.zeros(o, i, dtype=dtype)) for o, i in zip(self.out_sizes, self.in_sizes)])
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_module(cls, module: nn.Module, partition: Any = None, *, input_parts: Any = None,
                    output_parts: Any = None, weights: Any = None) -> PartitionedLinear:
        """The partitioned layer of a dense ``nn.Linear`` or 1x1 ``nn.Conv2d``.

        Parameters
        ----------
        module : nn.Linear or nn.Conv2d
        partition : Partition, optional
            A result of :func:`orprune.partition_weights` / :func:`orprune.partition_layer`: its parts, and its
            ``weights`` (``(in, out)`` layout: refit weights for the reconstruction criterion).
        input_parts, output_parts : array_like of int, optional
            The parts, when no ``partition`` is given (then the module's own weights are kept).
        weights : array_like, shape (in, out), optional
            Weights to write instead of the module's (LayerProblem layout, the transpose of ``linear.weight``).
        """
        dense = _dense_weight(module)
        if partition is not None:
            input_parts, output_parts = partition.input_parts, partition.output_parts
            weights = partition.weights if weights is None else weights
        if input_parts is None or output_parts is None:
            raise ValueError("pass a `partition` or both `input_parts` and `output_parts`.")
        out_features, in_features = dense.shape
        layer = cls(in_features, out_features, input_parts, output_parts, bias=module.bias is not None,
                    dim=1 if isinstance(module, nn.Conv2d) else -1, dtype=dense.dtype).to(dense.device)
        if weights is not None:
            w = torch.as_tensor(np.array(weights, dtype=float), dtype=dense.dtype, device=dense.device)
            if w.shape != (in_features, out_features):
                raise ValueError(f"`weights` must have shape {(in_features, out_features)}, got {tuple(w.shape)}.")
            dense = w.T
        with torch.no_grad():
            for p, block in enumerate(layer.blocks):
                rows = torch.nonzero(layer.output_parts == p).flatten()
                cols = torch.nonzero(layer.input_parts == p).flatten()
                block.copy_(dense[rows][:, cols])
            if module.bias is not None:
                layer.bias.copy_(module.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moved = self.dim not in (-1, x.dim() - 1)
        if moved:
            x = x.movedim(self.dim, -1)
        chunks = x.index_select(-1, self.input_index).split(self.in_sizes, dim=-1)
        y = torch.cat([F.linear(chunk, block) for chunk, block in zip(chunks, self.blocks)], dim=-1)
        y = y.index_select(-1, self.output_index)
        if self.bias is not None:
            y = y + self.bias
        return y.movedim(-1, self.dim) if moved else y

    def to_dense(self) -> torch.Tensor:
        """The equivalent dense ``(out, in)`` weight, zero between parts."""
        dense = self.blocks[0].new_zeros(self.out_features, self.in_features)
        for p, block in enumerate(self.blocks):
            rows = torch.nonzero(self.output_parts == p).flatten()
            cols = torch.nonzero(self.input_parts == p).flatten()
            dense[rows[:, None], cols[None, :]] = block
        return dense

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, n_parts={self.n_parts}, "
                f"bias={self.bias is not None}, dim={self.dim}")


def masked_dense(module: nn.Module, partition: Any) -> nn.Module:
    """A copy of the dense layer with the partition's weights written and the cross-part weights zeroed."""
    layer = copy.deepcopy(module)
    dense = _dense_weight(layer)
    mask = torch.as_tensor(np.array(partition.mask, dtype=bool).T, device=dense.device)
    with torch.no_grad():
        w = torch.as_tensor(np.array(partition.weights, dtype=float).T, dtype=dense.dtype, device=dense.device)
        dense.copy_(torch.where(mask, w, torch.zeros_like(w)))
    return layer


def partition_module(model: nn.Module, partitions: dict[str, Any]) -> nn.Module:
    """A copy of ``model`` with each named Linear / 1x1 convolution replaced by its :class:`PartitionedLinear`.

    Parameters
    ----------
    model : nn.Module
        Not modified.
    partitions : dict
        Qualified module name (as in ``model.named_modules()``) -> :class:`orprune.layer.partition.Partition`.
    """
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    for name, partition in partitions.items():
        if name not in modules or name == "":
            raise ValueError(f"`partitions` names {name!r}, which is not a submodule of `model`.")
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name], child, PartitionedLinear.from_module(modules[name], partition))
    return model
