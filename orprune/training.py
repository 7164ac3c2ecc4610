"""Small training and evaluation loops on in-memory tensors (demo, notebooks, benchmarks).

Deliberately minimal: orprune is not a training framework, but pruning is judged by accuracy,
and the demo and benchmarks must train and fine-tune the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["train", "evaluate", "batches", "reinitialize", "step_counts"]

Regularizer = Callable[[], torch.Tensor]


def batches(images: torch.Tensor, batch_size: int = 128, limit: int | None = None) -> Iterator[torch.Tensor]:
    """Consecutive input batches of ``images`` (at most ``limit`` images): a calibration set."""
    images = images[:limit] if limit is not None else images
    yield from images.split(batch_size)


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: float = 2,
    batch_size: int = 128,
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    seed: int = 0,
    flip: bool = True,
    regularizer: Regularizer | None = None,
    regularizer_strength: float = 0.0,
    regularizer_until: float = 1.0,
    threads: int | None = None,
    channels_last: bool = False,
    from_scratch: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> nn.Module:
    """SGD with Nesterov momentum and a one-cycle schedule; optional random horizontal flips.

    ``from_scratch`` re-initialises every weight first (:func:`reinitialize` with ``seed``): a pruned
    architecture trained anew, UCP's retraining, instead of fine-tuning the weights it kept.

    ``epochs`` may be fractional (a short fine-tune). ``regularizer()`` is added to the loss
    times ``regularizer_strength`` (the perspective regularizer is used this way) during the first
    ``regularizer_until`` fraction of the steps; the rest trains the task loss alone, so the kept channels
    recover while groups the regularizer zeroed stay at zero (no gradient reaches a filter whose BatchNorm
    scale is zero, and weight decay keeps it there). ``threads``
    sets torch's intra-op threads for the duration (1 is much faster on a shared machine, where
    threads contend for busy cores). ``channels_last`` trains in that memory format (30-40% faster for
    convs on an AVX-512 CPU; off by default: with torch 2.13 on an AVX2 AMD EPYC, backward passes of a
    small ResNet in that format corrupted the heap and aborted the process). Returns the model in eval
    mode, in the default memory format.
    """
    if not isinstance(from_scratch, bool):
        raise ValueError(f"`from_scratch` must be True or False, got {from_scratch!r}.")
    if from_scratch:
        reinitialize(model, seed=seed)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(model, images, labels, epochs=epochs, batch_size=batch_size, lr=lr,
                      weight_decay=weight_decay, seed=seed, flip=flip, regularizer=regularizer,
                      regularizer_strength=regularizer_strength, regularizer_until=regularizer_until,
                      channels_last=channels_last, progress=progress, log=log)
    finally:
        torch.set_num_threads(previous)


def reinitialize(model: nn.Module, *, seed: int = 0) -> nn.Module:
    """Draw fresh weights for every module of ``model`` that has ``reset_parameters`` (convolutions,
    Linears, BatchNorms: their running statistics too), in place, from ``seed`` (torch's global random
    state is left as it was). Returns ``model``.
    """
    found = [m for m in model.modules() if callable(getattr(m, "reset_parameters", None))]
    if not found:
        raise ValueError("`model` has no module with `reset_parameters`: nothing to re-initialise.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in found:
            module.reset_parameters()
            if hasattr(module, "reset_running_stats"):
                module.reset_running_stats()
    return model


def step_counts(n_images: int, epochs: float, batch_size: int = 128,
                regularizer_until: float = 1.0) -> tuple[int, int]:
    """``(total, regularized)``: the optimizer steps :func:`train` takes, and how many of the first ones
    carry the regularizer (for code that regularizes outside the loss, e.g. through an optimizer hook)."""
    total = max(1, round(epochs * -(-n_images // batch_size)))
    return total, round(regularizer_until * total)


def _train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: float, batch_size: int,
           lr: float, weight_decay: float, seed: int, flip: bool, regularizer: Regularizer | None,
           regularizer_strength: float, regularizer_until: float, channels_last: bool, progress: bool,
           log: Callable[[str], None] | None) -> nn.Module:
    if epochs <= 0:
        raise ValueError(f"`epochs` must be > 0, got {epochs}.")
    if not 0.0 < regularizer_until <= 1.0:
        raise ValueError(f"`regularizer_until` must be in (0, 1] (a fraction of the steps), got {regularizer_until}.")
    if len(images) != len(labels) or len(labels) == 0:
        raise ValueError("`images` and `labels` must be non-empty and of the same length.")
    if not isinstance(channels_last, bool):
        raise ValueError(f"`channels_last` must be True or False, got {channels_last!r}.")
    generator = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    total_steps, regularized_steps = step_counts(len(labels), epochs, batch_size, regularizer_until)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps)
    step, start = 0, time.perf_counter()
    bar = tqdm(total=total_steps, desc="train", disable=not progress, leave=False)
    while step < total_steps:
        order = torch.randperm(len(labels), generator=generator)
        for index in order.split(batch_size):
            if step == total_steps:
                break
            x, y = images[index], labels[index]
            if flip:
                flipped = torch.rand(len(index), generator=generator) < 0.5
                x = torch.where(flipped[:, None, None, None], x.flip(-1), x)
            x = x.contiguous(memory_format=fmt)
            loss = F.cross_entropy(model(x), y)
            if regularizer is not None and regularizer_strength and step < regularized_steps:
                loss = loss + regularizer_strength * regularizer()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    if log:
        log(f"trained {total_steps} steps in {time.perf_counter() - start:.1f} s")
    return model.to(memory_format=torch.contiguous_format).eval()


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode)."""
    model.eval()
    correct = 0
    for x, y in zip(images.split(batch_size), labels.split(batch_size)):
        correct += int((model(x).argmax(1) == y).sum())
    return correct / len(labels)
