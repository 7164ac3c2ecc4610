"""YOLOv8's n / s backbones (C2f with ``shortcut=True``): units found, pruned == masked, MACs predicted, a pruning run.

``orprune.examples.csp_zoo.YoloV8Backbone`` (layers 0-9 of ``yolov8{n,s}.yaml`` with a pooled Linear head, random
initialisation, BatchNorm statistics randomised), 64x64 inputs. Per scale: the prunable units and the groups left
alone; for random keep counts, ``max |pruned - masked| / max |masked|`` on a held-out batch and the cost model's MACs
against torch-pruning's count of the pruned model; then ``Pruner(solver="greedy").fit(...).prune(macs=...)``: MACs
reached, seconds, pruned vs masked, and the keep counts of the C2f stream units (``formulations/split_and_shuffle.md``
section 3.1).

Run ``python -m benchmarks.yolo_backbone`` (``--help`` for the settings); writes ``benchmarks/results/yolo_backbone.md``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import warnings
from datetime import date

import numpy as np
import torch

import orprune
from benchmarks.common import RESULTS_DIR, machine
from orprune.examples.coverage_zoo import randomize_batchnorm
from orprune.examples.csp_zoo import YoloV8Backbone
from orprune.network.costs import count_macs_params, network_costs
from orprune.network.graph import find_groups
from orprune.network.surgery import PruningPlan, apply_pruning, masked_copy


def _relative(pruned: torch.nn.Module, masked: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = masked(x)
        return float((pruned(x) - ref).abs().max() / ref.abs().max())


def run_scale(scale: str, macs: float, size: int, keeps: int) -> list[str]:
    """The report lines of one scale."""
    torch.manual_seed(0)
    model = randomize_batchnorm(YoloV8Backbone(scale)).eval()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 3, size, size, generator=gen) for _ in range(4)]
    x, held_out = batches[0][:1], batches[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        graph = find_groups(model, x)
    left = ", ".join(f"`{e.root}` ({e.reason})" for e in graph.excluded)
    lines = [f"### yolov8{scale}", "", f"{len(graph.units)} units / {len(graph.excluded)} left alone: {left}.", ""]
    costs, rng = network_costs(model, graph, x), np.random.default_rng(0)
    lines += ["| random keep | pruned vs masked | predicted MACs | torch-pruning's count |", "|---|---|---|---|"]
    for i in range(keeps):
        keep = {u.name: np.sort(rng.choice(u.n_channels, int(rng.integers(1, u.n_channels + 1)), replace=False))
                for u in graph.units}
        plan = PruningPlan(keep)
        pruned = apply_pruning(model, graph, plan, x)
        diff = _relative(pruned, masked_copy(model, graph, plan), held_out)
        predicted = costs.evaluate({u: int(k.size) for u, k in keep.items()})["macs"]
        counted = count_macs_params(pruned, x)[0]
        lines.append(f"| {i} | {diff:.1e} | {predicted:.0f} | {counted} |")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        start = time.perf_counter()
        pruner = orprune.Pruner(solver="greedy", progress=False).fit(model, batches[:-1])
        fit = time.perf_counter() - start
        start = time.perf_counter()
        result = pruner.prune(macs=macs)
        prune = time.perf_counter() - start
    diff = _relative(result.model, masked_copy(model, pruner.graph_, result.plan), held_out)
    streams = ", ".join(f"`{u}` {result.plan.keep[u].size if u in result.plan.keep else pruner.graph_[u].n_channels}"
                        f"/{pruner.graph_[u].n_channels}" for u in pruner.graph_.names if pruner.graph_[u].tie > 1)
    lines += ["", f"`Pruner(solver=\"greedy\").fit` {fit:.1f} s, `prune(macs={macs})` {prune:.1f} s: MACs "
              f"{100 * result.macs_after / result.macs_before:.1f}% of {result.macs_before / 1e6:.1f} M, pruned vs "
              f"masked {diff:.1e}. C2f stream units kept: {streams}.", ""]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scales", default="n,s", help="comma-separated scales (n, s)")
    parser.add_argument("--macs", type=float, default=0.5, help="MACs fraction to keep")
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--keeps", type=int, default=2, help="random keep counts checked per scale")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--output", default=str(RESULTS_DIR / "yolo_backbone.md"))
    args = parser.parse_args(argv)
    command = "python -m benchmarks.yolo_backbone " + shlex.join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    lines = ["# YOLOv8 backbones (C2f with `shortcut=True`)", "", f"Command: `{command}`", "",
             f"{date.today()}, {machine()}, torch {torch.__version__}, {args.threads} thread(s). {args.size}x{args.size} "
             "inputs, random initialisation, greedy curves, MILP allocation, sequential least-squares refit.", ""]
    for scale in args.scales.split(","):
        lines += run_scale(scale, args.macs, args.size, args.keeps)
        print("\n".join(lines[-3:]), flush=True)
    with open(args.output, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
