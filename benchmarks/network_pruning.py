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
import itertools
import platform
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
def speedup(base: torch.nn.Module, pruned: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Latency of ``base`` over that of ``pruned`` on ``x``: calls alternate, the fastest of each counts.

    Alternating exposes both models to the same machine state, and the minimum is the run least
    disturbed by other processes on a shared machine.
    """
    best = {id(base): float("inf"), id(pruned): float("inf")}
    for model in (base, pruned):
        model.eval()
        model(x)  # warm-up
    for _ in range(repeats):
        for model in (base, pruned):
            start = time.perf_counter()
            model(x)
            best[id(model)] = min(best[id(model)], time.perf_counter() - start)
    return best[id(base)] / best[id(pruned)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--calibration", type=int, default=2048)
    parser.add_argument("--macs", default="0.5,0.33,0.25", help="MACs fractions to keep")
    parser.add_argument("--solvers", default="auto,greedy", help="orprune layer solvers to compare")
    parser.add_argument("--allocations", default="milp,uniform", help="orprune allocations (Pruner.prune)")
    parser.add_argument("--round-to", default="1,8", help="Pruner round_to values, one fit each")
    parser.add_argument("--latency-repeats", type=int, default=20)
    parser.add_argument("--latency-threads", type=int, default=1, help="torch threads while timing inference")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--jobs", type=int, default=None, help="processes for the error curves (Pruner n_jobs)")
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

    rows = [("unpruned", 1.0, base_macs, base_params, base_acc, None, 1.0)]
    cost_rows = []

    def record(name: str, pruned: torch.nn.Module, seconds: float | None) -> None:
        macs, params = count_macs_params(pruned, example)
        threads = torch.get_num_threads()
        torch.set_num_threads(args.latency_threads)
        ratio = speedup(model, pruned, x256, args.latency_repeats)
        torch.set_num_threads(threads)
        rows.append((name, macs / base_macs, macs, params, evaluate(pruned, test_x, test_y), seconds, ratio))

    for solver, round_to in itertools.product(args.solvers.split(","), [int(r) for r in args.round_to.split(",")]):
        name = solver if round_to == 1 else f"{solver}, round to {round_to}"
        with warnings.catch_warnings(), PeakMemory() as memory:
            warnings.simplefilter("ignore", UserWarning)
            start = time.perf_counter()
            pruner = orprune.Pruner(solver=solver, round_to=round_to, progress=False, n_jobs=args.jobs)
            pruner.fit(model, calibration)
            fit_seconds = time.perf_counter() - start
            results = {}
            for allocation in args.allocations.split(","):
                for fraction in fractions:
                    start = time.perf_counter()
                    result = pruner.prune(macs=fraction, allocation=allocation)
                    results[allocation, fraction] = (result, time.perf_counter() - start)
        milp = {f: s for (a, f), (_, s) in results.items() if a == "milp"}
        cost_rows.append((name, fit_seconds, milp, memory.extra_mib))
        for (allocation, fraction), (result, seconds) in results.items():
            label = name if allocation == "milp" else f"{name}, {allocation} rates"
            record(f"orprune {label}, {fraction:.2f}", result.model, fit_seconds + seconds)

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
        f"--macs {args.macs} --solvers {args.solvers} --allocations {args.allocations} --round-to {args.round_to}"
        f"{f' --threads {args.threads}' if args.threads else ''}{f' --jobs {args.jobs}' if args.jobs else ''}` on {date.today()} ({platform.machine()}, "
        f"{torch.get_num_threads()} torch threads; the machine may be shared, compare ratios within the table).",
        "",
        f"Unpruned: test accuracy {base_acc:.4f} after {meta.get('epochs', args.epochs)} epochs; "
        f"{base_macs:,} MACs, {base_params:,} params.",
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
        "Speed-up = unpruned batch-256 latency / pruned latency, fastest of "
        f"{args.latency_repeats} alternating calls each, {args.latency_threads} torch thread(s); "
        "ideal = 1 / MACs kept.",
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
