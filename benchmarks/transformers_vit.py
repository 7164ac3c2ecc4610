"""Heads and neurons of a small ViT on Fashion-MNIST: orprune vs magnitude / Wanda-sp / FLAP / Taylor.

Trains (once, cached under ``benchmarks/cache/``) a plain-torch ViT (patches of 4x4 pixels, a class
token, ``nn.TransformerEncoder`` of pre-norm ``nn.TransformerEncoderLayer`` blocks with
``nn.MultiheadAttention``) on Fashion-MNIST on one thread for ``--train-seconds``; then removes 20 /
30 / 50% of the params without fine-tuning and reports test accuracy of every method at the same
params budget, in one run, with pruning wall and CPU times. Writes
``benchmarks/results/transformers_vit.md``.

Run ``python -m benchmarks.transformers_vit`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import CACHE_DIR, RESULTS_DIR, _key, machine
from orprune.examples.datasets import load_fashion_mnist
from orprune.transformer import TransformerPruner

HEADS_AND_MLP, MLP_ONLY = ("heads", "neurons"), ("neurons",)
#: (label, TransformerPruner options, method, which units shrink)
METHODS = [("orprune greedy", dict(solver="greedy"), "orprune", HEADS_AND_MLP),
           ("orprune greedy + swap", dict(solver="greedy", swap=True), "orprune", HEADS_AND_MLP),
           ("magnitude", {}, "magnitude", HEADS_AND_MLP), ("Wanda-sp", {}, "wanda_sp", HEADS_AND_MLP),
           ("FLAP", {}, "flap", HEADS_AND_MLP), ("Taylor (LLM-Pruner)", {}, "taylor", HEADS_AND_MLP),
           ("magnitude, MLP only", {}, "magnitude", MLP_ONLY), ("Wanda-sp, MLP only", {}, "wanda_sp", MLP_ONLY),
           ("FLAP, MLP only", {}, "flap", MLP_ONLY), ("Taylor, MLP only", {}, "taylor", MLP_ONLY)]


class TinyViT(nn.Module):
    """A ViT for 1x28x28 images: 4x4 patches (49 tokens) + class token, pre-norm encoder, linear head.

    ``forward(images, labels=None)`` returns logits; ``labels`` are ignored (they ride along in the
    calibration batches for the Taylor baseline's loss).
    """

    def __init__(self, dim: int = 64, depth: int = 4, heads: int = 4, mlp: int = 256, patch: int = 4,
                 classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, patch, stride=patch)
        tokens = (28 // patch) ** 2 + 1
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, mlp, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(len(x), -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.encoder(x)[:, 0]))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--train-seconds", type=float, default=300.0,
                        help="training CPU time (process time, one thread: wall time varies on a shared machine)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (cosine decay)")
    parser.add_argument("--calibration", type=int, default=1024, help="calibration images (from training set)")
    parser.add_argument("--test", type=int, default=10000, help="test images for the accuracy (the first ones)")
    parser.add_argument("--swap-time", type=float, default=30.0, help="seconds of swap search per unit")
    parser.add_argument("--removed", type=float, nargs="+", default=[0.2, 0.3, 0.5],
                        help="fractions of all params to remove")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-only", action="store_true", help="train (and cache) the model, then stop")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "transformers_vit.md")
    return parser.parse_args(argv)


def trained(args: argparse.Namespace, images: torch.Tensor, labels: torch.Tensor) -> tuple[TinyViT, dict]:
    key = _key(cpu_seconds=args.train_seconds, batch=args.batch_size, lr=args.lr, seed=args.seed)
    path = CACHE_DIR / f"tiny_vit_fashion_{key}.pt"
    torch.manual_seed(args.seed)
    model = TinyViT()
    if path.exists():
        saved = torch.load(path, map_location="cpu")
        model.load_state_dict(saved["state_dict"])
        return model.eval(), saved["meta"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    rng = np.random.default_rng(args.seed)
    start, cpu_start, steps = time.perf_counter(), time.process_time(), 0
    model.train()
    while (elapsed := time.process_time() - cpu_start) < args.train_seconds:
        fraction = elapsed / args.train_seconds
        lr = args.lr * min(1.0, 20 * fraction) * 0.5 * (1 + math.cos(math.pi * fraction))
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.as_tensor(rng.integers(0, len(images), size=args.batch_size))
        x = images[index]
        shift = rng.integers(-2, 3, size=2)  # a random translation of the whole batch
        x = torch.roll(x, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
        loss = F.cross_entropy(model(x), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    meta = {"steps": steps, "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start,
            "last_loss": float(loss.detach())}
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "meta": meta}, path)
    return model.eval(), meta


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    correct = sum(int((model(images[i : i + batch_size]).argmax(-1) == labels[i : i + batch_size]).sum())
                  for i in range(0, len(images), batch_size))
    return correct / len(images)


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The Taylor baseline's loss: cross-entropy on the calibration images' labels."""
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(1)
    train_x, train_y = load_fashion_mnist(split="train")
    test_x, test_y = load_fashion_mnist(split="test")
    test_x, test_y = test_x[: args.test], test_y[: args.test]
    model, meta = trained(args, train_x, train_y)
    print(f"trained: {meta}", flush=True)
    if args.train_only:
        return
    pick = torch.as_tensor(np.random.default_rng(args.seed + 1).choice(len(train_x), args.calibration, replace=False))
    calibration = list(zip(train_x[pick].split(128), train_y[pick].split(128)))
    dense = accuracy(model, test_x, test_y)
    print(f"dense accuracy {dense:.4f}", flush=True)
    rows: dict[str, dict[float, tuple[float, int, float, float]]] = {}
    fitted: dict[str, tuple[TransformerPruner, float, float]] = {}
    for label, options, method, kinds in METHODS:
        if options.get("swap"):
            options = dict(options, swap_time=args.swap_time)
        key = repr(sorted(options.items()))
        if key not in fitted:
            start, cpu = time.perf_counter(), time.process_time()
            pruner = TransformerPruner(loss=classification_loss, **options).fit(model, calibration)
            fitted[key] = (pruner, time.perf_counter() - start, time.process_time() - cpu)
            print(f"fit {label}: {fitted[key][1]:.1f} s", flush=True)
        pruner, fit_wall, fit_cpu = fitted[key]
        rows[label] = {}
        for removed in args.removed:
            start, cpu = time.perf_counter(), time.process_time()
            result = pruner.prune(params=1 - removed, method=method, kinds=kinds, seq_len=50)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            if method == "orprune":  # the error curves belong to the method's cost
                wall, cpu = wall + fit_wall, cpu + fit_cpu
            acc = accuracy(result.model, test_x, test_y)
            rows[label][removed] = (acc, result.params_after, wall, cpu)
            widths = [r.channels_after for r in result.report]
            print(f"{label} removed {removed:.0%}: acc {acc:.4f}, params {result.params_after}, widths {widths}",
                  flush=True)
    params = sum(p.numel() for p in model.parameters())
    args.out.write_text(report(args, argv, dense, params, meta, rows, len(test_x)))
    print(args.out.read_text())


def report(args, argv, dense, params, meta, rows, len_test) -> str:
    command = ("python -m benchmarks.transformers_vit"
               + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv)))
    lines = [
        "# Heads and neurons of a small ViT on Fashion-MNIST: orprune vs magnitude / Wanda-sp / FLAP / Taylor",
        "",
        f"Produced by `{command}` on {date.today().isoformat()} ({machine()}, 1 torch thread).",
        "",
        f"Model: plain-torch ViT (`benchmarks/transformers_vit.py`: 4x4 patches, 49 tokens + class token, "
        f"4 pre-norm `nn.TransformerEncoderLayer` blocks, d=64, 4 heads of 16, MLP 256, GELU); {params:,} params. "
        f"Trained {meta['seconds']:.0f} s ({meta['cpu_seconds']:.0f} s CPU, {meta['steps']} AdamW steps of "
        f"{args.batch_size} images, random shifts of up to 2 pixels) on the 60,000 training images; accuracy "
        f"on the first {len_test:,} test images (the same for every method). orprune replaces each `nn.MultiheadAttention` by its split equivalent "
        f"(`orprune.transformer.SplitMultiheadAttention`) before pruning. No fine-tuning after pruning. "
        f"Calibration: {args.calibration} training images (with labels, which only the Taylor baseline uses). "
        f"Budgets are fractions of *all* params; every method meets the same budget (FLAP's bias compensation "
        f"changes existing output biases only). Time: pruning at that budget, wall / CPU seconds, orprune's "
        f"including its one-off fit (calibration and error curves); swap: at most {args.swap_time:g} s (wall) of "
        f"1-swaps per unit.",
        "",
        f"Dense accuracy: {dense:.4f}.",
        "",
        "| method | " + " | ".join(f"{r:.0%} removed: accuracy (drop) | time s (CPU)" for r in args.removed) + " |",
        "|---|" + "---|---|" * len(args.removed),
    ]
    for label, by_ratio in rows.items():
        cells = [f"{acc:.4f} ({dense - acc:+.4f}) | {wall:.1f} ({cpu:.1f})"
                 for acc, _, wall, cpu in (by_ratio[r] for r in args.removed)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    baselines = [label for label in rows if not label.startswith("orprune")]
    lines += ["", "Accuracy drop of orprune (greedy) against the best baseline's, per budget:", ""]
    for r in args.removed:
        best = max(baselines, key=lambda b: rows[b][r][0])
        ours = dense - rows["orprune greedy"][r][0]
        theirs = dense - rows[best][r][0]
        ratio = f"ratio {ours / theirs:.3f}" if theirs > 0 else "no ratio (the baseline does not lower it)"
        lines.append(f"- {r:.0%} removed: {ours:+.4f} vs {theirs:+.4f} ({best}): {ratio}")
    lines += ["", "Params after pruning (orprune greedy): " + ", ".join(
        f"{r:.0%}: {rows['orprune greedy'][r][1]:,}" for r in args.removed) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
