"""Trained concat, grouped-conv and channel-shuffle networks (issue 21): accuracy at a MACs budget, no fine-tuning.

A small DenseNet (every dense layer reads the concatenation of all earlier outputs), a small ResNeXt
(grouped 3x3 convs, residual adds) and a small ShuffleNetV2 (chunks, concatenations and channel shuffles; a stage's
units have keep counts tied by its chunks), all from ``orprune.examples.coverage_zoo``, are trained a few epochs on
Fashion-MNIST (cached in ``benchmarks/cache/``). Each is pruned to ``--macs`` of its MACs by orprune (error
curves, MILP allocation, sequential least-squares refit: ``Pruner(solver=...)``) and by torch-pruning's
magnitude and Taylor pruners (uniform ratio per layer, bisected to the budget, classifier ignored), each
also with BatchNorm statistics re-estimated on the calibration images, as ``benchmarks/network_pruning.py``
does for ResNet-20; a torch-pruning failure (as on ShuffleNetV2) is a row with the error. Reported: MACs kept
(torch-pruning's count), params, test accuracy, pruning time (wall and CPU), and for orprune the units / groups
left alone and ``max |pruned - masked| / max |masked|`` on test images (the physically pruned model against the
masked reference).

Run ``python -m benchmarks.cnn_accuracy`` (``--help`` for the settings); writes
``benchmarks/results/cnn_accuracy.md``.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import date

import torch

import orprune
from benchmarks.common import RESULTS_DIR, machine, trained_model
from orprune.examples.baselines import recalibrate_batchnorm, torch_pruning_baseline
from orprune.examples.datasets import load_default
from orprune.network.costs import count_macs_params
from orprune.network.surgery import masked_copy
from orprune.training import batches, evaluate

#: Model name (``benchmarks.common.MODELS``) -> what it exercises.
NETWORKS = {"densenet_small": "concatenation (DenseNet)", "resnext_small": "grouped convs (ResNeXt, 8 groups)",
            "shufflenet_small": "channel shuffle (ShuffleNetV2, widths 48 and 96)"}


@dataclass(frozen=True)
class Row:
    """One pruned (or the unpruned) model of one network."""

    network: str
    method: str
    fraction: float | None
    macs: float | None
    params: int | None
    accuracy: float | None
    wall: float | None = None
    cpu: float | None = None
    note: str = ""


class _Clock:
    """Wall and process CPU seconds of the block."""

    def __enter__(self) -> _Clock:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu


def _row(network: str, method: str, fraction: float, model: torch.nn.Module, base_macs: int, example: torch.Tensor,
         test: tuple[torch.Tensor, torch.Tensor], clock: _Clock | None, note: str = "") -> Row:
    macs, params = count_macs_params(model, example)
    return Row(network, method, fraction, macs / base_macs, params, evaluate(model, *test),
               None if clock is None else clock.wall, None if clock is None else clock.cpu, note)


def run_network(name: str, args: argparse.Namespace, fractions: list[float]) -> tuple[list[Row], dict]:
    model, meta = trained_model(name, epochs=args.epochs, channels_last=False)
    train_x, train_y, _ = load_default("train")
    test = tuple(t[: args.test_size] for t in load_default("test")[:2])
    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))[: args.calibration]
    calibration = list(batches(train_x[order], 128))
    taylor = list(zip(train_x[order].split(128), train_y[order].split(128)))[:4]
    example = test[0][:1]
    base_macs, base_params = count_macs_params(model, example)
    rows = [Row(name, "unpruned", None, 1.0, base_params, evaluate(model, *test))]
    info = {"meta": meta, "macs": base_macs, "params": base_params}
    state = copy.deepcopy(model.state_dict())

    for solver in args.solvers.split(","):
        with warnings.catch_warnings(), _Clock() as fit:
            warnings.simplefilter("ignore", UserWarning)
            pruner = orprune.Pruner(solver=solver, progress=False).fit(model, calibration)
        graph = pruner.graph_
        chains = f", {len(graph.chains)} chain(s) of units whose keep counts a chunk ties" if graph.chains else ""
        info["graph"] = f"{len(graph.units)} units{chains}, {len(graph.excluded)} group(s) left alone (" + \
            "; ".join(sorted({e.reason.split(' (')[0] for e in graph.excluded})) + ")"
        for fraction in fractions:
            with warnings.catch_warnings(), _Clock() as clock:
                warnings.simplefilter("ignore", UserWarning)
                result = pruner.prune(macs=fraction)
            clock.wall, clock.cpu = clock.wall + fit.wall, clock.cpu + fit.cpu
            x = test[0][:256]
            with torch.no_grad():
                masked = masked_copy(model, pruner.graph_, result.plan).eval()(x)
                difference = float((result.model.eval()(x) - masked).abs().max() / masked.abs().max())
            rows.append(_row(name, f"orprune {solver}", fraction, result.model, base_macs, example, test, clock,
                             f"pruned vs masked {difference:.1e}"))
            repaired = recalibrate_batchnorm(copy.deepcopy(result.model), calibration)
            rows.append(_row(name, f"orprune {solver} + BN re-estimation", fraction, repaired, base_macs, example,
                             test, clock))

    for importance in ("magnitude", "taylor"):
        for fraction in fractions:
            try:
                with warnings.catch_warnings(), _Clock() as clock:
                    warnings.simplefilter("ignore")
                    pruned = torch_pruning_baseline(model, example, macs=fraction, importance=importance,
                                                    calibration=taylor)
            except Exception as exc:  # report, do not stop the table
                rows.append(Row(name, f"torch-pruning {importance}", fraction, None, None, None,
                                note=f"failed: {type(exc).__name__}: {str(exc)[:120]}"))
                continue
            rows.append(_row(name, f"torch-pruning {importance}", fraction, pruned, base_macs, example, test, clock))
            repaired = recalibrate_batchnorm(copy.deepcopy(pruned), calibration)
            rows.append(_row(name, f"torch-pruning {importance} + BN re-estimation", fraction, repaired, base_macs,
                             example, test, clock))
    info["input_unchanged"] = all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    return rows, info


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def summary(rows: list[Row], fractions: list[float]) -> list[str]:
    """orprune's best row beside torch-pruning's best (over importances, with or without BN re-estimation)."""
    lines = ["| network | MACs budget | orprune best | accuracy | MACs kept | torch-pruning best | accuracy | MACs kept "
             "| difference (points) |", "|---|---:|---|---:|---:|---|---:|---:|---:|"]
    for network in dict.fromkeys(row.network for row in rows):
        for fraction in fractions:
            done = [r for r in rows if r.network == network and r.fraction == fraction and r.accuracy is not None]
            ours = max((r for r in done if r.method.startswith("orprune")), key=lambda r: r.accuracy, default=None)
            theirs = max((r for r in done if r.method.startswith("torch-pruning")), key=lambda r: r.accuracy,
                         default=None)
            failed = [r for r in rows if r.network == network and r.fraction == fraction and r.accuracy is None
                      and r.method.startswith("torch-pruning")]
            if ours is None or (theirs is None and not failed):
                continue
            if theirs is None:  # every torch-pruning row failed (ShuffleNetV2): say so rather than drop the line
                lines.append(f"| {network} | {fraction:.2f} | {ours.method} | {ours.accuracy:.4f} | {ours.macs:.3f} | "
                             f"torch-pruning {failed[0].note} |  |  |  |")
                continue
            lines.append(f"| {network} | {fraction:.2f} | {ours.method} | {ours.accuracy:.4f} | {ours.macs:.3f} | "
                         f"{theirs.method} | {theirs.accuracy:.4f} | {theirs.macs:.3f} | "
                         f"{100 * (ours.accuracy - theirs.accuracy):+.2f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(NETWORKS), help=f"comma-separated, from {sorted(NETWORKS)}")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of each network (cached)")
    parser.add_argument("--calibration", type=int, default=2048, help="calibration images (training set)")
    parser.add_argument("--macs", default="0.5", help="comma-separated MACs fractions to keep")
    parser.add_argument("--solvers", default="auto,greedy", help="orprune layer solvers (Pruner solver)")
    parser.add_argument("--test-size", type=int, default=10000, help="test images the accuracy is measured on")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--output", default=str(RESULTS_DIR / "cnn_accuracy.md"))
    args = parser.parse_args(argv)
    command = "python -m benchmarks.cnn_accuracy " + shlex.join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    names = args.models.split(",")
    unknown = sorted(set(names) - set(NETWORKS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {sorted(NETWORKS)}")
    fractions = [float(v) for v in args.macs.split(",")]
    rows, infos = [], {}
    for name in names:
        network_rows, infos[name] = run_network(name, args, fractions)
        rows += network_rows
        for row in network_rows:
            print(row, flush=True)
    lines = [f"Command: `{command.strip()}`", "",
             f"{date.today().isoformat()}, {machine()}, torch {torch.__version__}, {args.threads} torch thread(s); "
             f"Fashion-MNIST, {args.calibration} calibration images from the training set, test accuracy on the "
             f"first {args.test_size:,} test images, no fine-tuning. Pruning time: orprune fit + prune, torch-pruning the bisection "
             "over its ratio (several prunings); wall seconds on a shared machine, CPU seconds of this process.", ""]
    for name in names:
        info = infos[name]
        meta = info["meta"]
        lines.append(f"- **{name}**, {NETWORKS[name]}: {info['macs']:,} MACs, {info['params']:,} params, test accuracy "
                     f"{meta['test_accuracy']:.4f} after {meta['epochs']} epochs ({meta['train_seconds']:.0f} s); "
                     f"orprune's graph: {info.get('graph', '-')}; input model unchanged: {info['input_unchanged']}.")
    lines += ["", "## Best of each library", "", *summary(rows, fractions), "", "## All rows", "",
              "| network | method | MACs budget | MACs kept | params | test accuracy | wall s | CPU s | note |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.network} | {r.method} | {_fmt(r.fraction, '.2f')} | {_fmt(r.macs, '.3f')} | "
                     f"{_fmt(r.params, ',')} | {_fmt(r.accuracy, '.4f')} | {_fmt(r.wall, '.1f')} | {_fmt(r.cpu, '.1f')} "
                     f"| {r.note} |")
    with open(args.output, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
