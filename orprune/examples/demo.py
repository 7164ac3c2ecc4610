"""``orprune demo``: the whole job on an embedded default, end to end.

Trains a small CNN (scikit-learn's digits, or Fashion-MNIST when the Debian package
``dataset-fashion-mnist`` or a torchvision root is available), computes the layers' error curves
once, prunes at several MACs budgets from those curves (one allocation MILP per budget), and
compares with torch-pruning's magnitude pruner at the same MACs, without any fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from orprune.examples.baselines import recalibrate_batchnorm, torch_pruning_baseline
from orprune.examples.datasets import load_named
from orprune.examples.zoo import SmallCNN
from orprune.network.costs import count_macs_params
from orprune.pipeline import Pruner
from orprune.training import batches, evaluate, train

__all__ = ["run_demo"]


def _table(rows: list[dict]) -> str:
    header = "| method | MACs kept | MACs | params | accuracy | time (s) |\n|---|---|---|---|---|---|"
    lines = [
        f"| {r['method']} | {r['macs_fraction']:.3f} | {r['macs']:,} | {r['params']:,} | {r['accuracy']:.4f} | {r['seconds']:.1f} |"
        for r in rows
    ]
    return "\n".join([header, *lines])


def _plot(rows: list[dict], path: Path, dataset: str) -> bool:
    """Accuracy against MACs kept per method, the unpruned model's accuracy as a dashed line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 4))
    unpruned = next(r for r in rows if r["method"] == "unpruned")
    ax.axhline(unpruned["accuracy"], color="0.4", linestyle="--", linewidth=1,
               label=f"unpruned ({unpruned['accuracy']:.3f})")
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "unpruned"):
        pts = sorted((r["macs_fraction"], r["accuracy"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*pts), marker="o", label=method)
    ax.set_xlabel("fraction of MACs kept")
    ax.set_ylabel("test accuracy (no fine-tuning)")
    ax.set_title(f"orprune demo: SmallCNN on {dataset}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_demo(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    progress = not args.quiet
    train_x, train_y, dataset = load_named(args.dataset, args.data_root, "train")
    test_x, test_y, _ = load_named(dataset, args.data_root, "test")
    if dataset == "fashion-mnist":  # a demo, not a benchmark: a subset trains in about a minute
        keep = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(args.seed))[:12000]
        train_x, train_y = train_x[keep], train_y[keep]
    epochs = args.epochs if args.epochs is not None else (3 if dataset == "fashion-mnist" else 20)
    print(f"dataset: {dataset} ({len(train_y)} training, {len(test_y)} test images)")

    model = SmallCNN(train_x.shape[1], int(train_y.max()) + 1)
    start = time.perf_counter()
    train(model, train_x, train_y, epochs=epochs, seed=args.seed, progress=progress, flip=dataset != "digits")
    base_accuracy = evaluate(model, test_x, test_y)
    example = train_x[:1]
    base_macs, base_params = count_macs_params(model, example)
    print(f"trained in {time.perf_counter() - start:.1f} s: test accuracy {base_accuracy:.4f}, "
          f"{base_macs:,} MACs, {base_params:,} params")
    rows = [dict(method="unpruned", macs_fraction=1.0, macs=base_macs, params=base_params,
                 accuracy=base_accuracy, seconds=0.0)]

    calibration = list(batches(train_x, 128, args.calibration))
    start = time.perf_counter()
    pruner = Pruner(solver=args.solver, progress=progress).fit(model, calibration)
    fit_seconds = time.perf_counter() - start
    print(f"error curves of {len(pruner.curves_)} channel groups in {fit_seconds:.1f} s")
    for fraction in args.macs:
        start = time.perf_counter()
        result = pruner.prune(macs=fraction)
        seconds = time.perf_counter() - start
        rows.append(dict(method=f"orprune ({args.solver})", macs_fraction=result.macs_after / base_macs,
                         macs=result.macs_after, params=result.params_after,
                         accuracy=evaluate(result.model, test_x, test_y), seconds=seconds))
        start = time.perf_counter()
        baseline = torch_pruning_baseline(model, example, macs=fraction)
        seconds = time.perf_counter() - start
        macs, params = count_macs_params(baseline, example)
        rows.append(dict(method="torch-pruning magnitude", macs_fraction=macs / base_macs, macs=macs, params=params,
                         accuracy=evaluate(baseline, test_x, test_y), seconds=seconds))
        recalibrate_batchnorm(baseline, calibration)
        rows.append(dict(method="torch-pruning magnitude + BN re-estimation", macs_fraction=macs / base_macs,
                         macs=macs, params=params, accuracy=evaluate(baseline, test_x, test_y), seconds=seconds))

    table = _table(rows)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"dataset": dataset, "fit_seconds": fit_seconds, "rows": rows}, indent=2))
    (out / "report.md").write_text(f"# orprune demo on {dataset}\n\nNo fine-tuning after pruning.\n\n{table}\n")
    plotted = _plot(rows, out / "accuracy_vs_macs.png", dataset)
    print(f"report: {out / 'report.md'}" + (f", plot: {out / 'accuracy_vs_macs.png'}" if plotted else ""))
    return 0
