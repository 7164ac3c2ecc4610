r"""A small graph convolutional network written by hand: :math:`\hat A X W` with :math:`\hat A = D^{-1/2}(A+I)D^{-1/2}`.

:class:`GraphConv` holds its weight in an ``nn.Linear`` applied to :math:`\hat A X`, so
:class:`~orprune.c2f.CoarseToFineGating` (and every Linear tool of orprune) sees an ordinary Linear layer whose
inputs are the propagated node features. :class:`GridGCN` classifies images as grid graphs (one node per pixel).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["GraphConv", "GridGCN", "grid_adjacency", "normalize_adjacency"]


def grid_adjacency(height: int, width: int, *, diagonal: bool = False) -> torch.Tensor:
    """0/1 adjacency of the ``height x width`` grid graph (4-neighbours, 8 with ``diagonal``), no self-loops.

    Node ``r * width + c`` is pixel ``(r, c)``.
    """
    for value, name in ((height, "height"), (width, "width")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    n = height * width
    adjacency = torch.zeros(n, n)
    steps = [(0, 1), (1, 0)] + ([(1, 1), (1, -1)] if diagonal else [])
    for r in range(height):
        for c in range(width):
            for dr, dc in steps:
                rr, cc = r + dr, c + dc
                if 0 <= rr < height and 0 <= cc < width:
                    adjacency[r * width + c, rr * width + cc] = adjacency[rr * width + cc, r * width + c] = 1.0
    return adjacency


def normalize_adjacency(adjacency: torch.Tensor) -> torch.Tensor:
    r""":math:`D^{-1/2}(A + I)D^{-1/2}` with :math:`D` the degrees of :math:`A + I` (Kipf and Welling's propagation)."""
    adjacency = torch.as_tensor(adjacency, dtype=torch.get_default_dtype())
    if adjacency.dim() != 2 or adjacency.shape[0] != adjacency.shape[1]:
        raise ValueError(f"`adjacency` must be a square matrix, got shape {tuple(adjacency.shape)}.")
    if not torch.isfinite(adjacency).all() or (adjacency < 0).any():
        raise ValueError("`adjacency` must be finite and >= 0.")
    if not torch.equal(adjacency, adjacency.T):
        raise ValueError("`adjacency` must be symmetric (an undirected graph).")
    a = adjacency + torch.eye(adjacency.shape[0], dtype=adjacency.dtype)
    d = a.sum(1).rsqrt()
    return d[:, None] * a * d[None, :]


class GraphConv(nn.Module):
    r"""Graph convolution :math:`H' = \hat A H W^T + b` on inputs of shape ``(batch, nodes, in_features)``.

    Parameters
    ----------
    adjacency : torch.Tensor, shape (nodes, nodes)
        Symmetric, non-negative, without the self-loops (added by :func:`normalize_adjacency`).
    in_features, out_features : int
    bias : bool
    """

    def __init__(self, adjacency: torch.Tensor, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.register_buffer("propagation", normalize_adjacency(adjacency))
        self.linear = nn.Linear(in_features, out_features, bias=bias)

    @property
    def n_nodes(self) -> int:
        return self.propagation.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[1] != self.n_nodes:
            raise ValueError(f"GraphConv expects inputs of shape (batch, {self.n_nodes}, features), "
                             f"got {tuple(x.shape)}.")
        return self.linear(torch.matmul(self.propagation, x))


class GridGCN(nn.Module):
    """Images ``(N, 1, H, W)`` as ``H*W``-node grid graphs: node features (intensity, row, column), GCN layers, a
    linear classifier over the flattened node features.

    Parameters
    ----------
    height, width : int
    hidden : sequence of int
        Output features of each :class:`GraphConv` (ReLU after each).
    classes : int
    diagonal : bool
        8-neighbour grid.
    """

    def __init__(self, height: int = 8, width: int = 8, hidden: Sequence[int] = (32, 32, 16), classes: int = 10,
                 *, diagonal: bool = False) -> None:
        super().__init__()
        if not hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"`hidden` must be a non-empty sequence of positive integers, got {hidden!r}.")
        adjacency = grid_adjacency(height, width, diagonal=diagonal)
        rows, cols = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        self.register_buffer("coordinates", torch.stack([rows.reshape(-1), cols.reshape(-1)], 1))
        sizes = [3, *hidden]
        self.convs = nn.ModuleList(GraphConv(adjacency, a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.classifier = nn.Linear(height * width * sizes[-1], classes)
        self.height, self.width = height, width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        intensity = images.reshape(n, self.height * self.width, 1)
        x = torch.cat([intensity, self.coordinates.expand(n, -1, -1)], 2)
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.classifier(x.reshape(n, -1))
