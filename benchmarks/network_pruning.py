"""Whole-network pruning of a trained network: orprune against torch-pruning, before and after fine-tuning.

Measures, in one process and on the same trained model and calibration images:
- pruning wall time and peak memory of ``Pruner.fit`` + ``prune`` (issue target: < 60 s for
  2048 calibration images at 50% MACs on a 2-core CPU);
- test accuracy right after pruning at several MACs budgets, for orprune (MILP allocation of
  error curves + sequential least-squares refit) and torch-pruning's magnitude, Taylor and
  group-norm pruners (the last after its regularised training pass, the same budget as the
  fine-tune), each also with BatchNorm statistics re-estimated on the calibration images;
- measured CPU latency at batch 256 of each pruned model, as a speed-up over the unpruned model
  in the same deployment mode (eager, and TorchScript optimised for inference), beside its MACs
  ratio, and issue 3's latency target (speed-up >= 0.8 of 1 / MACs kept at 50% MACs) checked;
- test accuracy after the same short fine-tune of every row at ``--finetune-macs`` (and of the
  unpruned model, as the control), and issue 5's accuracy targets checked against the table.

Run ``python -m benchmarks.network_pruning`` (``--help`` for the settings); writes
``benchmarks/results/network_pruning.md``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import shlex
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date

import torch

import orprune
from benchmarks.common import CHANNELS_LAST, RESULTS_DIR, group_norm_trained, machine, trained_model
from orprune.examples.baselines import recalibrate_batchnorm, torch_pruning_baseline
from orprune.examples.datasets import load_default
from orprune.network.costs import count_macs_params
from orprune.network.timing import call_times, torch_threads
from orprune.training import batches, evaluate, train


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every 10 ms."""

    def __enter__(self) -> PeakMemory:
        import psutil  # the benchmarks' extra, not a test dependency: the latency helpers import without it

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


#: Deployment modes whose latency is measured, each against the unpruned model in the same mode.
MODES = ("eager", "optimised")


@torch.no_grad()
def optimised_for_inference(model: torch.nn.Module, example: torch.Tensor, check: torch.Tensor,
                            rtol: float = 1e-3) -> torch.jit.ScriptModule:
    """``model`` as deployed in "optimised" mode: traced on ``example``, then TorchScript's inference passes.

    ``torch.jit.optimize_for_inference`` freezes the trace, folds BatchNorm into the convs and keeps
    activations in oneDNN's blocked layouts between convs. A trace records one path through the
    model, so its output on ``check`` must match eager mode's to ``rtol`` times the largest eager
    output; a ``RuntimeError`` says by how much it does not.
    """
    model.eval()
    with warnings.catch_warnings():
        # torch.jit is deprecated in favour of torch.compile / torch.export; it is what is measured here.
        warnings.simplefilter("ignore", DeprecationWarning)
        optimised = torch.jit.optimize_for_inference(torch.jit.trace(model, example))
    expected, got = model(check), optimised(check)
    error = (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
    scale = expected.abs().max().item()
    if not error <= rtol * max(scale, 1e-12):
        raise RuntimeError(f"The optimised module's output differs from eager mode's by {error:.3g} (largest eager "
                           f"output {scale:.3g}, rtol {rtol:g}): the trace does not represent the model.")
    return optimised


def fastest_call_times(models: Sequence[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, repeats: int,
                       warmup: int = 3) -> list[float]:
    """Seconds of the fastest of ``repeats`` calls of each model on ``x``, calls alternating between the models.

    :func:`orprune.network.latency.call_times` with ``statistic="min"``: alternating (a, b, a, b, ...) exposes
    every model to the same machine state, the minimum is the call least disturbed by the rest of a shared
    machine, and with one torch thread the clock is ``time.thread_time`` (the CPU time of the calling thread,
    which does not count the time it waits while another process runs). ``warmup`` untimed calls of each model
    come first (TorchScript's profiling executor specialises a scripted module during its first calls).
    """
    return call_times(models, x, repeats, warmup, statistic="min")


@dataclass(frozen=True)
class Row:
    """One model of the table; ``speedup`` maps each of :data:`MODES` to base latency / this model's latency."""

    name: str
    fraction: float
    macs: int
    params: int
    accuracy: float
    seconds: float | None
    speedup: dict[str, float]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--calibration", type=int, default=2048)
    parser.add_argument("--macs", default="0.5,0.33,0.25", help="MACs fractions to keep")
    parser.add_argument("--solvers", default="auto,greedy", help="orprune layer solvers to compare")
    parser.add_argument("--allocations", default="milp,uniform", help="orprune allocations (Pruner.prune)")
    parser.add_argument("--errors", default="layer",
                        help="what the allocation sums (Pruner errors): layer, output, or both comma-separated")
    parser.add_argument("--round-to", default="1,16",
                        help="Pruner round_to values, one fit each (16 floats: an AVX-512 vector; 8 for AVX2)")
    parser.add_argument("--latency-repeats", type=int, default=20, help="timed calls of each model per mode")
    parser.add_argument("--latency-threads", type=int, default=1,
                        help="torch threads while timing inference (1: timed with the thread's CPU clock)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--jobs", type=int, default=None, help="processes for the error curves (Pruner n_jobs)")
    parser.add_argument("--finetune-epochs", type=float, default=1.0, help="0 skips the fine-tuned column")
    parser.add_argument("--finetune-size", type=int, default=10000, help="training images of the fine-tune")
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--finetune-macs", default="0.5", help="fractions whose rows are fine-tuned")
    parser.add_argument("--gn-reg", type=float, default=5e-4,
                        help="reg of torch-pruning's GroupNormPruner for the group-norm rows, whose model is first "
                             "trained with it on the fine-tune's images, epochs and lr (0, or --finetune-epochs 0, "
                             "skips them). 5e-4 is the value of torch-pruning's own CIFAR ResNet-56 group_norm "
                             "benchmark scripts (its constructor default is 1e-4); in the SPR benchmark on the "
                             "same ResNet-20 the stronger 1e-2 and 3e-2 already lost accuracy in training")
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

    with torch_threads(args.latency_threads):
        base = {"eager": model.eval(), "optimised": optimised_for_inference(model, x256[:2], x256)}
    base_seconds = dict.fromkeys(MODES, float("inf"))  # the unpruned model's fastest call over all rows

    rows = [Row("unpruned", 1.0, base_macs, base_params, base_acc, None, dict.fromkeys(MODES, 1.0))]
    models = {"unpruned": model}
    cost_rows = []
    unreachable = []  # orprune rows whose budget the keep counts cannot meet

    def record(name: str, pruned: torch.nn.Module, seconds: float | None) -> None:
        macs, params = count_macs_params(pruned, example)
        with torch_threads(args.latency_threads):
            deployed = {"eager": pruned.eval(), "optimised": optimised_for_inference(pruned, x256[:2], x256)}
            # base and pruned of both modes alternate in one loop: the same machine state for all four
            times = fastest_call_times([m for mode in MODES for m in (base[mode], deployed[mode])], x256,
                                       args.latency_repeats)
        speedup = {}
        for mode, (base_time, pruned_time) in zip(MODES, zip(times[::2], times[1::2])):
            base_seconds[mode] = min(base_seconds[mode], base_time)
            speedup[mode] = base_time / pruned_time
        rows.append(Row(name, macs / base_macs, macs, params, evaluate(pruned, test_x, test_y), seconds, speedup))
        models[name] = pruned

    for solver, round_to, errors in itertools.product(args.solvers.split(","), [int(r) for r in args.round_to.split(",")],
                                                      args.errors.split(",")):
        name = solver if round_to == 1 else f"{solver}, round to {round_to}"
        name += ", output errors" if errors == "output" else ""
        with warnings.catch_warnings(), PeakMemory() as memory:
            warnings.simplefilter("ignore", UserWarning)
            start = time.perf_counter()
            pruner = orprune.Pruner(solver=solver, round_to=round_to, errors=errors, progress=False, n_jobs=args.jobs)
            pruner.fit(model, calibration)
            fit_seconds = time.perf_counter() - start
            results = {}
            for allocation in args.allocations.split(","):
                label = name if allocation == "milp" else f"{name}, {allocation} rates"
                for fraction in fractions:
                    start = time.perf_counter()
                    try:
                        result = pruner.prune(macs=fraction, allocation=allocation)
                    except ValueError as exc:
                        # rounded keep counts have a floor (e.g. round_to=16 keeps >= 16 channels per unit)
                        if "cannot be met" not in str(exc):
                            raise
                        unreachable.append(f"orprune {label}, {fraction:.2f}")
                        continue
                    results[allocation, fraction] = (result, time.perf_counter() - start)
        milp = {f: s for (a, f), (_, s) in results.items() if a == "milp"}
        cost_rows.append((name, fit_seconds, milp, memory.extra_mib))
        for (allocation, fraction), (result, seconds) in results.items():
            label = name if allocation == "milp" else f"{name}, {allocation} rates"
            record(f"orprune {label}, {fraction:.2f}", result.model, fit_seconds + seconds)

    # (label, model to prune, importance, seconds spent before pruning)
    baselines = [(f"torch-pruning {importance}", model, importance, 0.0) for importance in ("magnitude", "taylor")]
    group_norm = None
    if args.gn_reg > 0 and args.finetune_epochs > 0:
        pick = finetune_subset(args, len(train_y))
        regularised, gn_meta = group_norm_trained(model, train_x[pick], train_y[pick], reg=args.gn_reg,
                                                  epochs=args.finetune_epochs, lr=args.finetune_lr,
                                                  threads=args.latency_threads)
        group_norm = {"seconds": gn_meta["train_seconds"], "accuracy": evaluate(regularised, test_x, test_y)}
        # GroupNormPruner's pruning step is BasePruner's (= MagnitudePruner) with the importance it is given;
        # with GroupMagnitudeImportance(p=2), the "magnitude" baseline's, the bisection to each MACs target is
        # reused as is (tests/test_benchmark_group_norm.py checks the two prune identically).
        baselines.append((f"torch-pruning group norm (reg {args.gn_reg:g})", regularised, "magnitude",
                          group_norm["seconds"]))
    for label, source, importance, before in baselines:
        for fraction in fractions:
            start = time.perf_counter()
            pruned = torch_pruning_baseline(source, example, macs=fraction, importance=importance,
                                            calibration=taylor_batches[:4])
            seconds = before + time.perf_counter() - start
            record(f"{label}, {fraction:.2f}", pruned, seconds)
            repaired = recalibrate_batchnorm(copy.deepcopy(pruned), calibration)
            record(f"{label} + BN re-estimation, {fraction:.2f}", repaired, seconds)

    tuned = finetune(models, rows, args, train_x, train_y, test_x, test_y)
    text = report(args, command, dataset, meta, base_acc, base_macs, base_params, cost_rows, rows, tuned,
                  base_seconds, unreachable, group_norm)
    with open(args.output, "w") as handle:
        handle.write(text)
    print(text)


def finetune_subset(args: argparse.Namespace, n_train: int) -> torch.Tensor:
    """Indices of the ``--finetune-size`` training images of the fine-tune (and of the group-norm training)."""
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(1))[: args.finetune_size]


def finetune(models: dict[str, torch.nn.Module], rows: list[Row], args: argparse.Namespace,
             train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> dict[str, float]:
    """Test accuracy of the unpruned model and of every row at ``--finetune-macs`` after the same fine-tune."""
    if args.finetune_epochs <= 0:
        return {}
    pick = finetune_subset(args, len(train_y))
    wanted = {f"{float(v):.2f}" for v in args.finetune_macs.split(",")}
    out = {}
    for name in (row.name for row in rows):
        if name != "unpruned" and name.rsplit(", ", 1)[-1] not in wanted:
            continue
        start = time.perf_counter()
        tuned = train(copy.deepcopy(models[name]), train_x[pick], train_y[pick], epochs=args.finetune_epochs,
                      lr=args.finetune_lr, seed=0, threads=args.latency_threads, channels_last=CHANNELS_LAST,
                      progress=False)
        out[name] = evaluate(tuned, test_x, test_y)
        print(f"fine-tuned {name}: {out[name]:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return out


def targets(rows: list[Row], tuned: dict[str, float], base_acc: float) -> list[str]:
    """Issue 3's latency target and issue 5's accuracy targets, checked against the table."""
    lines = ["## Targets (issues 3 and 5)", "",
             "| target | best orprune row | value | met |", "|---|---|---:|---|"]
    half = [row for row in rows if row.name.startswith("orprune") and row.name.endswith(", 0.50")]
    for mode in MODES if half else ():
        best = max(half, key=lambda row: row.speedup[mode] * row.fraction)
        ratio = best.speedup[mode] * best.fraction
        lines.append(f"| issue 3, {mode}: batch-256 speed-up at 50% MACs >= 0.8 of ideal (1 / MACs kept) | "
                     f"{best.name} | {ratio:.2f} of ideal ({best.speedup[mode]:.2f}x at {best.fraction:.3f} MACs) | "
                     f"{'yes' if ratio >= 0.8 else 'no'} |")
    for fraction, limit in ((0.5, 0.5), (0.33, 1.0)):
        candidates = [(row.accuracy, row.name) for row in rows
                      if row.name.startswith("orprune") and row.name.endswith(f", {fraction:.2f}")]
        if candidates:
            acc, name = max(candidates)
            drop = 100 * (base_acc - acc)
            lines.append(f"| issue 5, no fine-tune, {1 / fraction:.0f}x MACs reduction: drop <= {limit:g} points | "
                         f"{name} | {drop:.2f} points | {'yes' if drop <= limit else 'no'} |")
    for fraction in sorted({name.rsplit(', ', 1)[-1] for name in tuned if name != "unpruned"}):
        ours = [(a, n) for n, a in tuned.items() if n.startswith("orprune") and n.endswith(fraction)]
        theirs = [(a, n) for n, a in tuned.items() if n.startswith("torch-pruning") and n.endswith(fraction)]
        if ours and theirs:
            (a, n), (b, m) = max(ours), max(theirs)
            lines.append(f"| issue 5, fine-tuned at {fraction} MACs: >= torch-pruning's best ({m}: {b:.4f}) | {n} | "
                         f"{a:.4f} | {'yes' if a >= b else 'no'} |")
    return lines + [""]


def report(args, command, dataset, meta, base_acc, base_macs, base_params, cost_rows, rows, tuned,
           base_seconds, unreachable, group_norm) -> str:
    clock = "`time.thread_time` (CPU time of the timing thread)" if args.latency_threads == 1 else \
        "`time.perf_counter` (wall time: with several threads the timing thread's CPU time misses the workers')"
    lines = [
        f"# Whole-network pruning: {args.model} on {dataset}",
        "",
        f"Produced by `{command.strip()}` on {date.today()} ({machine()}, "
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
        "Speed-up = unpruned batch-256 latency / pruned latency, each model in the same deployment mode: "
        "**eager** (the `nn.Module` as it is, eval, `torch.no_grad()`) and **optimised** "
        "(`torch.jit.optimize_for_inference(torch.jit.trace(model))`: frozen, BatchNorm folded into the convs, "
        "oneDNN blocked layouts kept between convs; its output checked against eager mode's). "
        f"Latency = fastest of {args.latency_repeats} calls after warm-up, the unpruned and pruned models of both "
        f"modes called in turn (the same machine state for all four), {args.latency_threads} torch thread(s), "
        f"timed with {clock}. Unpruned latency: {1e3 * base_seconds['eager']:.0f} ms eager, "
        f"{1e3 * base_seconds['optimised']:.0f} ms optimised. Ideal = 1 / MACs kept. "
        "\"round to r\": keep counts in multiples of r (`Pruner(round_to=r)`; CPU kernels work in vectors of 16 "
        "floats with AVX-512, 8 with AVX2); \"uniform rates\": one keep fraction for every unit "
        "(`prune(allocation=\"uniform\")`); \"output errors\": the allocation sums each unit's error of the "
        "network's output when it alone is pruned (`Pruner(errors=\"output\")`, measured in the fit on 512 of the "
        "calibration images) instead of its layer's relative reconstruction error.",
        "",
        "| method | MACs kept | MACs | params | test accuracy | fine-tuned | pruning time (s) | speed-up eager "
        "| / ideal eager | speed-up optimised | / ideal optimised |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ft = f"{tuned[row.name]:.4f}" if row.name in tuned else ""
        speed = " | ".join(f"{row.speedup[mode]:.2f} | {row.speedup[mode] * row.fraction:.2f}" for mode in MODES)
        lines.append(
            f"| {row.name} | {row.fraction:.3f} | {row.macs:,} | {row.params:,} | {row.accuracy:.4f} | {ft} | "
            f"{'' if row.seconds is None else f'{row.seconds:.1f}'} | {speed} |"
        )
    if group_norm:
        lines += ["", f"Group-norm rows: torch-pruning's method is regularise, then prune, so their model first had one "
                      f"extra training pass with `GroupNormPruner(reg={args.gn_reg:g}, GroupMagnitudeImportance(p=2))`"
                      f".regularize after every backward, on the fine-tune's images, epochs and lr "
                      f"({args.finetune_epochs:g} epoch(s) on {args.finetune_size} images, max lr "
                      f"{args.finetune_lr:g}): {group_norm['seconds']:.1f} s, included in their pruning time (as "
                      f"measured when the regularised model was trained and cached); the regularised model, unpruned, "
                      f"has test accuracy {group_norm['accuracy']:.4f}. It is then pruned like the magnitude rows "
                      f"(uniform ratio per layer, bisected to each MACs target). Their fine-tuned column follows that "
                      f"regularised pass, so they had twice the other rows' training budget. The regulariser's pull per step "
                      f"is 1 to 16 times `reg` (beside weight decay 5e-4), small over a pass this short; torch-pruning's "
                      f"own recipes regularise for a whole training run (`--gn-reg` or a longer budget strengthens it)."]
    elif args.gn_reg > 0:
        lines += ["", "Group-norm rows skipped: their regularised training uses the fine-tune's budget, and "
                      "`--finetune-epochs` is 0."]
    if unreachable:
        lines += ["", f"Not reachable (the budget is below the smallest model the keep counts allow, e.g. a multiple "
                      f"of r channels per unit with `round_to=r`): {'; '.join(unreachable)}."]
    lines += ["", *targets(rows, tuned, base_acc)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
