"""Channel pruning, factorization and both in one allocation on a trained ResNet-20 (issue 23).

The protocol of ``benchmarks/low_rank.py`` (ResNet-20 trained on scikit-learn's 8x8 digits or, with ``--dataset
fashion-mnist``, on the first ``--train-size`` images of Fashion-MNIST's train split; calibration: the first
``--calibration`` training images): one :class:`orprune.MixedPruner` fit (greedy channel curves, certified rank
curves), then at each MACs budget the same allocation MILP in its three modes:

- ``channels``: every layer whole, channel keep counts only (the allocation of :class:`orprune.Pruner`);
- ``factorize``: every unit at full width, ranks only (the allocation of :func:`orprune.factorize`);
- ``mixed``: both; a layer may be factorized only while the units slicing it keep their full width.

The MILP minimises the summed relative layer errors over the options of each mode; the mixed option set holds
both others, so its objective is never larger (checked and reported). The three allocations come from
:func:`orprune.guarded_prune`, which builds each distinct one and keeps the one with the smallest output error on
the ``--probe`` training images after the calibration (the ``guard`` row; no labels, no test images). Accuracy is measured
after the surgery (channel refit, then sequential closed-form refit of the factorized layers), without
fine-tuning (on the first ``--test-size`` test images) and, with ``--finetune-epochs E``, after E epochs of SGD
on the training images (lr
``--finetune-lr``, one-cycle). CPU latency of every built model: median of interleaved calls on a batch of test
images, one torch thread (:func:`orprune.network.timing.call_times`).

Run ``python -m benchmarks.low_rank_mixed`` (``--help`` for the settings); writes
``benchmarks/results/low_rank_mixed.md``. Fashion-MNIST, whose larger test set resolves differences the digits' 360
test images cannot (one image is 0.28% there)::

    python -m benchmarks.low_rank_mixed --dataset fashion-mnist --train-size 15000 --epochs 6 --probe 1024 \
        --test-size 5000 --output benchmarks/results/low_rank_mixed_fashion-mnist.md
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
import warnings
from datetime import date

import torch

import orprune
from benchmarks.common import RESULTS_DIR, machine
from benchmarks.low_rank import DATASETS, load_split, trained
from orprune.mixed import MODES
from orprune.mixed_guard import METRICS
from orprune.network.timing import call_times, torch_threads
from orprune.training import batches, evaluate, train


def describe(fitted: orprune.MixedPruner, result: orprune.MixedResult) -> str:
    """Pruned units (kept / full) and factorized layers (rank / max rank) of one result."""
    graph = fitted.pruner_.graph_
    pruned = [f"{u} {k}/{graph[u].n_channels}" for u, k in result.keep.items() if k < graph[u].n_channels]
    factored = [f"{n} r{r}/{fitted.curves_[n].max_rank}" for n, r in result.ranks.items() if r is not None]
    return f"pruned: {', '.join(pruned) or 'none'}; factorized: {', '.join(factored) or 'none'}"


def output_error(model: torch.nn.Module, reference: torch.nn.Module, images: torch.Tensor) -> float:
    """``||f(x) - f_ref(x)||^2 / ||f_ref(x)||^2`` of the logits over ``images`` (what the layer errors stand for)."""
    with torch.no_grad():
        ref = reference.eval()(images)
        return float((model.eval()(images) - ref).square().sum() / ref.square().sum())


#: How the header names each dataset's images.
_DESCRIPTIONS = {"digits": "the 8x8 digits", "fashion-mnist": "Fashion-MNIST (28x28)"}


def dataset_text(dataset: str, epochs: int, n_train: int, n_split: int, accuracy: float, n_test: int) -> str:
    """The header's sentence on the trained model, with the sizes actually used (one test image is 1/n_test)."""
    subset = f"the first {n_train} of the {n_split}" if n_train < n_split else f"all {n_split}"
    return (f"ResNet-20 (1 input channel) trained {epochs} epochs on {subset} training images of "
            f"{_DESCRIPTIONS[dataset]}: test accuracy {accuracy:.2%} on {n_test} test images (one image is {1 / n_test:.2%}).")


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark, write the results file; returns the table's rows (``model``: the built model)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--macs", type=float, nargs="+", default=[0.5, 0.33], help="MACs budgets (fractions)")
    parser.add_argument("--dataset", choices=DATASETS, default="digits", help="what ResNet-20 is trained on")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs")
    parser.add_argument("--train-size", type=int, default=None,
                        help="train on the first N training images (default: the whole split)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration", type=int, default=1024, help="calibration images (train split)")
    parser.add_argument("--probe", type=int, default=None,
                        help="the guard's probe: N training images after the calibration (default: all the rest)")
    parser.add_argument("--test-size", type=int, default=None, help="the first N test images (default: all)")
    parser.add_argument("--solver", default="greedy", help="channel curve solver")
    parser.add_argument("--errors", choices=["layer", "output"], default="layer",
                        help="what the MILP sums: relative layer errors, or the network's relative output error of "
                             "each option alone (MixedPruner(errors=...))")
    parser.add_argument("--metric", choices=list(METRICS), default="output", help="the guard's probe metric")
    parser.add_argument("--finetune-epochs", type=float, default=0, help="fine-tune epochs (0: none)")
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--latency-batch", type=int, default=64, help="test images per timed call (0: no latency)")
    parser.add_argument("--latency-repeats", type=int, default=30, help="timed calls per model (median)")
    parser.add_argument("--output", default=str(RESULTS_DIR / "low_rank_mixed.md"))
    args = parser.parse_args(argv)
    for name in ("train_size", "probe", "test_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"`--{name.replace('_', '-')}` must be at least 1, got {getattr(args, name)}.")
    if args.calibration < 1:
        parser.error(f"`--calibration` must be at least 1, got {args.calibration}.")
    torch.set_num_threads(1)
    start, cpu_start = time.perf_counter(), time.process_time()
    images, _ = load_split(args.dataset, "train")  # the whole split: the probe may lie beyond the training subset
    if args.calibration >= len(images):
        parser.error(f"`--calibration` {args.calibration} uses the whole training split ({len(images)} images): "
                     "no held-out probe images are left.")
    model, accuracy = trained(args.epochs, args.seed, args.dataset, args.train_size, args.test_size)
    train_images, train_labels = load_split(args.dataset, "train", args.train_size)
    test_images, test_labels = load_split(args.dataset, "test", args.test_size)
    calibration = list(batches(images, 128, args.calibration))
    end = None if args.probe is None else args.calibration + args.probe
    held_out = images[args.calibration:end]  # training images after the calibration: the guard's probe
    t, c = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = orprune.MixedPruner(solver=args.solver, errors=args.errors, progress=False).fit(model,
                                                                                                    calibration)
    fit_time, fit_cpu = time.perf_counter() - t, time.process_time() - c
    rows, details, timed = [], [], [model]
    tuned_accuracy: dict[int, float] = {}  # id(built model) -> accuracy after fine-tuning
    for budget in args.macs:
        t, c = time.perf_counter(), time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            guarded = orprune.guarded_prune(fitted, [held_out], macs=budget, metric=args.metric)
        seconds, cpu = time.perf_counter() - t, time.process_time() - c
        by_mode = guarded.by_mode()
        problem, _ = fitted.allocation_problem()  # the objective in its own units (calibrated: unweighted)
        for mode in (*MODES, *(m for m in by_mode if m not in MODES), "guard"):
            cand = by_mode[guarded.chosen] if mode == "guard" else by_mode[mode]
            result = cand.result
            if all(result.model is not m for m in timed):
                timed.append(result.model)
            acc = evaluate(result.model, test_images, test_labels)
            out_err = output_error(result.model, model, test_images)
            tuned = tuned_accuracy.get(id(result.model))  # modes sharing one built model: fine-tuned once
            if args.finetune_epochs > 0 and tuned is None:
                net = train(copy.deepcopy(result.model), train_images, train_labels, epochs=args.finetune_epochs,
                            lr=args.finetune_lr, seed=args.seed, flip=False, threads=1, progress=False)
                tuned = tuned_accuracy[id(result.model)] = evaluate(net, test_images, test_labels)
            label = f"guard -> {'/'.join(cand.modes)}" if mode == "guard" else mode
            rows.append(dict(budget=budget, mode=label, objective=problem.objective(dict(result.allocation.keep)),
                             probe=cand.output_error,
                             disagree=cand.disagreement, out_err=out_err, acc=acc, tuned=tuned,
                             macs=result.macs_after / result.macs_before,
                             params=result.params_after / result.params_before,
                             model=result.model, time=(seconds, cpu) if mode == "guard" else None))
            if mode != "guard":
                details.append(f"- {budget:.0%} MACs, {mode}: {describe(fitted, result)}"
                               + (f" (rank errors x {guarded.rank_weight:.4f})" if mode == "calibrated" else ""))
            print({k: v for k, v in rows[-1].items() if k != "model"}, flush=True)
    latency = {}
    if args.latency_batch > 0:
        x = test_images[: args.latency_batch]
        with torch_threads(1):
            seconds = call_times(timed, x, repeats=args.latency_repeats, warmup=3, statistic="median")
        latency = {id(m): s for m, s in zip(timed, seconds)}
    base = latency.get(id(model))
    lines = [
        f"# Channel pruning, factorization and both in one allocation: resnet20 on {args.dataset}",
        "",
        f"Produced by `{shlex.join(['python', '-m', 'benchmarks.low_rank_mixed', *(argv if argv is not None else sys.argv[1:])])}` "
        f"on {date.today()} ({machine()}, 1 torch thread, {time.perf_counter() - start:.0f} s wall, "
        f"{time.process_time() - cpu_start:.0f} s CPU).",
        "",
        dataset_text(args.dataset, args.epochs, len(train_images), len(images), accuracy, len(test_images))
        + f" Calibration: the first {args.calibration} training images; the guard's probe (`orprune.guarded_prune`, "
        f"metric {args.metric!r}): the next {len(held_out)} training images (held out from the calibration; no "
        "labels, no test images). "
        f"One `MixedPruner(solver={args.solver!r}, errors={args.errors!r})` fit ({fit_time:.0f} s wall, "
        f"{fit_cpu:.0f} s CPU), then per budget the allocation MILP in each mode, each distinct choice built once, "
        "the `calibrated` candidate (the mixed MILP with the rank errors multiplied by the exchange rate the two pure "
        "candidates measured on the probe, its `objective` in the original units), "
        "and the guard's pick: the candidate with the smallest probe output error. `objective`: the MILP's summed "
        + ("relative layer errors (channel curves + rank curves)" if args.errors == "layer" else
           "relative output errors of each option alone (512 probe images)")
        + ", the quantity it minimises; `probe error` / `probe disagree`: ||f(x) - f_0(x)||^2 / ||f_0(x)||^2 of the "
        "logits and the fraction of top-1 classes that differ from f_0's, on the held-out probe; `test error`: the "
        "same relative logit error on the test images, f_0 the unpruned model. MACs and params as torch-pruning "
        "counts the built models, relative to the unpruned model (the MILP's costs equal these counts). No BatchNorm "
        "re-estimation."
        + (f" Fine-tune: {args.finetune_epochs:g} epoch(s) of SGD (one-cycle, peak lr {args.finetune_lr:g}) on the "
           f"{len(train_images)} training images." if args.finetune_epochs > 0 else "")
        + (f" CPU latency: median of {args.latency_repeats} calls on a batch of {args.latency_batch} test images, "
           "one torch thread, the thread's CPU time, calls of all models interleaved "
           f"(`orprune.network.timing.call_times`); the unpruned model takes {1e3 * base:.2f} ms."
           if base else ""),
        "",
        "| MACs budget | mode | objective | probe error | probe disagree | test error | test accuracy | "
        "after fine-tune | MACs | params | CPU latency (ms, x unpruned) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lat = latency.get(id(r["model"]))
        lines.append(f"| {r['budget']:.0%} | {r['mode']} | {r['objective']:.4f} | {r['probe']:.4f} | "
                     f"{r['disagree']:.2%} | {r['out_err']:.4f} | {r['acc']:.2%} | "
                     f"{'-' if r['tuned'] is None else format(r['tuned'], '.2%')} | {r['macs']:.1%} | "
                     f"{r['params']:.1%} | {'-' if lat is None else f'{1e3 * lat:.2f} ({lat / base:.2f}x)'} |")
    times = [f"{r['budget']:.0%}: {r['time'][0]:.0f} s wall / {r['time'][1]:.0f} s CPU" for r in rows if r["time"]]
    lines += ["", "Guard time per budget (every mode's MILP, each distinct allocation built and probed): "
              + "; ".join(times) + ".", "",
              "What each allocation chose (pruned units kept/full; factorized layers rank/max rank):", "",
              *details, ""]
    text = "\n".join(lines)
    with open(args.output, "w") as handle:
        handle.write(text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
