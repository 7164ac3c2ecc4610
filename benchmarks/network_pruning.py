"""Whole-network pruning of a trained ResNet-20: orprune against torch-pruning, no fine-tuning.

Measures, in one process and on the same trained model and calibration images:
- pruning wall time and peak memory of ``Pruner.fit`` + ``prune`` (issue target: < 60 s for
  2048 calibration images at 50% MACs on a 2-core CPU);
- test accuracy right after pruning at several MACs budgets, for orprune (MILP allocation of
  error curves + sequential least-squares refit) and torch-pruning's magnitude and Taylor pruners,
  each also with BatchNorm statistics re-estimated on the calibration images;
- measured CPU latency at batch 256 of each pruned model, as a speed-up over the unpruned model,
  beside its MACs ratio.

Run ``python -m benchmarks.network_pruning`` (``--help`` for the settings); writes
``benchmarks/results/network_pruning.md``.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import threading
import time
import warnings
from datetime import date

import psutil
import torch

import orprune
from benchmarks.common import RESULTS_DIR, trained_model
from orprune.baselines import count_macs_params, recalibrate_batchnorm, torch_pruning_baseline
from orprune.datasets import load_default
from orprune.training import batches, evaluate


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every 10 ms."""

    def __enter__(self) -> PeakMemory:
        self._process = psutil.Process()
        self.start = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.start) / 2**20


@torch.no_grad()
def latency(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of one forward pass."""
    model.eval()
    model(x)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--calibration", type=int, default=2048)
    parser.add_argument("--macs", default="0.5,0.33,0.25", help="MACs fractions to keep")
    parser.add_argument("--solvers", default="auto,greedy", help="orprune layer solvers to compare")
    parser.add_argument("--latency-repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--output", default=str(RESULTS_DIR / "network_pruning.md"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fractions = [float(v) for v in args.macs.split(",")]

    model, meta = trained_model(args.model, epochs=args.epochs)
    train_x, train_y, dataset = load_default("train")
    test_x, test_y, _ = load_default("test")
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))[: args.calibration]
    calibration = list(batches(train_x[order], 128))
    taylor_batches = list(zip(train_x[order].split(128), train_y[order].split(128)))
    example = test_x[:1]
    base_macs, base_params = count_macs_params(model, example)
    base_acc = evaluate(model, test_x, test_y)
    x256 = test_x[:256].contiguous()
    base_latency = latency(model, x256, args.latency_repeats)

    rows = [("unpruned", 1.0, base_macs, base_params, base_acc, None, 1.0)]
    cost_rows = []

    def record(name: str, pruned: torch.nn.Module, seconds: float | None) -> None:
        macs, params = count_macs_params(pruned, example)
        speedup = base_latency / latency(pruned, x256, args.latency_repeats)
        rows.append((name, macs / base_macs, macs, params, evaluate(pruned, test_x, test_y), seconds, speedup))

    for solver in args.solvers.split(","):
        with warnings.catch_warnings(), PeakMemory() as memory:
            warnings.simplefilter("ignore", UserWarning)
            start = time.perf_counter()
            pruner = orprune.Pruner(solver=solver, progress=False).fit(model, calibration)
            fit_seconds = time.perf_counter() - start
            results = {}
            for fraction in fractions:
                start = time.perf_counter()
                results[fraction] = pruner.prune(macs=fraction)
                results[fraction] = (results[fraction], time.perf_counter() - start)
        cost_rows.append((solver, fit_seconds, {f: s for f, (_, s) in results.items()}, memory.extra_mib))
        for fraction, (result, seconds) in results.items():
            record(f"orprune {solver}, {fraction:.2f}", result.model, fit_seconds + seconds)

    for importance in ("magnitude", "taylor"):
        for fraction in fractions:
            start = time.perf_counter()
            pruned = torch_pruning_baseline(model, example, macs=fraction, importance=importance,
                                            calibration=taylor_batches[:4])
            seconds = time.perf_counter() - start
            record(f"torch-pruning {importance}, {fraction:.2f}", pruned, seconds)
            repaired = recalibrate_batchnorm(copy.deepcopy(pruned), calibration)
            record(f"torch-pruning {importance} + BN re-estimation, {fraction:.2f}", repaired, seconds)

    lines = [
        f"# Whole-network pruning: {args.model} on {dataset}, no fine-tuning",
        "",
        f"Produced by `python -m benchmarks.network_pruning --epochs {args.epochs} --calibration {args.calibration} "
        f"--macs {args.macs} --solvers {args.solvers}"
        f"{f' --threads {args.threads}' if args.threads else ''}` on {date.today()} ({platform.machine()}, "
        f"{torch.get_num_threads()} torch threads; the machine may be shared, compare ratios within the table).",
        "",
        f"Unpruned: test accuracy {base_acc:.4f} after {meta.get('epochs', args.epochs)} epochs; "
        f"{base_macs:,} MACs, {base_params:,} params; batch-256 latency {base_latency * 1e3:.0f} ms.",
        "",
        "## Pruning cost (orprune)",
        "",
        "| solver | fit: curves (s) | prune per budget (s) | fit + prune at 50% (s) | peak extra memory (MiB) |",
        "|---|---:|---|---:|---:|",
    ]
    for solver, fit_seconds, per_budget, mib in cost_rows:
        half = per_budget.get(0.5)
        lines.append(
            f"| {solver} | {fit_seconds:.1f} | {', '.join(f'{f:.2f}: {s:.1f}' for f, s in per_budget.items())} | "
            f"{'' if half is None else f'{fit_seconds + half:.1f}'} | {mib:.0f} |"
        )
    lines += [
        "",
        "## Accuracy and measured speed-up",
        "",
        "Speed-up = unpruned batch-256 latency / pruned latency (median of "
        f"{args.latency_repeats}); ideal = 1 / MACs kept.",
        "",
        "| method | MACs kept | MACs | params | test accuracy | pruning time (s) | speed-up | speed-up / ideal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, fraction, macs, params, acc, seconds, speedup in rows:
        lines.append(
            f"| {name} | {fraction:.3f} | {macs:,} | {params:,} | {acc:.4f} | "
            f"{'' if seconds is None else f'{seconds:.1f}'} | {speedup:.2f} | {speedup * fraction:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    with open(args.output, "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
