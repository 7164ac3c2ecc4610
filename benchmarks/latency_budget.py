"""Latency budgets: the measured speed-up of ``Pruner.prune(latency=b)`` against the budget ``b``.

For ResNet-20 (``orprune/examples/zoo.py``, 28x28 inputs) and a hand-written ImageNet-shaped ResNet-18 at
half width (224x224 inputs; torchvision is not available), at each budget ``b``:

- orprune with ``latency=b``: the allocation MILP meets ``b`` times the measured unpruned latency with the
  summed latency tables (``Pruner.fit_latency``: every pruned module timed at each width on this machine);
- orprune with ``macs=b``, keep counts free and with ``round_to``;
- torch-pruning's magnitude pruner at ``macs=b`` (``orprune/examples/baselines.py``).

Every pruned model of a network and the unpruned one are then timed in one process, calls alternating
between them (the same machine state for all), and the median call is kept. Weights are untrained and the
calibration inputs random: this measures speed, not accuracy (the keep counts follow the layer error curves
of those weights). Run ``python -m benchmarks.latency_budget`` (``--help``); writes
``benchmarks/results/latency_budget.md``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import warnings
from datetime import date

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.common import RESULTS_DIR, machine
from orprune.examples.baselines import torch_pruning_baseline
from orprune.examples.zoo import resnet20
from orprune.network.costs import count_macs_params
from orprune.network.timing import call_times, torch_threads
from orprune.pipeline import Pruner


class Block(nn.Module):
    """A ResNet basic block (3x3 conv-BN-ReLU, 3x3 conv-BN, projection shortcut when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ImageNetResNet(nn.Module):
    """ResNet-18's layout (7x7/2 stem, 3x3/2 max-pool, four stages of two basic blocks) at ``width`` times
    its channels, for 3x224x224 inputs and 1000 classes."""

    def __init__(self, width: float = 0.5) -> None:
        super().__init__()
        widths = [int(64 * width * 2**i) for i in range(4)]
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [Block(cin, w, 1 if i == 0 else 2), Block(w, w, 1)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


NETWORKS = {
    "resnet20": (lambda: resnet20(), (1, 28, 28)),
    "imagenet_resnet18_half": (lambda: ImageNetResNet(0.5), (3, 224, 224)),
}


def run(name: str, args: argparse.Namespace, batch_size: int) -> tuple[list[dict], dict]:
    torch.manual_seed(0)
    build, shape = NETWORKS[name]
    model = build().eval()
    calibration = [torch.randn(min(32, args.calibration - i), *shape) for i in range(0, args.calibration, 32)]
    example = calibration[0][:1]
    base_macs = count_macs_params(model, example)[0]
    options = dict(solver="greedy", max_options=args.max_options, sequential=False, progress=not args.quiet)
    pruners = {}
    for round_to in (1, args.round_to):
        start = time.perf_counter()
        pruners[round_to] = Pruner(round_to=round_to, **options).fit(model, calibration)
        fit = time.perf_counter() - start
        start = time.perf_counter()
        pruners[round_to].fit_latency(batch_size=batch_size, threads=args.threads, repeats=args.table_repeats)
        tables = time.perf_counter() - start
        print(f"{name}, round_to={round_to}: fit {fit:.0f} s, latency tables {tables:.0f} s "
              f"({pruners[round_to].latency_.measured} cells timed, {pruners[round_to].latency_.cached} cached)")
    lat = pruners[1].latency_
    meta = {"batch_size": batch_size, "table_full_ms": 1e3 * lat.full, "tabulated_ms": 1e3 * lat.tabulated,
            "modules": len(lat.modules), "cells": lat.measured + lat.cached, "base_macs": base_macs,
            "untabulated": lat.untabulated}
    rows: list[dict] = []
    for b in args.budgets:
        candidates = [("orprune latency, tables only", pruners[1], {"latency": b, "latency_rounds": 0}),
                      ("orprune latency, measured rounds", pruners[1], {"latency": b}),
                      ("orprune macs", pruners[1], {"macs": b}),
                      (f"orprune macs, round_to={args.round_to}", pruners[args.round_to], {"macs": b})]
        for method, pruner, budget in candidates:
            try:
                result = pruner.prune(**budget)
            except ValueError:  # below the smallest model the keep counts allow
                rows.append({"method": method, "budget": b, "model": None})
                continue
            rows.append({"method": method, "budget": b, "model": result.model, "macs": result.macs_after,
                         "predicted": result.latency.predicted_fraction, "rounds": len(result.latency.rounds)})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tp_model = torch_pruning_baseline(model, example, macs=b)
        rows.append({"method": "torch-pruning magnitude, macs", "budget": b, "model": tp_model,
                     "macs": count_macs_params(tp_model, example)[0], "predicted": None})
    # every model timed in one process, calls alternating, medians
    x = torch.cat(calibration)[torch.arange(batch_size) % args.calibration]
    timed = [r for r in rows if r["model"] is not None]
    with torch_threads(args.threads):
        seconds = call_times([model] + [r["model"] for r in timed], x, repeats=args.repeats, warmup=2,
                             statistic="median")
    meta["unpruned_ms"] = 1e3 * seconds[0]
    for r, s in zip(timed, seconds[1:]):
        r["measured"] = s / seconds[0]
    return rows, meta


def table(name: str, rows: list[dict], meta: dict, args: argparse.Namespace) -> list[str]:
    lines = [f"## {name}", "",
             f"Batch {meta['batch_size']}, {args.threads} torch thread(s). Unpruned: {meta['base_macs']:,} MACs per "
             f"image, median call {meta['unpruned_ms']:.1f} ms in the interleaved run; when the tables were made, "
             f"{meta['table_full_ms']:.1f} ms measured for the whole model and {meta['tabulated_ms']:.1f} ms summed "
             f"over its {meta['modules']} tabulated modules ({meta['cells']} table cells)."
             + (f" Held constant: {', '.join(meta['untabulated'])}." if meta["untabulated"] else ""), "",
             "| method | budget | MACs kept | predicted latency | measured latency | measured / budget "
             "| speed-up | speed-up / (1 / MACs kept) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        method = r["method"] + (f" ({r['rounds']})" if r.get("rounds") else "")
        if r["model"] is None:
            lines.append(f"| {method} | {r['budget']:.2f} | not reachable (below the smallest keep counts) "
                         "| | | | | |")
            continue
        kept = r["macs"] / meta["base_macs"]
        predicted = "" if r["predicted"] is None else f"{r['predicted']:.3f}"
        lines.append(f"| {method} | {r['budget']:.2f} | {kept:.3f} | {predicted} | {r['measured']:.3f} | "
                     f"{r['measured'] / r['budget']:.2f} | {1 / r['measured']:.2f} | {kept / r['measured']:.2f} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--networks", default="resnet20,imagenet_resnet18_half", help=f"of {sorted(NETWORKS)}")
    parser.add_argument("--budgets", default="0.5,0.33", help="fractions of latency (and of MACs) to keep")
    parser.add_argument("--batch-sizes", default="32,2", help="batch size of each network, in order")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the tables and the timing")
    parser.add_argument("--max-options", type=int, default=8, help="keep counts per unit (Pruner max_options)")
    parser.add_argument("--round-to", type=int, default=16, help="round_to of the rounded MACs rows")
    parser.add_argument("--calibration", type=int, default=128, help="random calibration inputs")
    parser.add_argument("--table-repeats", type=int, default=5, help="timed calls per table cell (fastest kept)")
    parser.add_argument("--repeats", type=int, default=21, help="interleaved timed calls per model (median kept)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--output", default=str(RESULTS_DIR / "latency_budget.md"))
    args = parser.parse_args(argv)
    command = "python -m benchmarks.latency_budget " + shlex.join(sys.argv[1:] if argv is None else argv)
    args.budgets = [float(v) for v in args.budgets.split(",")]
    names = args.networks.split(",")
    sizes = [int(v) for v in args.batch_sizes.split(",")]
    torch.set_num_threads(args.threads)
    lines = ["# Latency budgets against MACs budgets", "",
             f"Produced by `{command}` on {date.today()} ({machine()}, {args.threads} torch thread(s)). "
             "**The machine was shared** (2 cores, several agents running at once): single timings are noisy; "
             "every ratio below comes from one process with the models' calls interleaved (medians of "
             f"{args.repeats}), and the target (measured latency within 10% of the budget) is to be re-measured on "
             "a quiet machine.", "",
             "Untrained weights and random calibration inputs (speed only; accuracy is not measured here). "
             f"Curves: greedy, {args.max_options} keep counts per unit, no sequential refit. "
             "*measured rounds*: `prune(latency=b)` (default `latency_rounds=3`) measures the pruned model and "
             "re-solves with the tables' budget moved until the measurement meets b (the round count in "
             "brackets); *tables only*: `latency_rounds=0`. "
             "*predicted latency*: the latency tables summed at the chosen keep counts, as a fraction of the "
             "unpruned model's measured latency (for `round_to` rows, the tables of that pruner). *measured "
             "latency*: pruned / unpruned median call. *speed-up / (1 / MACs kept)*: how much of the MACs "
             "reduction became speed.", ""]
    for name, size in zip(names, sizes):
        rows, meta = run(name, args, size)
        lines += table(name, rows, meta, args)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
