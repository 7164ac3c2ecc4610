"""Argument types shared by the commands: each rejects a bad value at parse time, naming what it needs."""

from __future__ import annotations

import argparse
import math

__all__ = ["fraction", "fractions", "nonnegative_float", "nonnegative_int", "positive_float", "positive_int"]


def fractions(text: str) -> list[float]:
    """Comma-separated numbers in (0, 1]."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"fractions must lie in (0, 1], got {text!r}")
    return values


def fraction(text: str) -> float:
    """One number in (0, 1]."""
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from exc
    if not 0 < value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text!r}")
    return value


def _int(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}") from exc
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _int(text, 1)


def nonnegative_int(text: str) -> int:
    return _int(text, 0)


def _float(text: str, low_ok: bool) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from exc
    if not math.isfinite(value) or value < 0 or (value == 0 and not low_ok):
        raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if low_ok else '>'} 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    return _float(text, low_ok=False)


def nonnegative_float(text: str) -> float:
    return _float(text, low_ok=True)

