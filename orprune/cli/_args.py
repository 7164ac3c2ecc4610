"""Argument types shared by the commands."""

from __future__ import annotations

import argparse

__all__ = ["fractions"]


def fractions(text: str) -> list[float]:
    """Comma-separated numbers in (0, 1]."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"fractions must lie in (0, 1], got {text!r}")
    return values
