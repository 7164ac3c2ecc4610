"""UCP (Chang et al., arXiv 2010.01251) against orprune's own selection, at the same MACs budget.

A basic-block ResNet (CIFAR-style, ``--depth``, widths 16/32/64) is trained on the digits (default) or
Fashion-MNIST, then pruned to each MACs fraction by

- **orprune**: error curves + allocation MILP + the curves' channels, least-squares refit;
- **UCP**: the same pipeline with UCP's two choices, one width per stage (``ties="stages"`` in the MILP)
  and the channels of highest mean excitation (``orprune.ucp.se_importance``; ``--se-freeze`` picks the
  paper's joint training, the frozen network, or both), still with the least-squares refit;
- the two halves alone (stage widths with orprune's channels, SE channels with free widths), to see
  which choice costs what.

Each pruned model is evaluated without retraining, after a short fine-tune, and after UCP's retraining
from scratch (``train(from_scratch=True)``), the same epochs and schedule for both. Test accuracy is the
mean over ``--seeds`` retraining seeds (the pruning itself is deterministic given the trained network).
CPU time (``time.process_time``, one torch thread) is reported beside wall time: the machine is shared.

Run ``python -m benchmarks.ucp`` (``--help`` for the settings); writes ``benchmarks/results/ucp.md``.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import time
import warnings
from datetime import date

import torch

import orprune
from benchmarks.common import CACHE_DIR, RESULTS_DIR, _key, machine
from orprune.examples.datasets import load_named
from orprune.examples.zoo import CifarResNet
from orprune.network.stages import stage_ties
from orprune.training import evaluate, train
from orprune.ucp import se_importance


class Clock:
    """Wall and CPU seconds of a block, accumulated under a label."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def __call__(self, label: str):
        clock = self

        class _Block:
            def __enter__(self):
                self.start = (time.perf_counter(), time.process_time())

            def __exit__(self, *exc):
                clock.wall[label] = clock.wall.get(label, 0.0) + time.perf_counter() - self.start[0]
                clock.cpu[label] = clock.cpu.get(label, 0.0) + time.process_time() - self.start[1]

        return _Block()


def data(name: str, n_train: int | None):
    x, y, dataset = load_named(name, split="train")
    if n_train is not None and n_train < len(y):
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:n_train]
        x, y = x[idx], y[idx]
    xt, yt, _ = load_named(name, split="test")
    return x, y, xt, yt, dataset


def base_model(args, x, y, dataset: str, clock: Clock) -> torch.nn.Module:
    key = _key(depth=args.depth, dataset=dataset, n=len(y), epochs=args.base_epochs, lr=args.lr, seed=0)
    path = CACHE_DIR / f"ucp_resnet{args.depth}_{dataset}_{key}.pt"
    torch.manual_seed(0)
    model = CifarResNet(args.depth, 10, 1)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu"))
        return model.eval()
    with clock("train the unpruned network"):
        train(model, x, y, epochs=args.base_epochs, lr=args.lr, batch_size=args.batch_size, flip=args.flip,
              seed=0, threads=1, progress=False)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="digits", choices=["digits", "fashion-mnist"])
    parser.add_argument("--train-images", type=int, default=None, help="training subset (default: all)")
    parser.add_argument("--depth", type=int, default=14, help="ResNet depth 6n+2 (n basic blocks per stage)")
    parser.add_argument("--base-epochs", type=float, default=30)
    parser.add_argument("--retrain-epochs", type=float, default=10, help="short fine-tune / from-scratch epochs")
    parser.add_argument("--finetune-lr", type=float, default=0.01)
    parser.add_argument("--lr", type=float, default=0.05, help="max lr of training and from-scratch retraining")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--se-epochs", type=float, default=3)
    parser.add_argument("--se-lr", type=float, default=0.05)
    parser.add_argument("--se-freeze", default="joint,frozen", help="joint (the paper), frozen, or both")
    parser.add_argument("--macs", default="0.5,0.3", help="MACs fractions to keep")
    parser.add_argument("--calibration", type=int, default=1024)
    parser.add_argument("--seeds", default="0,1,2", help="retraining seeds")
    parser.add_argument("--flip", action="store_true", help="random horizontal flips (not for digits)")
    parser.add_argument("--output", default=None, help="default: results/ucp[_<dataset>].md")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.ucp " + shlex.join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    fractions = [float(v) for v in args.macs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    modes = [m for m in args.se_freeze.split(",") if m]
    if not set(modes) <= {"joint", "frozen"}:
        parser.error("--se-freeze lists 'joint' and/or 'frozen'")
    if args.output is None:
        args.output = str(RESULTS_DIR / ("ucp.md" if args.dataset == "digits" else f"ucp_{args.dataset}.md"))
    clock = Clock()
    start = time.perf_counter()
    x, y, xt, yt, dataset = data(args.dataset, args.train_images)
    model = base_model(args, x, y, dataset, clock)
    base_acc = evaluate(model, xt, yt)
    calibration = list(x[: args.calibration].split(256))
    with clock("orprune fit (curves)"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruner = orprune.Pruner(progress=False).fit(model, calibration)
    stages = stage_ties(pruner.graph_)
    scores = {}
    for mode in modes:
        with clock(f"SE importance ({mode})"):
            scores[mode] = se_importance(model, x, y, graph=pruner.graph_, epochs=args.se_epochs, lr=args.se_lr,
                                         batch_size=args.batch_size, freeze=mode == "frozen", flip=args.flip,
                                         threads=1).scores
    methods = {"orprune (curves' channels, free widths)": dict()}
    methods["orprune channels, stage widths"] = dict(ties="stages")
    for mode in modes:
        methods[f"SE channels ({mode}), free widths"] = dict(scores=scores[mode])
        methods[f"UCP: SE channels ({mode}) + stage widths"] = dict(scores=scores[mode], ties="stages")
    rows = []
    for fraction in fractions:
        for label, options in methods.items():
            with clock("prune (allocation + refit)"):
                result = pruner.prune(macs=fraction, **options)
            acc = evaluate(result.model, xt, yt)
            tuned, scratch = [], []
            for seed in seeds:
                with clock("fine-tune"):
                    m = train(copy.deepcopy(result.model), x, y, epochs=args.retrain_epochs, lr=args.finetune_lr,
                              batch_size=args.batch_size, flip=args.flip, seed=seed, threads=1, progress=False)
                tuned.append(evaluate(m, xt, yt))
                with clock("retrain from scratch"):
                    m = train(copy.deepcopy(result.model), x, y, epochs=args.retrain_epochs, lr=args.lr,
                              batch_size=args.batch_size, flip=args.flip, seed=seed, threads=1, progress=False,
                              from_scratch=True)
                scratch.append(evaluate(m, xt, yt))
            widths = "/".join(str(result.allocation.keep[g[0]]) for g in stages) if stages else ""
            error = sum(r.relative_error for r in result.report)  # of the channels actually kept
            rows.append((fraction, label, result.macs_after / result.macs_before, error, widths, acc, tuned, scratch))
            print(f"{fraction:.2f} {label}: {acc:.4f} tuned {statistics.fmean(tuned):.4f} "
                  f"scratch {statistics.fmean(scratch):.4f}", flush=True)
    minutes = (time.perf_counter() - start) / 60

    def pct(values: list[float]) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.fmean(values):.2f} +- {100 * spread:.2f}"

    lines = [f"# UCP against orprune's selection: ResNet-{args.depth} on {dataset}", "",
             f"Produced by `{command}` on {date.today().isoformat()} ({machine()}, 1 torch thread, "
             f"{minutes:.1f} min wall).", "",
             f"Unpruned: test accuracy {100 * base_acc:.2f}% ({len(yt)} test images; {len(y)} training images, "
             f"{args.base_epochs:g} epochs). Calibration: the first {args.calibration} training images. SE blocks: "
             f"{args.se_epochs:g} epochs at max lr {args.se_lr:g} on the training images ('joint': the network "
             "trains with its blocks, as in the paper; 'frozen': only the blocks train). Retraining: "
             f"{args.retrain_epochs:g} epochs, fine-tune at max lr {args.finetune_lr:g} from the pruned (refitted) "
             f"weights, from scratch at max lr {args.lr:g} from fresh weights; mean +- std over seeds {seeds}. "
             "Inner widths per stage: the keep count of each stage's first block (every block of the stage "
             "under stage widths). Summed error: every unit's least-squares reconstruction error (relative "
             "to its consumers' outputs) with the channels actually kept, summed; with the curves' channels it is "
             "the allocation MILP's objective, which the free widths minimise.", "",
             "| MACs budget | method | MACs kept | summed error | stage-1/2/3 first-block widths | "
             "no retraining (%) | fine-tuned (%) | from scratch (%) |",
             "|---:|---|---:|---:|---|---:|---:|---:|"]
    for fraction, label, kept, objective, widths, acc, tuned, scratch in rows:
        lines.append(f"| {fraction:.2f} | {label} | {kept:.3f} | {objective:.4f} | {widths} | {100 * acc:.2f} | "
                     f"{pct(tuned)} | {pct(scratch)} |")
    lines += ["", "Time (seconds, summed over every call; CPU = process time):", "", "| step | wall | CPU |",
              "|---|---:|---:|"]
    lines += [f"| {label} | {clock.wall[label]:.1f} | {clock.cpu[label]:.1f} |" for label in clock.wall]
    text = "\n".join(lines) + "\n"
    with open(args.output, "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
