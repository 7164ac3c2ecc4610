"""Partition pruning on a trained MLP (scikit-learn digits): MILP vs heuristic vs random partitions vs magnitude.

An MLP 64-32-32-10 (ReLU) is trained on digits (seed 0). Each hidden layer (``fc1``: 64 -> 32, ``fc2``:
32 -> 32) is partitioned alone into P parts, the other layers left dense, and the pruned network is evaluated on
the test split without fine-tuning. Methods:

* ``random``: balanced random partitions (mean +- std over ``--random`` seeds), original weights;
* ``energy heuristic`` / ``energy MILP``: :func:`orprune.partition_weights` (spectral + alternating assignments;
  the HiGHS MILP warm-started from it with ``--time-limit``), original weights kept inside the parts;
* ``MILP parts + refit``: the MILP's parts, each output refit by least squares over its part's inputs on the
  training set (``partition_refit``);
* ``data-aware``: :func:`orprune.partition_layer` (alternating exact output assignment and input swaps);
* ``magnitude (unstructured)``: the same number of weights kept by largest ``|W|`` with no block structure
  (a reference a partition cannot beat on energy, not a partition).

"energy removed" is the share of ``sum W^2`` dropped; "rel. error" is ``||Y - X W'||^2 / ||Y||^2`` of the
layer's pre-bias outputs on the training set. A second table times ``PartitionedLinear`` against the dense layer.

Run ``python -m benchmarks.partition_pruning``; writes ``benchmarks/results/partition_pruning.md``.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import highspy
import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from orprune import LayerProblem, PartitionedLinear, partition_layer, partition_weights
from orprune.examples.datasets import load_digits
from orprune.layer.partition import removed_energy
from orprune.layer.partition_data import partition_refit
from orprune.network.partition_surgery import partition_module
from orprune.training import evaluate, train

LAYERS = {"fc1": "1", "fc2": "3"}  # name -> index in the Sequential


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


class Parts:
    """Input/output parts and (in, out) weights: what ``partition_module`` reads."""

    def __init__(self, input_parts, output_parts, weights):
        self.input_parts, self.output_parts, self.weights = input_parts, output_parts, weights


def layer_data(model: nn.Sequential, index: str, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The layer's inputs X and pre-bias outputs Y = X W^T on ``images``."""
    position = int(index)
    with torch.no_grad():
        x = model[:position](images).double().numpy()
    return x, x @ model[position].weight.detach().double().numpy().T


def score(model, name, parts, images, labels, x, y) -> dict:
    pruned = partition_module(model, {LAYERS[name]: parts})
    w = np.asarray(parts.weights)
    return {"acc": evaluate(pruned, images, labels),
            "rel": float(np.sum((y - x @ w) ** 2) / np.sum(y**2))}


def run_layer(model, name, P, args, train_x, test_x, test_y) -> list[dict]:
    index = LAYERS[name]
    W = model[int(index)].weight.detach().double().numpy().T  # (in, out)
    energy, total = W**2, float(np.sum(W**2))
    x, y = layer_data(model, index, train_x)
    prob = LayerProblem.from_arrays(x, y, ridge=1e-6 * np.trace(x.T @ x) / x.shape[1], weights=W)
    rows = []

    def add(method, parts, seconds, status="", gap=None, acc=None, rel=None):
        s = score(model, name, parts, test_x, test_y, x, y) if acc is None else {"acc": acc, "rel": rel}
        rows.append({"layer": name, "P": P, "method": method, "time": seconds, "status": status, "gap": gap,
                     "energy": removed_energy(energy, np.asarray(parts.input_parts), np.asarray(parts.output_parts))
                     / total if parts is not None else None, **s})

    rng = np.random.default_rng(0)
    accs, rels, energies = [], [], []
    for _ in range(args.random):
        pi, po = rng.permutation(np.arange(W.shape[0]) % P), rng.permutation(np.arange(W.shape[1]) % P)
        s = score(model, name, Parts(pi, po, np.where(pi[:, None] == po[None, :], W, 0.0)), test_x, test_y, x, y)
        accs.append(s["acc"]), rels.append(s["rel"]), energies.append(removed_energy(energy, pi, po) / total)
    rows.append({"layer": name, "P": P, "method": f"random (n={args.random})", "time": None, "status": "",
                 "gap": None, "energy": f"{np.mean(energies):.3f} +- {np.std(energies):.3f}",
                 "acc": f"{np.mean(accs):.3f} +- {np.std(accs):.3f}", "rel": f"{np.mean(rels):.3f} +- {np.std(rels):.3f}"})
    start = time.perf_counter()
    heuristic = partition_weights(W, P, solver="heuristic")
    add("energy heuristic", heuristic, time.perf_counter() - start, heuristic.status, heuristic.gap)
    start = time.perf_counter()
    exact = partition_weights(W, P, solver="exact", time_limit=args.time_limit)
    add("energy MILP", exact, time.perf_counter() - start, exact.status, exact.gap)
    refit, _ = partition_refit(prob, exact.input_parts, exact.output_parts)
    add("MILP parts + refit", Parts(exact.input_parts, exact.output_parts, refit), 0.0)
    start = time.perf_counter()
    data = partition_layer(prob, P)
    add("data-aware", data, time.perf_counter() - start, data.status)
    kept = int(exact.mask.sum())
    threshold = np.sort(np.abs(W).ravel())[::-1][kept - 1]
    mask = np.abs(W) >= threshold
    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked[int(index)].weight.mul_(torch.as_tensor(mask.T, dtype=torch.float32))
    add("magnitude (unstructured)", None, 0.0, acc=evaluate(masked, test_x, test_y),
        rel=float(np.sum((y - x @ np.where(mask, W, 0.0)) ** 2) / np.sum(y**2)))
    rows[-1]["energy"] = float(np.sum(energy[~mask]) / total)
    return rows


def timing(args) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.width)
    dense = nn.Linear(args.width, args.width)
    out = []

    def clock(module):
        with torch.no_grad():
            module(x)
            start, calls = time.perf_counter(), 0
            while time.perf_counter() - start < 0.5:
                module(x)
                calls += 1
        return (time.perf_counter() - start) / calls * 1e3

    base = clock(dense)
    out.append({"P": 1, "ms": base, "weights": args.width**2})
    for P in (2, 4, 8, 16):
        parts = np.arange(args.width) % P
        layer = PartitionedLinear.from_module(dense, input_parts=parts, output_parts=parts)
        out.append({"P": P, "ms": clock(layer), "weights": sum(b.numel() for b in layer.blocks)})
    return out


def fmt(value, spec):
    return "" if value is None else value if isinstance(value, str) else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per MILP")
    parser.add_argument("--random", type=int, default=10, help="random partitions per setting")
    parser.add_argument("--epochs", type=float, default=40)
    parser.add_argument("--width", type=int, default=512, help="layer width of the timing table")
    parser.add_argument("--batch", type=int, default=256, help="batch of the timing table")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "partition_pruning.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    threadpool_limits(1)  # small dense solves: BLAS threads only contend on a shared machine
    torch.manual_seed(0)
    train_x, train_y = load_digits("train")
    test_x, test_y = load_digits("test")
    model = train(mlp(), train_x, train_y, epochs=args.epochs, lr=0.1, flip=False, progress=False)
    base = evaluate(model, test_x, test_y)
    print(f"dense test accuracy {base:.4f}", flush=True)
    rows = []
    for name in LAYERS:
        for P in args.parts:
            for r in run_layer(model, name, P, args, train_x, test_x, test_y):
                rows.append(r)
                print(r, flush=True)
    speed = timing(args)
    write(args, base, rows, speed)


def write(args, base, rows, speed) -> None:
    command = " ".join(["python -m benchmarks.partition_pruning", *sys.argv[1:]])
    lines = [
        "# Partition pruning on a digits MLP (64-32-32-10)",
        "",
        f"Generated by `{command}` (time limit {args.time_limit:g} s per MILP, {args.random} random partitions, "
        f"{args.epochs:g} training epochs; HiGHS {highspy.Highs().version()}, torch {torch.__version__}, "
        f"Python {platform.python_version()}, one torch thread, shared 2-core machine).",
        "",
        f"Dense test accuracy: {base:.4f}. One layer partitioned at a time, no fine-tuning. Energy removed: share "
        "of sum W^2 dropped; rel. error: ||Y - X W'||^2 / ||Y||^2 of the layer on the training set; gap: "
        "(objective - bound) / objective of the energy criterion (data-aware: vs the error with every input kept).",
        "",
        "| layer | P | method | energy removed | rel. error | test acc. | time (s) | status | gap |",
        "|---|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['P']} | {r['method']} | {fmt(r['energy'], '.3f')} | {fmt(r['rel'], '.3f')} "
                     f"| {fmt(r['acc'], '.3f')} | {fmt(r['time'], '.2f')} | {r['status']} | {fmt(r['gap'], '.1e')} |")
    lines += [
        "",
        f"## PartitionedLinear vs dense nn.Linear ({args.width} x {args.width}, batch {args.batch}, one thread)",
        "",
        "Forward time of equal parts; the parts run one after the other (no grouped kernel).",
        "",
        "| P | weights | forward (ms) | vs dense |",
        "|---:|---:|---:|---:|",
    ]
    for r in speed:
        lines.append(f"| {r['P']} | {r['weights']} | {r['ms']:.3f} | {r['ms'] / speed[0]['ms']:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
