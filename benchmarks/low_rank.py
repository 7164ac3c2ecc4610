"""Low-rank factorization against channel pruning on a trained ResNet-20, no fine-tuning (issue 23).

On one ResNet-20 (``orprune.examples.zoo``) trained briefly on scikit-learn's 8x8 digits, at each MACs
budget, test accuracy right after compression of:

- ``factorize``: :func:`orprune.factorize` (certified rank curves, allocation MILP, sequential closed-form
  refit with residual targets: every Linear / Conv2d becomes a kxk conv to r channels + a 1x1 conv, or stays);
- ``factorize, no refit``: the same ranks, maps from the original statistics (``sequential=False``);
- ``SVD of weights``: the same ranks, but each layer's truncated SVD of its own weights (data-free, the
  decomposition TRP applies after training), bias unchanged;
- ``prune``: :func:`orprune.prune` (channel pruning, greedy curves, MILP, sequential refit).

With ``--trp-epochs E``, the trained model is also trained E more epochs with Trained Rank Pruning
(:func:`orprune.train_with_trp`: nuclear norm, energy truncation every ``--trp-period`` steps) and the table gains
TRP's own decomposition (ranks from the energy threshold, SVD factors, at whatever MACs that gives) and
``factorize`` of the TRP-trained model at each budget.

Run ``python -m benchmarks.low_rank`` (``--help`` for the settings); writes ``benchmarks/results/low_rank.md``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import warnings
from datetime import date

import torch

import orprune
from benchmarks.common import CACHE_DIR, RESULTS_DIR, machine
from orprune.examples.datasets import load_digits, load_named
from orprune.examples.zoo import resnet20
from orprune.network.graph import weight_matrix
from orprune.training import batches, evaluate, train

#: Datasets the ResNet-20 benchmarks train on (``orprune.examples.datasets.load_named`` names).
DATASETS = ("digits", "fashion-mnist")


def load_split(dataset: str, split: str, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``size`` images of ``split`` of ``dataset`` (all when ``None``).

    A prefix rather than a random subset, so the calibration and probe images (also prefixes of the train split)
    and the cached model's training set stay nested and reproducible without a seed.
    """
    if dataset not in DATASETS:
        raise ValueError(f"`dataset` must be one of {DATASETS}, got {dataset!r}.")
    images, labels, _ = load_named(dataset, split=split)
    if size is not None:
        if size < 1:
            raise ValueError(f"the subset size must be at least 1, got {size}.")
        images, labels = images[:size], labels[:size]
    return images, labels


def trained(epochs: int, seed: int, dataset: str = "digits", train_size: int | None = None,
            test_size: int | None = None) -> tuple[torch.nn.Module, float]:
    """ResNet-20 (1 input channel) trained on the first ``train_size`` images of ``dataset``'s train split, and
    its accuracy on the first ``test_size`` test images (cached under ``benchmarks/cache``).

    ``train_size`` exists because one torch thread trains ResNet-20 on 28x28 Fashion-MNIST at ~4 ms per image:
    the whole 60000-image split would take over an hour for a few epochs. The cache name holds the dataset and the
    subset size (the digits' full split keeps its old name, so existing caches stay valid).
    """
    tag = dataset if dataset == "digits" and train_size is None else f"{dataset}_n{train_size or 'all'}"
    path = CACHE_DIR / f"resnet20_{tag}_e{epochs}_s{seed}.pt"
    torch.manual_seed(seed)
    model = resnet20(num_classes=10, in_channels=1)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu"))
    else:
        images, labels = load_split(dataset, "train", train_size)
        train(model, images, labels, epochs=epochs, lr=0.1, seed=seed, threads=1, flip=False, progress=False)
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    test_images, test_labels = load_split(dataset, "test", test_size)
    return model.eval(), evaluate(model, test_images, test_labels)


def svd_of_weights(model: torch.nn.Module, result: orprune.FactorizeResult, example: torch.Tensor) -> torch.nn.Module:
    """The ranks of ``result``, each layer's truncated SVD of its own weights (no data)."""
    factors = {}
    for name, f in result.factors.items():
        u, s, vt = torch.linalg.svd(weight_matrix(model.get_submodule(name)).double(), full_matrices=False)
        r = f.rank
        factors[name] = orprune.LayerFactors(u[:, :r] * s[:r], vt[:r])
    return orprune.apply_factorization(model, factors)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--macs", type=float, nargs="+", default=[0.5, 0.33], help="MACs budgets (fractions)")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs on the digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration", type=int, default=1024, help="calibration images (train split)")
    parser.add_argument("--trp-epochs", type=float, default=0, help="epochs of TRP training (0: no TRP rows)")
    parser.add_argument("--trp-energy", type=float, default=0.95)
    parser.add_argument("--trp-nuclear", type=float, default=1e-4, help="weight of the nuclear norm")
    parser.add_argument("--trp-period", type=int, default=20, help="steps between truncations")
    parser.add_argument("--trp-lr", type=float, default=0.02, help="peak learning rate of the TRP training")
    parser.add_argument("--output", default=str(RESULTS_DIR / "low_rank.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    model, accuracy = trained(args.epochs, args.seed)
    images, _ = load_digits("train")
    test_images, test_labels = load_digits("test")
    calibration = list(batches(images, 128, args.calibration))
    example = calibration[0][:1]
    macs0, params0 = orprune.count_macs_params(model, example)
    rows, ranks_text = [], []
    trp = None
    if args.trp_epochs > 0:
        t = time.perf_counter()
        trp = orprune.train_with_trp(model, images, load_digits("train")[1], epochs=args.trp_epochs, lr=args.trp_lr,
                                     nuclear=args.trp_nuclear, energy=args.trp_energy, period=args.trp_period,
                                     ignored_layers=["linear"], flip=False, threads=1, progress=False)
        m, p = orprune.count_macs_params(trp.model, example)
        rows.append((None, f"TRP ({args.trp_epochs:g} epochs, energy {args.trp_energy}, nuclear {args.trp_nuclear:g}, "
                     f"period {args.trp_period}, lr {args.trp_lr:g}),"
                     " its own decomposition", evaluate(trp.model, test_images, test_labels), m / macs0, p / params0,
                     time.perf_counter() - t))
        rows.append((None, "TRP-trained, before decomposition", evaluate(trp.trained, test_images, test_labels),
                     1.0, 1.0, None))
    for budget in args.macs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = time.perf_counter()
            fact = orprune.factorize(model, calibration, macs=budget)
            fact_time = time.perf_counter() - t
            plain = orprune.factorize(model, calibration, macs=budget, sequential=False)
            t = time.perf_counter()
            pruned = orprune.prune(model, calibration, macs=budget, solver="greedy", progress=False)
            prune_time = time.perf_counter() - t
            trp_fact = None if trp is None else orprune.factorize(trp.trained, calibration, macs=budget)
        svd = svd_of_weights(model, fact, example)
        if trp_fact is not None:
            m, p = orprune.count_macs_params(trp_fact.model, example)
            rows.append((budget, "factorize of the TRP-trained model", evaluate(trp_fact.model, test_images,
                                                                                test_labels), m / macs0, p / params0,
                         None))
        for label, net, seconds in (("factorize (MILP ranks, sequential refit)", fact.model, fact_time),
                                    ("factorize, no refit", plain.model, None),
                                    ("SVD of weights, same ranks (data-free)", svd, None),
                                    ("prune (channels, greedy curves)", pruned.model, prune_time)):
            m, p = orprune.count_macs_params(net, example)
            rows.append((budget, label, evaluate(net, test_images, test_labels), m / macs0, p / params0, seconds))
        chosen = ", ".join(f"{n}: {'-' if r is None else r}/{layer.max_rank}"
                           for layer in fact.layers for n, r in [(layer.name, layer.rank)])
        ranks_text.append(f"- {budget:.0%} MACs: {chosen}")
    lines = [
        "# Low-rank factorization vs channel pruning: resnet20 on digits, no fine-tuning",
        "",
        f"Produced by `{shlex.join(['python', '-m', 'benchmarks.low_rank', *(argv if argv is not None else sys.argv[1:])])}` "
        f"on {date.today()} ({machine()}, 1 torch thread, {time.perf_counter() - start:.0f} s).",
        "",
        f"ResNet-20 (1 input channel) trained {args.epochs} epochs on the 8x8 digits' train split (1437 images): "
        f"test accuracy {accuracy:.2%} on the 360 test images, {macs0:,} MACs, {params0:,} params. Calibration: "
        f"the first {args.calibration} training images. MACs and params as torch-pruning counts them, relative to "
        "the unpruned model. No fine-tuning, no BatchNorm re-estimation.",
        "",
        "| MACs budget | method | test accuracy | MACs | params | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for budget, label, acc, m, p, seconds in rows:
        lines.append(f"| {'-' if budget is None else f'{budget:.0%}'} | {label} | {acc:.2%} | {m:.1%} | {p:.1%} | "
                     f"{'' if seconds is None else f'{seconds:.1f}'} |")
    lines += ["", "Ranks chosen by the MILP (`-`: layer kept whole; rank / max rank):", "", *ranks_text, ""]
    text = "\n".join(lines)
    with open(args.output, "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
