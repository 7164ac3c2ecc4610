"""Input validation shared by the public entry points.

Each helper returns a clean value or raises ``ValueError`` naming the argument in backticks,
what was found and what is required.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np


def as_finite_array(value: Any, name: str, *, ndim: int | tuple[int, ...]) -> np.ndarray:
    """A float64 copy of ``value`` (NumPy or torch), checked for dimension and finiteness."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    try:
        array = np.array(value, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"`{name}` must be a numeric array.") from exc
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if array.ndim not in allowed:
        raise ValueError(f"`{name}` must have {' or '.join(map(str, allowed))} dimensions, got {array.ndim}.")
    if array.size == 0:
        raise ValueError(f"`{name}` must not be empty.")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` must be finite; it holds NaN or inf values.")
    return array


def check_nonnegative_scalar(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        try:
            value = float(value)  # 0-d arrays and tensors
        except (TypeError, ValueError) as exc:
            raise ValueError(f"`{name}` must be a real number, got {value!r}.") from exc
    value = float(value)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value}.")
    return value


def check_integer(value: Any, name: str, low: int, high: int) -> int:
    """An integer in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"`{name}` must be an integer, got {value!r}.")
    if not low <= value <= high:
        raise ValueError(f"`{name}` must lie in [{low}, {high}], got {value}.")
    return int(value)


def check_group_size(group_size: Any, n_features: int) -> int:
    group_size = check_integer(group_size, "group_size", 1, max(n_features, 1))
    if n_features % group_size:
        raise ValueError(
            f"`group_size` ({group_size}) must divide the number of feature columns ({n_features})."
        )
    return group_size


def check_psd(gram: np.ndarray, name: str, rtol: float = 1e-6) -> np.ndarray:
    """Symmetrise ``gram`` after checking it is symmetric and positive semidefinite.

    Tolerances are relative to the largest entry / eigenvalue so that statistics accumulated in
    float32 still pass, while a matrix that is not a Gram matrix does not. A Cholesky factorisation
    of ``gram + rtol * trace(gram) I`` (``trace >= lambda_max``) accepts every matrix whose smallest
    eigenvalue is ``>= -rtol * lambda_max`` at a fraction of an eigendecomposition's cost (the
    pipeline builds one problem per layer and per refit); only when it fails are the eigenvalues
    computed, for the exact rule and the message.
    """
    scale = max(float(np.max(np.abs(gram))), np.finfo(float).tiny)
    if np.max(np.abs(gram - gram.T)) > rtol * scale:
        raise ValueError(f"`{name}` must be symmetric (it should be X^T X).")
    gram = 0.5 * (gram + gram.T)
    shift = rtol * max(float(np.trace(gram)), np.finfo(float).tiny)
    try:
        np.linalg.cholesky(gram + shift * np.eye(gram.shape[0]))
        return gram
    except np.linalg.LinAlgError:
        pass
    eigenvalues = np.linalg.eigvalsh(gram)
    if eigenvalues[0] < -rtol * max(eigenvalues[-1], np.finfo(float).tiny):
        raise ValueError(
            f"`{name}` must be positive semidefinite (it should be X^T X); its smallest "
            f"eigenvalue is {eigenvalues[0]:.3g}."
        )
    return gram


def channel_mask(mask: Any, n_channels: int) -> np.ndarray:
    """A boolean mask of length ``n_channels`` from a boolean mask or an array of indices."""
    array = np.asarray(mask)
    if array.dtype == bool:
        if array.shape != (n_channels,):
            raise ValueError(f"`mask` must have shape ({n_channels},), got {array.shape}.")
        return array
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError("`mask` must be a boolean mask or an array of channel indices.")
    indices = array.astype(int).ravel()
    if indices.size and (indices.min() < 0 or indices.max() >= n_channels):
        raise ValueError(f"channel indices in `mask` must lie in [0, {n_channels - 1}].")
    if np.unique(indices).size != indices.size:
        raise ValueError("channel indices in `mask` must not repeat.")
    out = np.zeros(n_channels, dtype=bool)
    out[indices] = True
    return out


def finite_scalar(value: Any, name: str) -> float:
    """``value`` as a finite float, or a ValueError naming ``name``."""
    try:
        value = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"`{name}` must be a real number, got {value!r}.") from exc
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value}.")
    return value
