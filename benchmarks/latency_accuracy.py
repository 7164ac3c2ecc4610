"""Accuracy at equal measured latency: ``prune(latency=b)`` against ``macs=`` budgets with and without ``round_to``.

The trained ResNet-20 of ``benchmarks/network_pruning.py`` (Fashion-MNIST when installed, else digits; cached
under ``benchmarks/cache/``), no fine-tuning. For each latency budget ``b``:

- orprune ``latency=b`` with measured rounds (the default ``latency_rounds=3``);
- orprune ``macs=f`` for each ``round_to`` in ``--round-to``, at every ``f`` of a grid: the row shown is the
  largest ``f`` whose model measures at most ``b`` (the best MACs budget a user could have found by trial at
  that latency);
- torch-pruning's magnitude pruner, the same way over the grid.

Every model and the unpruned one are timed in one process, calls interleaved (medians), at ``--batch-size``
and one torch thread. Writes ``benchmarks/results/latency_accuracy.md``. Run
``python -m benchmarks.latency_accuracy`` (``--help``).
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

from benchmarks.common import RESULTS_DIR, machine, trained_model
from orprune.examples.baselines import torch_pruning_baseline
from orprune.examples.datasets import load_default
from orprune.network.costs import count_macs_params
from orprune.network.timing import call_times, torch_threads
from orprune.pipeline import Pruner
from orprune.training import batches, evaluate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", default="0.5,0.33", help="latency fractions to keep")
    parser.add_argument("--grid", default="0.2,0.25,0.3,0.35,0.4,0.45,0.5,0.55,0.6,0.65,0.7",
                        help="MACs fractions tried for the macs= rows")
    parser.add_argument("--round-to", default="1,8,16", help="round_to values of the macs= rows")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs of the cached ResNet-20")
    parser.add_argument("--calibration", type=int, default=2048, help="calibration images")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of the latency measurement")
    parser.add_argument("--repeats", type=int, default=21, help="interleaved timed calls per model (median kept)")
    parser.add_argument("--solver", default="auto")
    parser.add_argument("--output", default=str(RESULTS_DIR / "latency_accuracy.md"))
    args = parser.parse_args(argv)
    command = "python -m benchmarks.latency_accuracy " + shlex.join(sys.argv[1:] if argv is None else argv)
    budgets = [float(v) for v in args.budgets.split(",")]
    grid = [float(v) for v in args.grid.split(",")]
    torch.set_num_threads(1)

    model, meta = trained_model("resnet20", epochs=args.epochs)
    train_x, _, dataset = load_default("train")
    test_x, test_y, _ = load_default("test")
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[: args.calibration]
    calibration = list(batches(train_x[order], 128))
    example = test_x[:1]
    base_macs = count_macs_params(model, example)[0]
    base_acc = evaluate(model, test_x, test_y)

    candidates: list[dict] = []  # method, budget (latency or macs fraction), model, extra
    start = time.perf_counter()
    for round_to in [int(v) for v in args.round_to.split(",")]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            pruner = Pruner(solver=args.solver, round_to=round_to, progress=False).fit(model, calibration)
        print(f"round_to={round_to}: fitted at {time.perf_counter() - start:.0f} s", flush=True)
        if round_to == 1:
            pruner.fit_latency(batch_size=args.batch_size)
            for b in budgets:
                result = pruner.prune(latency=b)
                candidates.append({"method": "orprune latency=b (measured rounds)", "target": b, "model": result.model,
                                   "rounds": len(result.latency.rounds), "in_loop": result.latency.measured_fraction})
        for f in grid:
            try:
                result = pruner.prune(macs=f)
            except ValueError:
                continue  # below what the rounded keep counts allow
            name = "orprune macs=f" + ("" if round_to == 1 else f", round_to={round_to}")
            candidates.append({"method": name, "target": f, "model": result.model})
    for f in grid:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            candidates.append({"method": "torch-pruning magnitude, macs=f", "target": f,
                               "model": torch_pruning_baseline(model, example, macs=f)})
    print(f"{len(candidates)} models built at {time.perf_counter() - start:.0f} s; timing", flush=True)

    x = test_x[torch.arange(args.batch_size) % len(test_x)].contiguous()
    with torch_threads(1):
        seconds = call_times([model] + [c["model"] for c in candidates], x, repeats=args.repeats, warmup=2,
                             statistic="median")
    for c, s in zip(candidates, seconds[1:]):
        c["measured"] = s / seconds[0]

    lines = ["# Accuracy at equal measured latency", "",
             f"Produced by `{command}` on {date.today()} ({machine()}, 1 torch thread; the machine may be shared: "
             "every latency below comes from one process, calls of all models interleaved, medians of "
             f"{args.repeats}).", "",
             f"ResNet-20 on {dataset}, test accuracy {base_acc:.4f} unpruned ({meta.get('epochs')} epochs), "
             f"{base_macs:,} MACs; {args.calibration} calibration images; no fine-tuning; solver {args.solver}. "
             f"Latency at batch {args.batch_size}: unpruned median {1e3 * seconds[0]:.1f} ms. For the `macs=f` rows "
             f"the largest f of the grid {grid} whose measured latency meets the budget.", "",
             "| latency budget | method | MACs budget f | MACs kept | measured latency | test accuracy |",
             "|---:|---|---:|---:|---:|---:|"]
    for b in budgets:
        methods = dict.fromkeys(c["method"] for c in candidates)
        for method in methods:
            rows = [c for c in candidates if c["method"] == method and (c["target"] == b if "latency" in method
                                                                       else c["measured"] <= b)]
            if not rows:
                lines.append(f"| {b:.2f} | {method} | none of the grid meets it | | | |")
                continue
            c = max(rows, key=lambda c: c["target"])
            kept = count_macs_params(c["model"], example)[0] / base_macs
            acc = evaluate(c["model"], test_x, test_y)
            label = method + (f" ({c['rounds']} rounds; {c['in_loop']:.3f} in the loop)" if "rounds" in c else "")
            f = "" if "latency" in method else f"{c['target']:.2f}"
            lines.append(f"| {b:.2f} | {label} | {f} | {kept:.3f} | {c['measured']:.3f} | {acc:.4f} |")
    lines += ["", "All candidates (method, budget, measured latency):", ""]
    lines += [f"- {c['method']}, {c['target']:.2f}: {c['measured']:.3f}" for c in candidates]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
