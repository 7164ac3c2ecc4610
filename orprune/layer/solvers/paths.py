"""Whole error curves in one pass: blocked forward selection and backward elimination.

Both directions eliminate channels from a state matrix ``X`` and right-hand side ``Y`` over the
channels still undecided:

* **forward** (``X = P``, ``Y = R``, the Schur complement and residual correlation of the kept set,
  as in :func:`~orprune.layer.solvers.greedy.greedy_path`): adding ``c`` lowers the error by
  ``Y_c^T X_cc^+ Y_c``;
* **backward** (``X = M = H_AA^{-1}``, ``Y = M B_A`` for the alive set ``A``, as in
  :func:`~orprune.layer.solvers.local_search.backward_elimination`): removing ``c`` raises it by
  ``Y_c^T X_cc^{-1} Y_c`` (Woodbury / OBS).

In both, taking a block ``J`` of channels out of the undecided set updates the state by one Schur
complement, ``X <- X_RR - X_RJ X_JJ^+ X_JR``, ``Y <- Y_R - X_RJ X_JJ^+ Y_J`` (``R`` the rest): a
rank-``|J|g`` update done as one matrix product (BLAS-3), which is what makes wide layers fast. The
block is chosen exactly sequentially inside a *pool* of the best-scored channels (the pool's own
``X_KK, Y_K`` are updated channel by channel, rank ``g`` each), so the error of every prefix is exact;
only the restriction of each step's choice to the pool is approximate (OSSCAR-style batching; with
block size 1 the paths are exactly greedy and exact backward elimination). A whole path costs about
``(Cg)^3`` flops in either direction, against ``C (Cg)^2 g`` memory-bound ones for ``greedy_path``.
See ``formulations/fast_paths.md``.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.linalg

from orprune.layer.problem import LayerProblem
from orprune.layer.solvers.registry import heuristic_selection, register_solver

__all__ = ["nested_path", "best_paths", "compress_outputs"]


def _pinv_psd(matrix: np.ndarray, threshold: float) -> np.ndarray:
    """Pseudo-inverse(s) of symmetric PSD matrices (stacked on leading axes), eigenvalues below ``threshold`` cut."""
    values, vectors = np.linalg.eigh(matrix)
    inverse = np.where(values > threshold, 1.0 / np.where(values > threshold, values, 1.0), 0.0)
    return np.einsum("...ij,...j,...kj->...ik", vectors, inverse, vectors)


def _columns(channels: np.ndarray, g: int) -> np.ndarray:
    return (np.asarray(channels, dtype=int)[:, None] * g + np.arange(g)).ravel()


def compress_outputs(cross: np.ndarray) -> np.ndarray:
    """A matrix ``F`` with at most ``n_features`` columns and ``F F^T = B B^T``.

    Every error depends on ``B`` only through ``B B^T`` (``f(S) = yy - tr(H_SS^{-1} (B B^T)_SS)``), so a
    layer with more outputs than feature columns can be solved with the triangular factor of a QR of
    ``B^T`` (exact up to rounding).
    """
    if cross.shape[1] <= cross.shape[0]:
        return cross
    r = scipy.linalg.qr(cross.T, mode="r", check_finite=False)[0]
    return np.ascontiguousarray(r[: cross.shape[0]].T)


def _block_size(n: int, g: int, block: int | None) -> int:
    """Channels per block step: about ``n g / 32`` columns, at most 256, one channel for small layers."""
    if block is not None:
        return max(1, min(int(block), n))
    return max(1, min(n * g // 32, 256) // g)


def _eliminate(X: np.ndarray, Y: np.ndarray, cols: np.ndarray, threshold: float) -> None:
    """In place: ``X <- X - X_{:J} X_JJ^+ X_{J:}``, ``Y <- Y - X_{:J} X_JJ^+ Y_J`` (``cols`` are J's columns).

    The rows and columns of ``J`` become zero (the Schur complement of a block in itself), so the
    matrix keeps its size; the caller compacts it now and then.
    """
    A = X[:, cols]
    Z = _pinv_psd(X[np.ix_(cols, cols)], threshold) @ A.T  # (|J|g, n g)
    Y -= Z.T @ Y[cols]
    # X -= A @ Z with one BLAS gemm on the Fortran view of the C-ordered symmetric matrix
    scipy.linalg.blas.dgemm(-1.0, Z.T, A.T, beta=1.0, c=X.T, overwrite_c=True)
    X[cols, :] = 0.0
    X[:, cols] = 0.0
    Y[cols] = 0.0


class _Part:
    """The state of one consumer of the unit: ``X``, ``Y`` over the undecided channels' columns."""

    def __init__(self, prob: LayerProblem, scale: float, forward: bool) -> None:
        from orprune.layer.solvers._perspective import spd_inverse

        self.g = prob.group_size
        H = prob.gram * scale
        H[np.diag_indices_from(H)] += prob.ridge * scale  # no dense identity: wide layers are GBs
        B = compress_outputs(prob.cross) * scale
        if forward:
            self.X, self.Y = H, B
            self.value = scale * prob.yy
            self.threshold = 1e-10 * max(float(np.max(np.diag(H))), np.finfo(float).tiny)
        else:
            self.X = spd_inverse(H)
            del H
            self.Y = self.X @ B
            self.value = max(scale * prob.yy - float(np.sum(B * self.Y)), 0.0)
            self.threshold = 1e-13 * max(float(np.max(np.diag(self.X))), np.finfo(float).tiny)

    def scores(self, idx: np.ndarray) -> np.ndarray:
        """``Y_c^T X_cc^+ Y_c`` of the blocks ``idx``."""
        g, size = self.g, self.X.shape[0] // self.g
        Xb = self.X.reshape(size, g, size, g)[idx, :, idx, :]
        Yb = self.Y.reshape(size, g, -1)[idx]
        return np.einsum("cgo,cgh,cho->c", Yb, _pinv_psd(Xb, self.threshold), Yb)

    def pool(self, candidates: np.ndarray) -> _Pool:
        cols = _columns(candidates, self.g)
        return _Pool(self.X[np.ix_(cols, cols)], self.Y[cols], self.g, self.threshold)

    def eliminate(self, chosen: np.ndarray) -> None:
        _eliminate(self.X, self.Y, _columns(chosen, self.g), self.threshold)

    def compact(self, keep: np.ndarray) -> None:
        cols = _columns(keep, self.g)
        self.X, self.Y = self.X[np.ix_(cols, cols)], self.Y[cols]


class _Pool:
    """``X_KK, Y_K`` of the pool, updated channel by channel (rank ``g``)."""

    def __init__(self, X: np.ndarray, Y: np.ndarray, g: int, threshold: float) -> None:
        self.X, self.Y, self.g, self.threshold = X, Y, g, threshold
        self.m = X.shape[0] // g

    def scores(self) -> np.ndarray:
        m, g = self.m, self.g
        self.inverse = _pinv_psd(self.X.reshape(m, g, m, g)[np.arange(m), :, np.arange(m), :], self.threshold)
        Yb = self.Y.reshape(m, g, -1)
        return np.einsum("cgo,cgh,cho->c", Yb, self.inverse, Yb)

    def take(self, j: int) -> None:
        jc = slice(j * self.g, (j + 1) * self.g)
        step = self.X[:, jc] @ self.inverse[j]
        self.Y = self.Y - step @ self.Y[jc]
        self.X = self.X - step @ self.X[jc, :]


def _parts(prob: LayerProblem) -> list[tuple[LayerProblem, float]]:
    """The consumers of a combined problem (their Gram matrices do not interact), or the problem itself."""
    components = getattr(prob, "components", None)
    return list(components) if components else [(prob, 1.0)]


def nested_path(
    prob: LayerProblem,
    direction: str = "backward",
    *,
    block: int | None = None,
    pool: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One nested path over all keep counts, forward from no channel or backward from all.

    A problem made by :meth:`LayerProblem.combine` is solved consumer by consumer: its Gram
    matrix is block diagonal across consumers, so each keeps its own ``X`` (``(C g_p)^2`` instead
    of ``(C sum_p g_p)^2`` memory, and ``sum_p (C g_p)^3`` instead of ``(C sum_p g_p)^3`` flops).

    Parameters
    ----------
    prob : LayerProblem
    direction : {"backward", "forward"}
    block : int, optional
        Channels decided per block update; default about ``C g / 32`` columns (at most 256), so a
        layer of up to 32 channels (any ``g``) is done one channel at a time.
    pool : int, optional
        Best-scored channels among which each block is chosen sequentially; default ``2 block + 8``.
    progress : bool, default False
        Show a progress bar with an ETA (wide layers).

    Returns
    -------
    order : ndarray of int, shape (C,)
        ``order[:k]`` is the mask of ``k`` kept channels, for every ``k``.
    errors : ndarray, shape (C + 1,)
        ``errors[k]`` is the error of ``order[:k]`` (equal to ``prob.objective`` up to rounding);
        ``errors[0] = ||Y||^2``.

    Raises
    ------
    numpy.linalg.LinAlgError
        ``direction="backward"`` when ``G + rI`` is singular (no ridge and too few samples).
    """
    if direction not in ("backward", "forward"):
        raise ValueError(f"`direction` must be 'backward' or 'forward', got {direction!r}.")
    forward = direction == "forward"
    C = prob.n_channels
    g = sum(p.group_size for p, _ in _parts(prob))
    parts = [_Part(p, s, forward) for p, s in _parts(prob)]
    value = sum(part.value for part in parts)
    channel = np.arange(C)  # original channel of each block of the parts' X
    alive = np.ones(C, dtype=bool)  # blocks still undecided
    decided: list[int] = []
    values = [value]
    bar = _progress(C, direction, progress)
    worst = -np.inf if forward else np.inf
    while alive.any():
        idx = np.flatnonzero(alive)
        n = idx.size
        b = _block_size(n, g, block)
        m = min(n, 2 * b + 8 if pool is None else max(int(pool), b))
        if m == n:
            candidates = idx
        else:
            scores = sum(part.scores(idx) for part in parts)
            candidates = idx[np.argpartition(-scores if forward else scores, m - 1)[:m]]
        pools = [part.pool(candidates) for part in parts]
        free = np.ones(m, dtype=bool)
        picked: list[int] = []
        for _ in range(b):
            local = sum(q.scores() for q in pools)
            local[~free] = worst
            j = int(np.argmax(local) if forward else np.argmin(local))
            for q in pools:
                q.take(j)
            value = value - local[j] if forward else value + local[j]
            values.append(value)
            free[j] = False
            picked.append(j)
        chosen = candidates[np.asarray(picked)]
        decided.extend(channel[chosen].tolist())
        alive[chosen] = False
        remaining = int(alive.sum())
        if remaining:
            for part in parts:
                part.eliminate(chosen)
        if 0 < remaining < 0.7 * alive.size:  # compact: drop the decided (now zero) blocks
            keep = np.flatnonzero(alive)
            for part in parts:
                part.compact(keep)
            channel, alive = channel[keep], np.ones(keep.size, dtype=bool)
        if bar is not None:
            bar.update(len(picked))
    if bar is not None:
        bar.close()
    values = np.maximum(np.asarray(values), 0.0)
    if forward:
        return np.asarray(decided, dtype=int), values
    # backward: decided[i] was removed when C - i channels were alive; keep counts run the other way
    return np.asarray(decided[::-1], dtype=int), values[::-1].copy()


def _progress(total: int, direction: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{direction} path", leave=False)


def best_paths(prob: LayerProblem, keep_counts: np.ndarray | None = None, *, block: int | None = None,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Forward and backward paths; at every keep count the better of the two masks.

    Parameters
    ----------
    prob : LayerProblem
    keep_counts : ndarray of int, optional
        Default ``0..C``.
    block : int, optional
        See :func:`nested_path`.
    progress : bool, default False

    Returns
    -------
    masks : ndarray of bool, shape (len(keep_counts), C)
    errors : ndarray, shape (len(keep_counts),)
        ``errors[i]`` is the error of ``masks[i]`` (up to rounding).
    """
    C = prob.n_channels
    counts = np.arange(C + 1) if keep_counts is None else np.asarray(keep_counts, dtype=int)
    paths = [nested_path(prob, "forward", block=block, progress=progress)]
    try:
        paths.append(nested_path(prob, "backward", block=block, progress=progress))
    except np.linalg.LinAlgError:  # singular G without ridge: the forward path alone
        pass
    candidates = np.array([errors[counts] for _, errors in paths])
    which = np.argmin(candidates, axis=0)
    masks = np.zeros((counts.size, C), dtype=bool)
    for i, k in enumerate(counts):
        masks[i, paths[which[i]][0][:k]] = True
    return masks, candidates[which, np.arange(counts.size)]


@register_solver("path", exact=False,
                 description="better of blocked forward selection and backward elimination (fast on wide layers)")
def solve_path(prob: LayerProblem, k: int, *, time_limit: float | None = None):
    """The better of the two nested paths at ``k``; a heuristic (status ``"feasible"``)."""
    start = time.perf_counter()
    masks, errors = best_paths(prob, np.array([k]))
    return heuristic_selection(prob, masks[0], "path", start, info={"path_objective": float(errors[0])})
