"""What the commands print about the result: accuracies measured, and loud warnings when it is useless."""

from __future__ import annotations

import sys

import torch

__all__ = ["CHANCE_MARGIN", "LOAD_HINT", "accuracy_warnings", "warn"]

#: An accuracy less than this share of the way from the majority-class rate to 1 counts as near chance.
CHANCE_MARGIN = 0.25
#: How to load what the commands save (printed, and in the JSON reports).
LOAD_HINT = "orprune.load(path, YourModel()) with YourModel() the unpruned architecture"


def accuracy_warnings(labels: torch.Tensor, before: float | None, after: float, tolerance: float,
                      what: str = "pruned", before_what: str = "model before pruning") -> list[str]:
    """Why ``after`` is useless: at chance on ``labels``, or more than ``tolerance`` below ``before``."""
    majority = float(torch.bincount(labels.long()).max()) / max(len(labels), 1)
    chance = majority + CHANCE_MARGIN * (1 - majority)
    out = []
    if before is not None and before < chance:
        out.append(f"the {before_what} is near chance: accuracy {before:.4f}, the most frequent class alone "
                   f"scores {majority:.4f} (train it longer, or check the data matches the model)")
    if after < chance:
        out.append(f"the {what} model is near chance: accuracy {after:.4f}, the most frequent class alone scores "
                   f"{majority:.4f}")
    elif before is not None and after < before - tolerance:
        out.append(f"the {what} model lost {100 * (before - after):.1f} points of accuracy ({before:.4f} -> "
                   f"{after:.4f}), more than the tolerance {tolerance:g}: prune less, or fine-tune it")
    return out


def warn(prog: str, message: str) -> None:
    sys.stdout.flush()  # after what was printed so far, also when stdout is a pipe
    print(f"{prog}: WARNING: {message}", file=sys.stderr, flush=True)
