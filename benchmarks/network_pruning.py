"""Whole-network pruning of a trained network: orprune against torch-pruning, before and after fine-tuning.

Measures, in one process and on the same trained model and calibration images:
- pruning wall time and peak memory of ``Pruner.fit`` + ``prune`` (issue target: < 60 s for
  2048 calibration images at 50% MACs on a 2-core CPU);
- test accuracy right after pruning at several MACs budgets, for orprune (MILP allocation of
  error curves + sequential least-squares refit) and torch-pruning's magnitude and Taylor pruners,
  each also with BatchNorm statistics re-estimated on the calibration images;
- measured CPU latency at batch 256 of each pruned model, as a speed-up over the unpruned model,
  beside its MACs ratio;
- test accuracy after the same short fine-tune of every row at ``--finetune-macs`` (and of the
  unpruned model, as the control), and issue 5's accuracy targets checked against the table.

Run ``python -m benchmarks.network_pruning`` (``--help`` for the settings); writes
``benchmarks/results/network_pruning.md``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import platform
import shlex
import sys
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
from orprune.training import batches, evaluate, train


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
    parser.add_argument("--finetune-epochs", type=float, default=1.0, help="0 skips the fine-tuned column")
    parser.add_argument("--finetune-size", type=int, default=10000, help="training images of the fine-tune")
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--finetune-macs", default="0.5", help="fractions whose rows are fine-tuned")
    parser.add_argument("--output", default=None, help="default: results/network_pruning[_<model>].md")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.network_pruning " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.output is None:
        suffix = "" if args.model == "resnet20" else f"_{args.model}"
        args.output = str(RESULTS_DIR / f"network_pruning{suffix}.md")
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
    models = {"unpruned": model}
    cost_rows = []

    def record(name: str, pruned: torch.nn.Module, seconds: float | None) -> None:
        macs, params = count_macs_params(pruned, example)
        threads = torch.get_num_threads()
        torch.set_num_threads(args.latency_threads)
        ratio = speedup(model, pruned, x256, args.latency_repeats)
        torch.set_num_threads(threads)
        rows.append((name, macs / base_macs, macs, params, evaluate(pruned, test_x, test_y), seconds, ratio))
        models[name] = pruned

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

    tuned = finetune(models, rows, args, train_x, train_y, test_x, test_y)
    text = report(args, command, dataset, meta, base_acc, base_macs, base_params, cost_rows, rows, tuned)
    with open(args.output, "w") as handle:
        handle.write(text)
    print(text)


def finetune(models: dict[str, torch.nn.Module], rows: list[tuple], args: argparse.Namespace,
             train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> dict[str, float]:
    """Test accuracy of the unpruned model and of every row at ``--finetune-macs`` after the same fine-tune."""
    if args.finetune_epochs <= 0:
        return {}
    pick = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(1))[: args.finetune_size]
    wanted = {f"{float(v):.2f}" for v in args.finetune_macs.split(",")}
    out = {}
    for name, *_ in rows:
        if name != "unpruned" and name.rsplit(", ", 1)[-1] not in wanted:
            continue
        start = time.perf_counter()
        tuned = train(copy.deepcopy(models[name]), train_x[pick], train_y[pick], epochs=args.finetune_epochs,
                      lr=args.finetune_lr, seed=0, threads=args.latency_threads, progress=False)
        out[name] = evaluate(tuned, test_x, test_y)
        print(f"fine-tuned {name}: {out[name]:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return out


def targets(rows: list[tuple], tuned: dict[str, float], base_acc: float) -> list[str]:
    """Issue 5's accuracy targets, checked against the table."""
    lines = ["## Targets (issue 5)", "",
             "| target | best orprune row | value | met |", "|---|---|---:|---|"]
    for fraction, limit in ((0.5, 0.5), (0.33, 1.0)):
        candidates = [(acc, name) for name, _, _, _, acc, _, _ in rows
                      if name.startswith("orprune") and name.endswith(f", {fraction:.2f}")]
        if candidates:
            acc, name = max(candidates)
            drop = 100 * (base_acc - acc)
            lines.append(f"| no fine-tune, {1 / fraction:.0f}x MACs reduction: drop <= {limit:g} points | {name} | "
                         f"{drop:.2f} points | {'yes' if drop <= limit else 'no'} |")
    for fraction in sorted({name.rsplit(', ', 1)[-1] for name in tuned if name != "unpruned"}):
        ours = [(a, n) for n, a in tuned.items() if n.startswith("orprune") and n.endswith(fraction)]
        theirs = [(a, n) for n, a in tuned.items() if n.startswith("torch-pruning") and n.endswith(fraction)]
        if ours and theirs:
            (a, n), (b, m) = max(ours), max(theirs)
            lines.append(f"| fine-tuned at {fraction} MACs: >= torch-pruning's best ({m}: {b:.4f}) | {n} | "
                         f"{a:.4f} | {'yes' if a >= b else 'no'} |")
    return lines + [""]


def report(args, command, dataset, meta, base_acc, base_macs, base_params, cost_rows, rows, tuned) -> str:
    lines = [
        f"# Whole-network pruning: {args.model} on {dataset}",
        "",
        f"Produced by `{command.strip()}` on {date.today()} ({platform.machine()}, "
        f"{torch.get_num_threads()} torch threads; the machine may be shared, compare ratios within the table).",
        "",
        f"Unpruned: test accuracy {base_acc:.4f} after {meta.get('epochs', args.epochs)} epochs; "
        f"{base_macs:,} MACs, {base_params:,} params. Calibration: {args.calibration} training images."
        + (f" Fine-tune: {args.finetune_epochs:g} epoch(s) on {args.finetune_size} training images, one-cycle max lr "
           f"{args.finetune_lr:g} (the same for every row, the unpruned model included)." if tuned else ""),
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
        "ideal = 1 / MACs kept. \"round to 8\": keep counts in multiples of 8 (`Pruner(round_to=8)`); "
        "\"uniform rates\": one keep fraction for every unit (`prune(allocation=\"uniform\")`).",
        "",
        "| method | MACs kept | MACs | params | test accuracy | fine-tuned | pruning time (s) | speed-up | speed-up / ideal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, fraction, macs, params, acc, seconds, ratio in rows:
        ft = f"{tuned[name]:.4f}" if name in tuned else ""
        lines.append(
            f"| {name} | {fraction:.3f} | {macs:,} | {params:,} | {acc:.4f} | {ft} | "
            f"{'' if seconds is None else f'{seconds:.1f}'} | {ratio:.2f} | {ratio * fraction:.2f} |"
        )
    lines += ["", *targets(rows, tuned, base_acc)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
