"""Wide consumers: channel selection on a per-channel compressed problem, the exact refit in sample space.

A consumer with ``C`` input channels of ``g`` feature columns each has a ``(Cg) x (Cg)`` Gram matrix; above
``max_features`` columns (VGG's ``512 * 7 * 7`` classifier input) that matrix and the solvers' cost grow out of
reach. For such a layer, channel ``c``'s columns are compressed to ``s < g`` columns by a fixed matrix ``P_c``
(``g x s``, orthonormal columns: the top-``s`` left singular vectors of the layer's weight block ``W_c``, or
``s`` pooled sub-blocks), and the selection problem is the one of the compressed design ``X_c P_c``:

.. math::

    \\tilde f(S) = \\min_{V} \\|Y - \\textstyle\\sum_{c \\in S} X_c P_c V_c\\|_F^2 + r \\|V\\|_F^2
                = \\min_{W_c = P_c V_c} \\|Y - X_S W_S\\|_F^2 + r \\|W_S\\|_F^2 \\ \\ge\\ f(S),

an ordinary :class:`~orprune.layer.problem.LayerProblem` of ``C * s`` columns (the weights restricted to
``range(P_c)``, whose norm ``P_c`` preserves): an upper bound on the exact error of every mask, equal to it
when ``s = g``. The kept channels' weights are then refitted *exactly* from the stored design rows (not the
Gram matrix): in sample space, ``W = X_S^T (X_S X_S^T + r I)^{-1} Y`` with error ``r tr(Y^T (X_S X_S^T + r
I)^{-1} Y)``, when the rows are fewer than the kept columns (a Linear classifier sees one row per image), and
through the kept columns' Gram matrix otherwise: ``min(N, |S| g)``-sized algebra, never ``(Cg)^2``. Rows are
stored up to a memory budget; past it only the compressed statistics remain and the refit is the restricted
one (``W_c = P_c V_c``, error ``\\tilde f(S)``), with a warning. See ``formulations/wide_consumers.md``.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import scipy.linalg

from orprune._validation import channel_mask, check_integer
from orprune.layer.problem import LayerProblem, StatisticsAccumulator

__all__ = ["DEFAULT_ROW_BYTES", "WideAccumulator", "WideProblem", "channel_projection", "project_weights",
           "sketch_size"]

#: Memory for the stored design rows (and targets) of one wide consumer, bytes. Past it the rows are dropped
#: and the refit is restricted to the compressed columns.
DEFAULT_ROW_BYTES = 1 << 30


def sketch_size(n_channels: int, group_size: int, max_features: int) -> int:
    """Columns per channel of a layer's selection problem: ``g`` when ``C * g <= max_features`` (exact),
    else ``max(1, max_features // C)`` (compressed; ``g = 1`` layers cannot be compressed per channel)."""
    if n_channels * group_size <= max_features:
        return group_size
    return max(1, min(group_size, max_features // n_channels))


def channel_projection(weights: Any, n_channels: int, group_size: int, sketch: int,
                       method: str = "weights") -> np.ndarray:
    """Per-channel matrices ``P_c`` (``g x s``, orthonormal columns) compressing each channel's columns.

    Parameters
    ----------
    weights : array_like or Tensor, shape (C*g, n_out)
        The layer's weights, channel-major (:func:`orprune.network.units.weight_matrix`); used by
        ``method="weights"``.
    n_channels, group_size, sketch : int
        ``C``, ``g`` and ``s <= g``.
    method : {"weights", "pool"}
        ``"weights"``: the top-``s`` left singular vectors of the channel's weight block ``W_c`` (what the
        layer reads from the channel, best rank-``s`` in the weights' norm); ``"pool"``: ``s`` contiguous
        sub-blocks of the ``g`` columns averaged (normalised), data- and weight-independent.

    Returns
    -------
    ndarray, shape (C, g, s)
    """
    n_channels = check_integer(n_channels, "n_channels", 1, 1 << 40)
    group_size = check_integer(group_size, "group_size", 1, 1 << 40)
    sketch = check_integer(sketch, "sketch", 1, group_size)
    if method == "pool":
        block = np.minimum(np.arange(group_size) * sketch // group_size, sketch - 1)
        p = (block[:, None] == np.arange(sketch)[None, :]).astype(float)
        p /= np.sqrt(p.sum(0, keepdims=True))
        return np.broadcast_to(p, (n_channels, group_size, sketch)).copy()
    if method != "weights":
        raise ValueError(f"`method` must be 'weights' or 'pool', got {method!r}.")
    shape = tuple(weights.shape) if hasattr(weights, "shape") else np.shape(weights)
    if len(shape) != 2 or shape[0] != n_channels * group_size:
        raise ValueError(f"`weights` must have shape ({n_channels * group_size}, n_out), got {shape}.")
    # left singular vectors of W_c = eigenvectors of W_c W_c^T (g x g; never the n_out x n_out right factor)
    gram = np.stack([b @ b.T for b in _blocks(weights, n_channels, group_size)])
    u = np.linalg.eigh(gram)[1]  # ascending eigenvalues
    return np.ascontiguousarray(u[:, :, ::-1][:, :, :sketch])


def _blocks(weights: Any, n_channels: int, group_size: int, chunk: int = 1 << 22) -> Any:
    """Each channel's weight block ``W_c`` as float64 NumPy, a chunk of channels at a time: a torch tensor
    (any device, any dtype) is never copied whole to float64 (25088 x 4096 of VGG's classifier: 0.8 GB)."""
    n_out = weights.shape[1]
    step = max(1, chunk // max(group_size * n_out, 1))
    for start in range(0, n_channels, step):
        part = weights[start * group_size : min(start + step, n_channels) * group_size]
        part = part.detach().cpu().double().numpy() if hasattr(part, "detach") else np.asarray(part, dtype=float)
        yield from part.reshape(-1, group_size, n_out)


def project_weights(projection: np.ndarray, weights: Any) -> np.ndarray:
    """``P_c^T W_c`` for every channel: the layer's weights in the compressed layout, shape ``(C*s, n_out)``."""
    n_channels, group_size, _ = projection.shape
    return np.concatenate([p.T @ b for p, b in zip(projection, _blocks(weights, n_channels, group_size))])


def _compress(x: Any, projection: Any, n_channels: int) -> Any:
    """``X_c P_c`` for every channel: (n, C*g) -> (n, C*s), NumPy or torch."""
    n = x.shape[0]
    if hasattr(x, "detach"):
        import torch

        p = torch.as_tensor(projection, dtype=x.dtype, device=x.device)
        return torch.einsum("ncg,cgs->ncs", x.reshape(n, n_channels, -1), p).reshape(n, -1)
    return np.einsum("ncg,cgs->ncs", x.reshape(n, n_channels, -1), projection).reshape(n, -1)


class WideAccumulator:
    """Statistics of a wide consumer: the compressed problem's sums and the design rows, batch by batch.

    Parameters
    ----------
    projection : ndarray, shape (C, g, s)
        From :func:`channel_projection`.
    n_outputs : int
    max_bytes : int, default ``DEFAULT_ROW_BYTES``
        Memory for the stored rows (``X`` in its own dtype, ``Y`` in float64); past it they are dropped.
    float32 : bool, default False
        The compressed batch products in float32 (:class:`StatisticsAccumulator`).
    """

    def __init__(self, projection: np.ndarray, n_outputs: int, *, max_bytes: int = DEFAULT_ROW_BYTES,
                 float32: bool = False) -> None:
        self.projection = np.asarray(projection, dtype=float)
        if self.projection.ndim != 3 or self.projection.shape[2] > self.projection.shape[1]:
            raise ValueError(f"`projection` must have shape (C, g, s) with s <= g, got {self.projection.shape}.")
        self.n_channels, self.group_size, self.sketch = self.projection.shape
        self.n_features = self.n_channels * self.group_size
        self.n_outputs = int(n_outputs)
        self.max_bytes = int(max_bytes)
        self.compressed = StatisticsAccumulator(self.n_channels * self.sketch, self.n_outputs, float32=float32)
        self._rows: list[tuple[Any, Any]] | None = []
        self._bytes = 0
        self._sum_x = np.zeros(self.n_features)
        self._sum_xx = np.zeros(self.n_features)  # the diagonal of X^T X, for the exact problem's ridge

    @property
    def n_samples(self) -> int:
        return self.compressed.n_samples

    @property
    def exact(self) -> bool:
        """Whether every row is stored (the refit and :meth:`WideProblem.exact_objective` are exact)."""
        return self._rows is not None

    def update(self, X: Any, Y: Any) -> WideAccumulator:
        """Add a batch: ``X`` (n, C*g), ``Y`` (n, n_outputs), NumPy or torch."""
        if X.shape[-1] != self.n_features:
            raise ValueError(f"batch shape {tuple(X.shape)} does not match (n, {self.n_features}).")
        is_torch = hasattr(X, "detach")
        if is_torch:
            import torch

            X, Y = X.detach(), Y.detach().to(torch.float64)
            work = X if self.compressed.float32 else X.to(torch.float64)
        else:
            X, Y = np.asarray(X, dtype=float), np.asarray(Y, dtype=float)
            work = X
        self.compressed.update(_compress(work, self.projection, self.n_channels), Y)  # checks finiteness
        xd = work.double() if is_torch else work
        sums = (xd.sum(0), (xd * xd).sum(0))
        self._sum_x += sums[0].cpu().numpy() if is_torch else sums[0]
        self._sum_xx += sums[1].cpu().numpy() if is_torch else sums[1]
        if self._rows is not None:
            size = X.shape[0] * (X.shape[1] * X.element_size() + Y.shape[1] * 8) if is_torch else X.nbytes + Y.nbytes
            if self._bytes + size > self.max_bytes:
                self._rows = None  # the refit falls back to the compressed columns
            else:
                self._rows.append((X.cpu().clone() if is_torch else X.copy(), Y.cpu().clone() if is_torch else Y.copy()))
                self._bytes += size
        return self

    def means(self) -> tuple[np.ndarray, np.ndarray]:
        """Column means of ``X`` (all ``C*g`` columns) and ``Y``."""
        return self._sum_x / self.n_samples, self.compressed.means()[1]

    def mean_diagonal(self, *, center: bool = False) -> float:
        """Mean diagonal of the full ``X^T X`` (centred with ``center=True``): the scale of relative ridges."""
        diag = self._sum_xx - (self._sum_x ** 2 / self.n_samples if center else 0.0)
        return float(np.mean(np.maximum(diag, 0.0)))

    def release(self) -> None:
        """Free the compressed matrices and the rows (a problem built by :meth:`to_problem` keeps its own)."""
        self.compressed.release()
        self._rows = None

    def statistics(self, *, center: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
        """``(gram, cross, yy)`` of the *compressed* problem (``C * s`` columns), as
        :meth:`StatisticsAccumulator.statistics`."""
        return self.compressed.statistics(center=center)

    def to_problem(self, *, group_size: int | None = None, ridge: float = 0.0, weights: Any | None = None,
                   center: bool = False) -> WideProblem:
        """The :class:`WideProblem`: ``ridge`` is absolute, the exact problem's (and so the compressed one's).

        ``group_size``, if given, must be the layer's ``g`` (the signature of
        :meth:`StatisticsAccumulator.to_problem`). ``weights`` (shape ``(C*g, n_out)``) are projected to the
        compressed layout (``P_c^T W_c``).
        """
        if group_size is not None and group_size != self.group_size:
            raise ValueError(f"`group_size` must be the layer's {self.group_size} columns per channel, got "
                             f"{group_size!r}.")
        gram, cross, yy = self.compressed.statistics(center=center)
        if weights is not None:
            weights = project_weights(self.projection, weights)
        rows = None
        if self._rows is not None:
            if not self._rows:
                raise ValueError("no samples were accumulated; call `update` with at least one batch.")
            as_np = [(x.numpy() if hasattr(x, "numpy") else x, y.numpy() if hasattr(y, "numpy") else y)
                     for x, y in self._rows]
            rows = (np.concatenate([x for x, _ in as_np]), np.concatenate([y for _, y in as_np]))
        else:
            warnings.warn(f"the design rows of a wide consumer ({self.n_samples} rows of {self.n_features} columns) "
                          f"exceed `max_bytes` = {self.max_bytes}: its refit is restricted to {self.sketch} "
                          f"compressed column(s) per channel (an upper bound on the exact error).", RuntimeWarning,
                          stacklevel=2)
        mean_x, mean_y = self.means()
        return WideProblem(gram, cross, yy, projection=self.projection, ridge=ridge, weights=weights, rows=rows,
                           means=(mean_x, mean_y) if center else None)


class WideProblem(LayerProblem):
    """The compressed selection problem of a wide consumer, with the exact objective and refit of a mask.

    As a :class:`LayerProblem` (``gram``, ``cross``, ``objective``, every solver) it is the compressed problem
    ``\\tilde f`` over ``C * s`` columns (``group_size = s``); :meth:`exact_objective` and :meth:`refit` are the
    exact problem's over all ``C * g`` columns (from the stored rows; the restricted refit without them).

    Parameters
    ----------
    gram, cross, yy :
        The compressed statistics (centred or not, as ``rows`` will be).
    projection : ndarray, shape (C, g, s)
    ridge : float
        Absolute ridge of both problems.
    rows : (ndarray (N, C*g), ndarray (N, n_out)) or None
        The raw design rows and targets; None: the refit is the restricted one.
    means : (ndarray, ndarray) or None
        Column means subtracted from the rows (a centred problem), or None.
    """

    def __init__(self, gram: Any, cross: Any, yy: float, *, projection: np.ndarray, ridge: float = 0.0,
                 weights: Any | None = None, rows: tuple[np.ndarray, np.ndarray] | None = None,
                 means: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        projection = np.asarray(projection, dtype=float)
        super().__init__(gram, cross, yy, group_size=projection.shape[2], ridge=ridge, weights=weights, check=False)
        self.projection = projection
        self.full_group_size = projection.shape[1]
        if rows is not None and (rows[0].shape[1] != projection.shape[0] * projection.shape[1]
                                 or rows[1].shape != (rows[0].shape[0], self.n_outputs)):
            raise ValueError(f"`rows` must be (N, {projection.shape[0] * projection.shape[1]}) and "
                             f"(N, {self.n_outputs}) arrays.")
        self.rows, self.means = rows, means

    @property
    def exact(self) -> bool:
        """Whether :meth:`refit` and :meth:`exact_objective` are the exact problem's."""
        return self.rows is not None

    @property
    def selection(self) -> LayerProblem:
        """The compressed problem alone (no rows): what the curves' solvers need, cheap to pickle."""
        return LayerProblem(self.gram, self.cross, self.yy, group_size=self.group_size, ridge=self.ridge,
                            weights=self.weights, check=False)

    def full_columns(self, mask: Any) -> np.ndarray:
        """The exact problem's columns owned by the kept channels."""
        kept = np.flatnonzero(channel_mask(mask, self.n_channels))
        return (kept[:, None] * self.full_group_size + np.arange(self.full_group_size)).ravel()

    def exact_objective(self, mask: Any) -> float:
        """``f(S)`` of the exact problem over all ``C * g`` columns (``\\tilde f(S)`` without rows)."""
        return self.refit(mask)[1]

    def refit(self, mask: Any) -> tuple[np.ndarray, float]:
        """Weights over all ``C * g`` columns (rows of dropped channels zero) and their error.

        Exact from the stored rows (in sample space when they are fewer than the kept columns); without
        rows, the restricted refit ``W_c = P_c V_c`` and ``\\tilde f(S)``.
        """
        mask = channel_mask(mask, self.n_channels)
        weights = np.zeros((self.n_channels * self.full_group_size, self.n_outputs))
        if self.rows is None:
            compressed, value = super().refit(mask)
            v = compressed.reshape(self.n_channels, self.group_size, -1)
            weights[:] = np.einsum("cgs,cso->cgo", self.projection, v).reshape(weights.shape)
            return weights, value
        cols = self.full_columns(mask)
        if cols.size == 0:
            return weights, self.yy
        x, y = self.rows
        xs = x[:, cols].astype(np.float64)
        if self.means is not None:
            xs -= self.means[0][cols]
            y = y - self.means[1]
        r = self.ridge
        if r > 0 and xs.shape[0] < cols.size:  # sample space: N x N
            k = xs @ xs.T
            k[np.diag_indices_from(k)] += r
            a = scipy.linalg.cho_solve(scipy.linalg.cho_factor(k), y)
            weights[cols] = xs.T @ a
            return weights, float(r * np.sum(y * a))
        h = xs.T @ xs
        h[np.diag_indices_from(h)] += r
        b = xs.T @ y
        try:
            w = scipy.linalg.cho_solve(scipy.linalg.cho_factor(h), b)
        except np.linalg.LinAlgError:  # no ridge, collinear columns: the minimum-norm solution
            w = scipy.linalg.lstsq(h, b, cond=1e-12)[0]
        weights[cols] = w
        return weights, float(self.yy - np.sum(b * w))
