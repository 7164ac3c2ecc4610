"""The channel-selection problem of one layer, held as sufficient statistics.

For a consumer layer whose input has ``C`` channels, channel ``c`` owns the feature columns
``[c*g, (c+1)*g)`` of the design matrix ``X`` (``g = kh*kw`` for a convolution through unfold,
``g = 1`` for a Linear). With ``S`` the kept channels, the layer's reconstruction error is

.. math::

    f(S) = \\min_W \\|Y - X_S W\\|_F^2 + r \\|W\\|_F^2
         = \\|Y\\|_F^2 - \\operatorname{tr}\\left(B_S^T (G_{SS} + r I)^{-1} B_S\\right)

with ``G = X^T X``, ``B = X^T Y``. Only ``G``, ``B`` and ``||Y||^2`` are stored, so memory never
depends on the number of samples. See ``formulations/indicator_mip.md`` and
``formulations/least_squares_reconstruction.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

import numpy as np
import scipy.linalg

from orprune._validation import (
    as_finite_array,
    channel_mask,
    check_group_size,
    check_nonnegative_scalar,
    check_psd,
)

__all__ = ["LayerProblem", "StatisticsAccumulator"]


class LayerProblem:
    """Least-squares channel selection for one layer, from sufficient statistics.

    Parameters
    ----------
    gram : array_like, shape (C*g, C*g)
        ``X^T X``, symmetric positive semidefinite (the ridge is *not* included).
    cross : array_like, shape (C*g, n_out) or (C*g,)
        ``X^T Y``.
    yy : float
        ``||Y||_F^2``.
    group_size : int, default 1
        Feature columns per channel, ``g``.
    ridge : float, default 0.0
        Absolute ridge weight ``r >= 0`` on ``||W||_F^2``.
    weights : array_like, shape (C*g, n_out), optional
        The layer's original weights in the same layout, used by the ``magnitude`` baseline.
    assume_psd : bool, default False
        Skip the positive-semidefiniteness check (a Cholesky factorisation, ``(Cg)^3 / 3`` flops):
        for ``gram`` accumulated as ``X^T X``, PSD by construction. The consistency check of
        ``gram``, ``cross`` and ``yy`` still runs.
    check : bool, default True
        False trusts ``gram`` to be symmetric PSD and consistent with ``cross`` and ``yy`` (statistics
        accumulated from one set of samples, e.g. by :class:`StatisticsAccumulator`): skips the
        symmetrisation, the PSD check and the consistency check (a full least-squares solve).

    Notes
    -----
    Prefer the constructors :meth:`from_arrays` and :meth:`from_statistics`.
    """

    def __init__(
        self,
        gram: Any,
        cross: Any,
        yy: float,
        *,
        group_size: int = 1,
        ridge: float = 0.0,
        weights: Any | None = None,
        assume_psd: bool = False,
        check: bool = True,
    ) -> None:
        gram = as_finite_array(gram, "gram", ndim=2)
        if gram.shape[0] != gram.shape[1]:
            raise ValueError(f"`gram` must be square, got shape {gram.shape}.")
        cross = as_finite_array(cross, "cross", ndim=(1, 2))
        if cross.ndim == 1:
            cross = cross[:, None]
        if cross.shape[0] != gram.shape[0]:
            raise ValueError(
                f"`cross` must have one row per column of `gram` ({gram.shape[0]}), "
                f"got shape {cross.shape}."
            )
        self.group_size = check_group_size(group_size, gram.shape[0])
        self.ridge = check_nonnegative_scalar(ridge, "ridge")
        self.yy = check_nonnegative_scalar(yy, "yy")
        # accumulated X^T X is PSD by construction: skip the O((Cg)^3) check (only symmetrise)
        self.gram = gram if not check else 0.5 * (gram + gram.T) if assume_psd else check_psd(gram, "gram")
        self.cross = cross
        if weights is not None:
            weights = as_finite_array(weights, "weights", ndim=(1, 2))
            if weights.ndim == 1:
                weights = weights[:, None]
            if weights.shape != cross.shape:
                raise ValueError(
                    f"`weights` must have the shape of `cross` {cross.shape}, got {weights.shape}."
                )
        self.weights = weights
        self.components: tuple[tuple[LayerProblem, float], ...] | None = None
        for array in (self.gram, self.cross) + ((self.weights,) if weights is not None else ()):
            array.flags.writeable = False
        # f(all channels) can never be negative; a negative value means G, B and yy do not
        # come from the same data (wrong yy, mixed batches), which would corrupt every answer.
        tolerance = 1e-6 * max(self.yy, np.finfo(float).tiny)
        if check and self.full_objective < -tolerance:
            raise ValueError(
                "`gram`, `cross` and `yy` are inconsistent: the least-squares error with every "
                f"channel kept is {self.full_objective:.6g} < 0. They must all come from the same "
                "samples (G = X^T X, B = X^T Y, yy = ||Y||^2)."
            )

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_arrays(
        cls,
        X: Any,
        Y: Any,
        *,
        group_size: int = 1,
        ridge: float = 0.0,
        weights: Any | None = None,
    ) -> LayerProblem:
        """Build the problem from the design matrix ``X`` (N, C*g) and targets ``Y`` (N, n_out)."""
        X = as_finite_array(X, "X", ndim=2)
        Y = as_finite_array(Y, "Y", ndim=(1, 2))
        if Y.ndim == 1:
            Y = Y[:, None]
        if X.shape[0] != Y.shape[0]:
            raise ValueError(
                f"`X` and `Y` must have the same number of rows, got {X.shape[0]} and {Y.shape[0]}."
            )
        acc = StatisticsAccumulator(X.shape[1], Y.shape[1])
        acc.update(X, Y)
        return acc.to_problem(group_size=group_size, ridge=ridge, weights=weights)

    @classmethod
    def from_statistics(
        cls,
        gram: Any,
        cross: Any,
        yy: float,
        *,
        group_size: int = 1,
        ridge: float = 0.0,
        weights: Any | None = None,
    ) -> LayerProblem:
        """Build the problem from accumulated ``X^T X``, ``X^T Y`` and ``||Y||^2``."""
        return cls(gram, cross, yy, group_size=group_size, ridge=ridge, weights=weights)

    @classmethod
    def combine(
        cls, problems: Sequence[LayerProblem], scales: Sequence[float] | None = None
    ) -> LayerProblem:
        """One problem over shared channels whose objective is ``sum_p scale_p * f_p(S)``.

        Used when one channel group feeds several consumer layers: keeping or dropping a channel
        is one decision, and its error sums over the consumers. Each problem's ridge is folded
        into its block of the Gram matrix, the blocks do not interact, so the refit of the
        combined problem is the refit of each problem separately.
        """
        problems = list(problems)
        if not problems or not all(isinstance(p, LayerProblem) for p in problems):
            raise ValueError("`problems` must be a non-empty sequence of LayerProblem.")
        n_channels = problems[0].n_channels
        if any(p.n_channels != n_channels for p in problems):
            raise ValueError(
                "`problems` must all have the same number of channels, got "
                f"{[p.n_channels for p in problems]}."
            )
        scales = np.ones(len(problems)) if scales is None else np.asarray(scales, dtype=float)
        if scales.shape != (len(problems),) or not np.all(np.isfinite(scales)) or np.any(scales <= 0):
            raise ValueError("`scales` must hold one positive finite number per problem.")
        combined = _CombinedProblem.__new__(_CombinedProblem)
        combined.components = tuple((p, float(s)) for p, s in zip(problems, scales))
        combined.yy = float(sum(s * p.yy for p, s in zip(problems, scales)))
        combined.group_size, combined.ridge, combined.weights = sum(p.group_size for p in problems), 0.0, None
        return combined

    @classmethod
    def _trusted(cls, gram: np.ndarray, cross: np.ndarray, yy: float, *, group_size: int) -> LayerProblem:
        """Assemble without re-validating: for blocks of problems that were validated already
        (the eigen-decomposition of the PSD check dominates the cost of building large problems)."""
        prob = cls.__new__(cls)
        prob.gram, prob.cross, prob.yy = gram, cross, float(yy)
        prob.group_size, prob.ridge, prob.weights = int(group_size), 0.0, None
        prob.components = None
        gram.flags.writeable = cross.flags.writeable = False
        return prob

    # ------------------------------------------------------------------ sizes
    @property
    def n_features(self) -> int:
        return self.gram.shape[0]

    @property
    def n_channels(self) -> int:
        return self.n_features // self.group_size

    @property
    def n_outputs(self) -> int:
        return self.cross.shape[1]

    def __repr__(self) -> str:
        return (
            f"LayerProblem(n_channels={self.n_channels}, group_size={self.group_size}, "
            f"n_outputs={self.n_outputs}, ridge={self.ridge:g})"
        )

    # ------------------------------------------------------------------ evaluation
    def columns(self, mask: Any) -> np.ndarray:
        """Feature columns owned by the kept channels (a boolean mask or channel indices)."""
        kept = np.flatnonzero(channel_mask(mask, self.n_channels))
        return (kept[:, None] * self.group_size + np.arange(self.group_size)).ravel()

    def objective(self, mask: Any) -> float:
        """Reconstruction error ``f(S)`` of keeping the channels in ``mask``."""
        if self.components:  # a combined problem: the consumers' errors add up, each solved alone
            mask = channel_mask(mask, self.n_channels)
            return float(sum(s * p.objective(mask) for p, s in self.components))
        return self._solve(self.columns(mask))[1]

    def refit(self, mask: Any) -> tuple[np.ndarray, float]:
        """Least-squares weights for the kept channels and their objective.

        Returns
        -------
        weights : ndarray, shape (C*g, n_out)
            Minimiser of ``||Y - X W||^2 + r ||W||^2`` with the rows of dropped channels zero.
        objective : float
        """
        cols = self.columns(mask)
        w_kept, value = self._solve(cols)
        weights = np.zeros_like(self.cross)
        weights[cols] = w_kept
        return weights, value

    @cached_property
    def full_objective(self) -> float:
        """``f`` with every channel kept: a lower bound on ``f(S)`` for every ``S``."""
        if self.components:
            return float(sum(s * p.full_objective for p, s in self.components))
        return self._solve(np.arange(self.n_features))[1]

    @cached_property
    def full_weights(self) -> np.ndarray:
        """Least-squares weights with every channel kept (used when `weights` is not given)."""
        return self._solve(np.arange(self.n_features))[0]

    def _solve(self, cols: np.ndarray) -> tuple[np.ndarray, float]:
        if cols.size == 0:
            return np.zeros((0, self.n_outputs)), self.yy
        h = self.gram[np.ix_(cols, cols)]
        h[np.diag_indices_from(h)] += self.ridge  # no dense identity (wide layers)
        b = self.cross[cols]
        try:
            w = scipy.linalg.cho_solve(scipy.linalg.cho_factor(h), b)
        except np.linalg.LinAlgError:
            # Singular only without ridge: B lies in range(G), any least-squares solution
            # gives the same error; take the minimum-norm one.
            w = scipy.linalg.lstsq(h, b, cond=1e-12)[0]
        return w, float(self.yy - np.sum(b * w))


class StatisticsAccumulator:
    """Accumulates ``X^T X``, ``X^T Y`` and ``||Y||^2`` batch by batch, in float64.

    Accepts NumPy arrays or torch tensors (kept on their device until :meth:`to_problem`).

    Examples
    --------
    >>> acc = StatisticsAccumulator(n_features=4, n_outputs=2)
    >>> for X, Y in batches:  # doctest: +SKIP
    ...     acc.update(X, Y)
    >>> prob = acc.to_problem(group_size=2, ridge=1e-3)  # doctest: +SKIP
    """

    #: Batch products of torch inputs in float32 agree with float64 to this relative Frobenius norm
    #: (tested); the sums over batches are always float64.
    FLOAT32_RTOL = 1e-5

    def __init__(self, n_features: int, n_outputs: int, *, float32: bool = False) -> None:
        self.n_features = int(n_features)
        self.n_outputs = int(n_outputs)
        self.float32 = bool(float32)  # torch batches: X^T X and X^T Y in float32 (on their device), summed in float64
        self.n_samples = 0
        self._gram: Any = None
        self._cross: Any = None
        self._yy: Any = 0.0
        self._sum_x: Any = None
        self._sum_y: Any = None

    def update(self, X: Any, Y: Any) -> StatisticsAccumulator:
        """Add a batch: ``X`` (n, n_features), ``Y`` (n, n_outputs)."""
        if hasattr(X, "detach"):  # torch: accumulate in float64 where the data lives
            import torch

            work = torch.float32 if self.float32 else torch.float64
            X = X.detach().reshape(X.shape[0], -1).to(work)
            Y = Y.detach().reshape(Y.shape[0], -1).to(work)
            finite = bool(X.isfinite().all()) and bool(Y.isfinite().all())
        else:
            X = np.asarray(X, dtype=float).reshape(len(X), -1)
            Y = np.asarray(Y, dtype=float).reshape(len(Y), -1)
            finite = bool(np.isfinite(X).all() and np.isfinite(Y).all())
        if not finite:
            raise ValueError("`X` and `Y` must be finite; the batch holds NaN or inf values.")
        if X.shape[1] != self.n_features or Y.shape[1] != self.n_outputs or X.shape[0] != Y.shape[0]:
            raise ValueError(
                f"batch shapes {tuple(X.shape)} and {tuple(Y.shape)} do not match "
                f"(n, {self.n_features}) and (n, {self.n_outputs})."
            )
        gram, cross, yy = X.T @ X, X.T @ Y, (Y * Y).sum()
        sum_x, sum_y = X.sum(0), Y.sum(0)
        if self.float32 and hasattr(gram, "double"):  # the batch's products in float32, their sums in float64
            gram, cross, yy, sum_x, sum_y = (v.double() for v in (gram, cross, yy, sum_x, sum_y))
        if getattr(self, "_released", False):
            raise ValueError("the accumulator's matrices were released (`release`); it takes no more batches.")
        if self._gram is None:
            self._gram, self._cross, self._yy = gram, cross, yy
            self._sum_x, self._sum_y = sum_x, sum_y
        else:
            convert = self._converter(gram)
            self._gram += convert(gram)
            self._cross += convert(cross)
            self._yy += convert(yy)
            self._sum_x += convert(sum_x)
            self._sum_y += convert(sum_y)
        self.n_samples += X.shape[0]
        return self

    def _converter(self, value: Any) -> Any:
        """Cast a batch's statistics to the kind (NumPy or torch) the accumulator already holds."""
        held_torch, batch_torch = hasattr(self._gram, "cpu"), hasattr(value, "cpu")
        if held_torch == batch_torch:
            return lambda a: a
        if held_torch:
            import torch

            return lambda a: torch.as_tensor(a, dtype=torch.float64, device=self._gram.device)
        return lambda a: a.cpu().numpy()

    def release(self) -> None:
        """Free ``X^T X`` and ``X^T Y`` (all but ``n_features (n_features + n_outputs)`` numbers' worth of
        memory is theirs); :meth:`means` still works, :meth:`statistics` and :meth:`update` no longer."""
        self._gram = self._cross = None
        self._released = True

    def _as_numpy(self, value: Any) -> np.ndarray:
        if getattr(self, "_released", False) and value is None:
            raise ValueError("the accumulator's matrices were released (`release`); only `means` remain.")
        if self._sum_x is None:
            raise ValueError("no samples were accumulated; call `update` with at least one batch.")
        return value.cpu().numpy() if hasattr(value, "cpu") else np.asarray(value, dtype=float)

    def means(self) -> tuple[np.ndarray, np.ndarray]:
        """Column means of ``X`` and ``Y``."""
        return self._as_numpy(self._sum_x) / self.n_samples, self._as_numpy(self._sum_y) / self.n_samples

    def statistics(self, *, center: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
        """``(gram, cross, yy)`` as NumPy float64.

        With ``center=True`` they are those of the centred data ``X - mean(X)``, ``Y - mean(Y)``:
        least squares on them is least squares with an unpenalised intercept, whose value for
        weights ``W`` is ``mean(Y) - mean(X) W`` (the bias compensation of CaP).
        """
        gram = self._as_numpy(self._gram)
        cross = self._as_numpy(self._cross)
        yy = float(self._yy)
        if center:
            mean_x, mean_y = self.means()
            n = self.n_samples
            raw_diagonal = np.diag(gram).copy()
            gram = gram - n * np.outer(mean_x, mean_x)
            cross = cross - n * np.outer(mean_x, mean_y)
            yy = yy - n * float(mean_y @ mean_y)
            # A column constant over the data has centred sums that are pure cancellation error (about
            # eps x its raw sums, of either sign, which breaks the Gram matrix's semidefiniteness): zero.
            constant = np.diag(gram) <= 1e-9 * np.maximum(raw_diagonal, np.finfo(float).tiny)
            if constant.any():
                gram = gram.copy()
                gram[constant, :] = 0.0
                gram[:, constant] = 0.0
                cross = cross.copy()
                cross[constant, :] = 0.0
        return 0.5 * (gram + gram.T), cross, max(yy, 0.0)

    def to_problem(
        self,
        *,
        group_size: int = 1,
        ridge: float = 0.0,
        weights: Any | None = None,
        center: bool = False,
    ) -> LayerProblem:
        """The :class:`LayerProblem` of the accumulated data (centred with ``center=True``)."""
        gram, cross, yy = self.statistics(center=center)
        return LayerProblem(gram, cross, yy, group_size=group_size, ridge=ridge, weights=weights)


class _CombinedProblem(LayerProblem):
    """A problem made by :meth:`LayerProblem.combine`: its dense matrices are built only when read.

    The union's Gram matrix is block diagonal across the consumers (``(C sum_p g_p)^2`` entries, most
    of them zero); solvers that use ``components`` (the paths, ``objective``) never build it.
    """

    @property
    def n_features(self) -> int:
        return self.n_channels * self.group_size

    @property
    def n_channels(self) -> int:
        return self.components[0][0].n_channels

    @property
    def n_outputs(self) -> int:
        return sum(p.n_outputs for p, _ in self.components)

    @cached_property
    def _dense(self) -> tuple[np.ndarray, np.ndarray]:
        n_channels, g = self.n_channels, self.group_size
        gram = np.zeros((n_channels * g, n_channels * g))
        cross = np.zeros((n_channels * g, self.n_outputs))
        offset, out_offset = 0, 0
        for p, s in self.components:
            # column j of problem p (channel j // g_p) goes to channel-major position in the union
            ch, within = np.divmod(np.arange(p.n_features), p.group_size)
            cols = ch * g + offset + within
            gram[np.ix_(cols, cols)] = s * (p.gram + p.ridge * np.eye(p.n_features))
            cross[cols, out_offset : out_offset + p.n_outputs] = s * p.cross
            offset += p.group_size
            out_offset += p.n_outputs
        gram.flags.writeable = cross.flags.writeable = False
        return gram, cross

    @property
    def gram(self) -> np.ndarray:  # type: ignore[override]
        return self._dense[0]

    @property
    def cross(self) -> np.ndarray:  # type: ignore[override]
        return self._dense[1]

