"""Shared benchmark harness: trained models (plain and group-norm regularised), the real layer problems they give.

Everything expensive is cached under ``benchmarks/cache/`` (git-ignored): trained weights as
``.pt`` and layer problems as ``.npz``. Delete the directory to start over.

Adding a model: write its constructor, give it a name in :data:`MODELS`, and call
:func:`trained_model` / :func:`conv_layer_problem` with it; the caching and the unfold-based
statistics are model-agnostic.

Run ``python -m benchmarks.common`` to train the small CNN and build its layer problems.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from torch.optim.optimizer import register_optimizer_step_pre_hook

from orprune.examples.coverage_zoo import DenseNet, ResNeXt, ShuffleNetV2
from orprune.examples.datasets import fashion_mnist_available, load_default
from orprune.examples.zoo import SmallCNN, resnet20, vgg_small
from orprune.layer.problem import LayerProblem, StatisticsAccumulator
from orprune.training import evaluate, train

__all__ = [
    "CACHE_DIR",
    "MODELS",
    "RealLayer",
    "SmallCNN",
    "conv_layer_problem",
    "evaluate",
    "group_norm_regularisation",
    "group_norm_trained",
    "real_layer_problems",
    "train",
    "trained_model",
]

CACHE_DIR = Path(__file__).resolve().parent / "cache"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


#: name -> constructor taking keyword arguments ``in_channels`` and ``n_classes``.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": lambda in_channels, n_classes: SmallCNN(in_channels, n_classes),
    "resnet20": lambda in_channels, n_classes: resnet20(num_classes=n_classes, in_channels=in_channels),
    "vgg_small": lambda in_channels, n_classes: vgg_small(num_classes=n_classes, in_channels=in_channels),
    # issue 21's trained concatenation and grouped networks (benchmarks/cnn_accuracy.py): 5.6M and 7.3M MACs
    "densenet_small": lambda in_channels, n_classes: DenseNet(growth=8, n_layers=3, stem=16, n_classes=n_classes,
                                                              in_channels=in_channels),
    "resnext_small": lambda in_channels, n_classes: ResNeXt(stem=16, width=32, out_channels=64, groups=8,
                                                            n_classes=n_classes, in_channels=in_channels, stride=2),
    # channel shuffle (benchmarks/cnn_accuracy.py): branches of 24 and 48 channels, 2.0M MACs
    "shufflenet_small": lambda in_channels, n_classes: ShuffleNetV2(widths=(48, 96), n_classes=n_classes,
                                                                    in_channels=in_channels),
}


#: Benchmarks train in channels_last, as the committed tables were (``orprune.training.train``'s default is
#: off since that format aborted training of a small ResNet on an AVX2 CPU; the benchmark networks ran fine).
CHANNELS_LAST = True


def machine() -> str:
    """The architecture and the instruction set torch's CPU kernels use (``AVX2``, ``AVX512``): float
    results, hence trained networks and their accuracies, differ between instruction sets."""
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown ISA")()
    return f"{platform.machine()} {capability}"


def _key(**parts: object) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]


def trained_model(
    name: str = "small_cnn", *, epochs: int = 2, seed: int = 0, log: Callable[[str], None] | None = print,
    channels_last: bool = CHANNELS_LAST,
) -> tuple[nn.Module, dict]:
    """A trained model of :data:`MODELS` on the default dataset, cached on disk.

    ``channels_last`` is the training memory format (part of the cache key when it is not the default).

    Returns
    -------
    model : nn.Module in eval mode
    meta : dict with ``dataset``, ``test_accuracy``, ``train_seconds``
    """
    dataset = "fashion-mnist" if fashion_mnist_available() else "digits"  # as load_default picks
    parts = dict(name=name, dataset=dataset, epochs=epochs, seed=seed)
    key = _key(**parts) if channels_last == CHANNELS_LAST else _key(**parts, channels_last=channels_last)
    path = CACHE_DIR / f"{name}_{dataset}_{key}.pt"
    torch.manual_seed(seed)
    model = MODELS[name](in_channels=1, n_classes=10)  # both datasets: one channel, ten classes
    if path.exists():
        saved = torch.load(path, map_location="cpu")
        model.load_state_dict(saved["state_dict"])
        return model.eval(), saved["meta"]
    images, labels, dataset = load_default("train")
    start = time.perf_counter()
    train(model, images, labels, epochs=epochs, seed=seed, threads=1, channels_last=channels_last, progress=False,
          log=log)
    seconds = time.perf_counter() - start
    test_images, test_labels, _ = load_default("test")
    meta = {"dataset": dataset, "test_accuracy": evaluate(model, test_images, test_labels),
            "train_seconds": seconds, "epochs": epochs, "seed": seed}
    if log:
        log(f"{name} on {dataset}: test accuracy {meta['test_accuracy']:.4f} after {seconds:.0f} s")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "meta": meta}, path)
    return model.eval(), meta


# ------------------------------------------------------------------- group-norm regularised training
@contextmanager
def group_norm_regularisation(model: nn.Module, example_inputs: torch.Tensor,
                              reg: float) -> Iterator[tp.pruner.GroupNormPruner]:
    """torch-pruning's group-norm regulariser applied at every optimizer step inside the block.

    Builds ``GroupNormPruner(model, example_inputs, GroupMagnitudeImportance(p=2), reg=reg)`` with
    the classifier (last ``nn.Linear``) ignored, and calls its ``regularize(model)`` before every
    ``optimizer.step()`` (a global optimizer pre-step hook, so any training loop works unchanged):
    each channel group's gradients get ``reg * gamma_g * w`` added, with
    ``gamma_g = 16 ** ((max_h s_h - s_g) / (max_h s_h - min_h s_h))``, ``s_g`` the square root of the
    group's importance (its squared norms averaged over its layers, over their mean): the weakest
    group shrinks 16 times faster than the strongest. The hook is removed on exit.
    """
    model.eval()  # tracing the dependency graph must not touch BatchNorm statistics
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    pruner = tp.pruner.GroupNormPruner(model, example_inputs, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                       reg=reg, ignored_layers=head)
    handle = register_optimizer_step_pre_hook(lambda *_: pruner.regularize(model))
    try:
        yield pruner
    finally:
        handle.remove()


def _digest(tensors: list[torch.Tensor]) -> str:
    sha = hashlib.sha1()
    for t in tensors:
        sha.update(t.detach().contiguous().cpu().numpy().tobytes())
    return sha.hexdigest()[:10]


def group_norm_trained(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    reg: float,
    epochs: float,
    lr: float,
    seed: int = 0,
    threads: int | None = 1,
    log: Callable[[str], None] | None = print,
) -> tuple[nn.Module, dict]:
    """A copy of ``model`` trained further with :func:`group_norm_regularisation`, cached on disk.

    Training is :func:`orprune.training.train` on ``images`` / ``labels`` (``epochs``, one-cycle max
    ``lr``, ``seed``). The cache key hashes the starting weights and the training data themselves
    with the settings, so a changed model or subset never reuses a stale file.

    Returns
    -------
    model : nn.Module in eval mode (``model`` itself is not changed)
    meta : dict with ``train_seconds`` (of the run that produced the cached weights) and the settings
    """
    if not reg > 0:
        raise ValueError(f"`reg` must be > 0, got {reg}.")
    setting = dict(reg=reg, epochs=epochs, lr=lr, seed=seed, importance="group_magnitude_p2", alpha=16,
                   weights=_digest(list(model.state_dict().values())), data=_digest([images, labels]))
    path = CACHE_DIR / f"group_norm_{type(model).__name__}_{_key(**setting)}.pt"
    model = copy.deepcopy(model)
    if path.exists():
        saved = torch.load(path, map_location="cpu")
        model.load_state_dict(saved["state_dict"])
        return model.eval(), saved["meta"]
    with group_norm_regularisation(model, images[:1], reg):
        start = time.perf_counter()
        train(model, images, labels, epochs=epochs, lr=lr, seed=seed, threads=threads, channels_last=CHANNELS_LAST,
              progress=False, log=log)
        seconds = time.perf_counter() - start
    meta = {**setting, "train_seconds": seconds}
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "meta": meta}, path)
    return model.eval(), meta


# ---------------------------------------------------------------------------------- layer problems
@torch.no_grad()
def conv_layer_problem(
    model: nn.Module,
    conv: nn.Conv2d,
    images: torch.Tensor,
    *,
    n_samples: int = 4096,
    ridge_factor: float = 1e-4,
    seed: int = 0,
    batch_size: int = 256,
) -> LayerProblem:
    """The input-channel selection problem of ``conv``, from the model run on ``images``.

    The conv's input (the previous activation) is unfolded into rows of ``C*kh*kw`` features
    (channel-major, ``g = kh*kw``, as ``nn.Unfold`` orders them); ``n_samples`` spatial
    positions are drawn uniformly over all images and positions. Targets are the conv's original
    outputs without bias, so ``Y = X W`` holds exactly for the layer's own weights ``W``, which
    are stored in the problem layout ``(C*g, n_out)``. The ridge is ``ridge_factor`` times the
    mean diagonal of ``X^T X``.
    """
    if conv.groups != 1:
        raise ValueError("`conv` must have groups=1.")
    g = conv.kernel_size[0] * conv.kernel_size[1]
    n_out = conv.out_channels
    captured: list[torch.Tensor] = []
    handle = conv.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
    model.eval()
    weight = conv.weight.detach().double().reshape(n_out, -1).T  # (C*g, n_out)
    # Positions per batch in proportion to its size, so the draw is uniform over positions.
    generator = torch.Generator().manual_seed(seed)
    per_image = max(1, -(-n_samples // len(images)))
    acc = StatisticsAccumulator(weight.shape[0], n_out)
    try:
        for batch in images.split(batch_size):
            captured.clear()
            model(batch)
            x = captured[0].double()
            cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
            n, f, L = cols.shape  # (n, C*g, L)
            pick = torch.randint(0, L, (n, per_image), generator=generator)
            rows = cols.permute(0, 2, 1)[torch.arange(n)[:, None], pick].reshape(-1, f)
            acc.update(rows, rows @ weight)
    finally:
        handle.remove()
    gram, cross, yy = acc.statistics()
    ridge = ridge_factor * float(np.mean(np.diag(gram)))
    return LayerProblem(gram, cross, yy, group_size=g, ridge=ridge, weights=weight.numpy())


@dataclass(frozen=True)
class RealLayer:
    """A layer problem from a trained model, with where it came from."""

    name: str
    problem: LayerProblem
    n_samples: int
    source: str

    @property
    def n_channels(self) -> int:
        return self.problem.n_channels


def _save_problem(path: Path, prob: LayerProblem) -> None:
    np.savez_compressed(path, gram=prob.gram, cross=prob.cross, yy=prob.yy, group_size=prob.group_size,
                        ridge=prob.ridge, weights=prob.weights)


def _load_problem(path: Path) -> LayerProblem:
    with np.load(path) as data:
        return LayerProblem(data["gram"], data["cross"], float(data["yy"]), group_size=int(data["group_size"]),
                            ridge=float(data["ridge"]), weights=data["weights"])


def real_layer_problems(
    channels: tuple[int, ...] = (16, 32, 64),
    *,
    n_images: int = 512,
    n_samples: int = 4096,
    ridge_factor: float = 1e-4,
    epochs: int = 2,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
) -> list[RealLayer]:
    """Layer problems of the trained small CNN for its convs with ``C`` in ``channels`` inputs.

    Calibration images are ``n_images`` training images drawn with ``seed``; each problem has
    ``g = 9`` and ``n_samples`` sampled positions. Problems are cached as ``.npz``.
    """
    model, meta = trained_model("small_cnn", epochs=epochs, seed=seed, log=log)
    key = _key(model=meta, n_images=n_images, n_samples=n_samples, ridge_factor=ridge_factor, seed=seed)
    convs = {conv.in_channels: (i, conv) for i, conv in enumerate(m for m in model.features if isinstance(m, nn.Conv2d))}
    missing = [c for c in channels if c not in convs]
    if missing:
        raise ValueError(f"`channels` must be among {sorted(convs)}, got {missing}.")
    images = None
    layers = []
    for c in channels:
        index, conv = convs[c]
        name = f"small_cnn.conv{index + 1}"
        path = CACHE_DIR / f"{name}_{meta['dataset']}_{key}.npz"
        if path.exists():
            prob = _load_problem(path)
        else:
            if images is None:
                all_images, _, _ = load_default("train")
                pick = torch.randperm(len(all_images), generator=torch.Generator().manual_seed(seed + 1))[:n_images]
                images = all_images[pick]
            prob = conv_layer_problem(model, conv, images, n_samples=n_samples, ridge_factor=ridge_factor, seed=seed)
            CACHE_DIR.mkdir(parents=True, exist_ok=True)
            _save_problem(path, prob)
        source = f"{meta['dataset']}, test acc {meta['test_accuracy']:.4f}, {n_images} calibration images"
        layers.append(RealLayer(name, prob, n_images * max(1, -(-n_samples // n_images)), source))
    return layers


if __name__ == "__main__":
    for layer in real_layer_problems():
        p = layer.problem
        print(f"{layer.name}: {p!r}, N={layer.n_samples}, f(all)/yy={p.full_objective / p.yy:.2e} ({layer.source})")


def calibration_batches(images: torch.Tensor, n_images: int, seed: int, batch_size: int = 128) -> list[torch.Tensor]:
    """``n_images`` of ``images`` drawn with ``randperm(seed)``, in batches: the benchmarks' calibration set."""
    from orprune.training import batches

    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n_images]
    return list(batches(images[order], batch_size))


def network_unit_problems(
    model_name: str = "resnet20",
    *,
    n_images: int = 2048,
    epochs: int = 6,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
) -> list[RealLayer]:
    """Every prunable unit's problem of a trained model, exactly as :class:`orprune.Pruner` builds it.

    ``n_images`` calibration images (``seed``), the pipeline's defaults (32 positions per image,
    ridge 1e-4 relative); the consumers' problems are joined, each relative to its own ``||Y||^2``.
    """
    import warnings

    from orprune.pipeline import Pruner

    model, meta = trained_model(model_name, epochs=epochs, seed=seed, log=log)
    images, _, _ = load_default("train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # excluded groups (residual stream) are expected
        pruner = Pruner(solver="magnitude", progress=False, cache_targets=False).fit(
            model, calibration_batches(images, n_images, seed))
    source = (f"{model_name} on {meta['dataset']}, test acc {meta['test_accuracy']:.4f}, {n_images} calibration "
              f"images x {pruner.positions_per_image} positions")
    return [RealLayer(f"{model_name}.{unit}", problem, n_images * pruner.positions_per_image, source)
            for unit, problem in pruner.unit_problems_.items()]
