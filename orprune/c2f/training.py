"""Training with coarse-to-fine gating end to end: budget penalty, annealed gates, hardening, fine-tuning."""

from __future__ import annotations

import copy
import numbers
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from orprune.c2f.hardening import GatingMasks
from orprune.c2f.regularizer import CoarseToFineGating
from orprune.layer.problem import LayerProblem

__all__ = ["GatingTraining", "finetune_with_masks", "train_with_gating"]


@dataclass(frozen=True)
class GatingTraining:
    """Outcome of :func:`train_with_gating`.

    Attributes
    ----------
    model : torch.nn.Module
        The trained copy, gated with the hard masks (call ``gating.remove()`` for plain layers).
    gating : CoarseToFineGating
    masks : GatingMasks
    soft_kept_fraction : float
        The soft kept fraction at the end of the gated training (before hardening).
    train_seconds, finetune_seconds, cpu_seconds : float
        Wall times of the two phases; process CPU time of both.
    history : list of dict
        Per epoch of the gated phase: ``epoch``, ``loss``, ``penalty``, ``kept``, ``temperature``.
    """

    model: nn.Module
    gating: CoarseToFineGating
    masks: GatingMasks
    soft_kept_fraction: float
    train_seconds: float
    finetune_seconds: float
    cpu_seconds: float
    history: list = field(default_factory=list)


def _number(value: object, name: str, low: float, strict: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and (value > low if strict else value >= low)
    if not ok:
        raise ValueError(f"`{name}` must be a number {'>' if strict else '>='} {low}, got {value!r}.")
    return float(value)


def train_with_gating(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    target: float,
    epochs: float = 10,
    finetune_epochs: float = 0,
    lr: float = 1e-3,
    gate_lr: float = 0.05,
    weight_decay: float = 0.0,
    strength: float = 100.0,
    temperature: tuple[float, float] = (0.5, 0.02),
    batch_size: int = 64,
    seed: int = 0,
    layers: Iterable[str] | None = None,
    ignored_layers: Iterable[str] = (),
    problems: Mapping[str, LayerProblem] | Callable[[nn.Module], Mapping[str, LayerProblem]] | None = None,
    solver: str = "greedy",
    log: Callable[[str], None] | None = None,
) -> GatingTraining:
    r"""Train a copy of ``model`` with coarse-to-fine gates and the budget penalty, harden, fine-tune.

    Loss :math:`L(W \odot m(W)) + s\,(\bar m - \rho)^2` (:class:`CoarseToFineGating`), Adam on the weights
    (``lr``, ``weight_decay``) and on the thresholds (``gate_lr``, no decay), the gate temperature lowered
    geometrically from ``temperature[0]`` to ``temperature[1]``. Then :meth:`CoarseToFineGating.harden`
    (``problems`` / ``solver`` passed on; with ``problems`` the masks come from the data MIP and its
    least-squares weights are written into the layers), and ``finetune_epochs`` of the task loss with the masks
    fixed. ``problems`` may be a function of the trained (soft-gated) model returning the mapping, so that the
    statistics are those of the trained network (a gated layer's ``weight`` is its soft-masked weight).
    The input ``model`` is not modified. The default ``strength`` is the one of
    ``benchmarks/results/coarse_to_fine.md`` (at 10 the soft kept fraction stayed at 0.14 for a target of 0.1).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if len(images) != len(labels) or len(labels) == 0:
        raise ValueError("`images` and `labels` must be non-empty and of the same length.")
    epochs = _number(epochs, "epochs", 0, strict=True)
    finetune_epochs = _number(finetune_epochs, "finetune_epochs", 0)
    strength = _number(strength, "strength", 0)
    for value, name in ((lr, "lr"), (gate_lr, "gate_lr")):
        _number(value, name, 0, strict=True)
    _number(weight_decay, "weight_decay", 0)
    if (not isinstance(temperature, (tuple, list)) or len(temperature) != 2
            or not all(isinstance(t, numbers.Real) and t > 0 for t in temperature)):
        raise ValueError(f"`temperature` must be a pair of numbers > 0 (start, end), got {temperature!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    cpu_start = time.process_time()
    trained = copy.deepcopy(model)
    gating = CoarseToFineGating(trained, target, layers=layers, ignored_layers=ignored_layers,
                                temperature=float(temperature[0]))
    gates = {id(p) for p in gating.gate_parameters()}
    weights = [p for p in trained.parameters() if id(p) not in gates]
    optimizer = torch.optim.Adam([{"params": weights, "weight_decay": weight_decay},
                                  {"params": gating.gate_parameters(), "lr": gate_lr, "weight_decay": 0.0}], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    per_epoch = -(-len(labels) // batch_size)
    total = max(1, round(epochs * per_epoch))
    t0, t1 = float(temperature[0]), float(temperature[1])
    history: list[dict] = []
    start = time.perf_counter()
    trained.train()
    step, sums = 0, [0.0, 0.0, 0]
    while step < total:
        for index in torch.randperm(len(labels), generator=generator).split(batch_size):
            if step == total:
                break
            gating.temperature = t0 * (t1 / t0) ** (step / max(total - 1, 1))
            task = F.cross_entropy(trained(images[index]), labels[index])
            penalty = gating.penalty()
            loss = task + strength * penalty
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            sums = [sums[0] + task.item(), sums[1] + penalty.item(), sums[2] + 1]
            if step % per_epoch == 0 or step == total:
                with torch.no_grad():
                    kept = float(gating.kept_fraction())
                history.append({"epoch": step / per_epoch, "loss": sums[0] / sums[2], "penalty": sums[1] / sums[2],
                                "kept": kept, "temperature": gating.temperature})
                if log:
                    log(f"epoch {step / per_epoch:.1f}: loss {sums[0] / sums[2]:.4f}, soft kept {kept:.3f}, "
                        f"tau {gating.temperature:.3g}")
                sums = [0.0, 0.0, 0]
    train_seconds = time.perf_counter() - start
    with torch.no_grad():
        soft = float(gating.kept_fraction())
    if callable(problems):
        trained.eval()
        problems = problems(trained)
    masks = gating.harden(problems=problems, solver=solver, refit=problems is not None)
    if log:
        log(f"hardened: {masks.kept}/{masks.total} weights kept ({masks.kept_fraction:.4f}), "
            f"groups {masks.n_groups}")
    start = time.perf_counter()
    if finetune_epochs > 0:
        finetune_with_masks(trained, gating, images, labels, epochs=finetune_epochs, lr=lr, weight_decay=weight_decay,
                            batch_size=batch_size, seed=seed + 1)
    finetune_seconds = time.perf_counter() - start
    trained.eval()
    return GatingTraining(trained, gating, masks, soft, train_seconds, finetune_seconds,
                          time.process_time() - cpu_start, history)


def finetune_with_masks(
    model: nn.Module,
    gating: CoarseToFineGating,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: float,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
) -> nn.Module:
    """Train ``model`` (in place) on the task loss with the gating's hard masks fixed; the thresholds are not trained.

    Returns the model in eval mode.
    """
    if not gating.hard:
        raise ValueError("`gating` has no hard masks: call `harden()` or `fix_masks()` first.")
    epochs = _number(epochs, "epochs", 0, strict=True)
    gates = {id(p) for p in gating.gate_parameters()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if id(p) not in gates], lr=lr,
                                 weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    steps = max(1, round(epochs * -(-len(labels) // batch_size)))
    done = 0
    model.train()
    while done < steps:
        for index in torch.randperm(len(labels), generator=generator).split(batch_size):
            if done == steps:
                break
            loss = F.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
    return model.eval()
