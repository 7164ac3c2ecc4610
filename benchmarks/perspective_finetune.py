"""Threshold, remove, fine-tune: the models of ``perspective_training.py`` recovered after removal.

The pipeline of issue 4 ends with an optional fine-tune (``orprune.spr.training.train_with_spr``,
``orprune spr --finetune-epochs``). ``perspective_training.py`` measures what each regulariser lets the
threshold remove *without* it, against a common floor (the pretrained model's validation accuracy minus
``--tolerance``); a regulariser that costs accuracy while training then removes nothing, however cleanly
it separated the groups. This benchmark gives every trained model the same recovery:

1. the threshold search of ``perspective_training.threshold`` with the tolerance measured from the trained
   model itself (a *removal tolerance*, far larger than the final one);
2. the groups below it physically removed (the same surgery), then ``--finetune-epochs`` of the task loss
   alone on the same training images (``orprune.training.train``, one-cycle max lr ``--finetune-lr``);
3. the fine-tuned model passes if its validation accuracy is at or above the common floor. The removal
   tolerance is searched: ``--finetune-low`` first (halved while it fails, down to ``--tolerance``), then
   ``--finetune-high`` (or the last failure), then ``--finetune-steps`` bisections between the largest pass
   and the smallest failure. The answer is the largest removal that passed (the number removed never
   decreases with the tolerance; the fine-tune's outcome need not be monotone, so it is a local answer, and
   every rung is reported). If nothing passes, the answer is the common search without fine-tuning
   (``[common]`` of ``perspective_training.py``), which meets the floor by construction.

The validation split chooses, the test split reports. Every option of ``perspective_training.py`` applies
(the trained models and searches come from its cache, ``benchmarks/cache/``); run e.g. ``python
benchmarks/perspective_finetune.py --init pretrained-holdout --epochs 3 --train-size 30000 --val-size 5000
--lr 0.02 --threads 1 --seed 4 --score relative_norm --methods spr,none,group_norm --spr
0.1/0.06/4/r,0.1/0.07/4/r,0.1/0.08/4/r --gn-reg 2e-3,3e-3,4e-3 --tag _3ep_relative_seed4``; writes
``benchmarks/results/perspective_finetune<tag>.md`` (the exact command is in its header).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from orprune.training import evaluate, train

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import perspective_training as base  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = base.parser(__doc__.split("\n")[0])
    p.add_argument("--finetune-epochs", type=float, default=1.0, help="epochs of the task loss after removal")
    p.add_argument("--finetune-lr", type=float, default=0.01, help="one-cycle max lr of the fine-tune")
    p.add_argument("--finetune-low", type=float, default=0.16,
                   help="first removal tolerance (a fraction, from the trained model's own val acc)")
    p.add_argument("--finetune-high", type=float, default=0.64, help="largest removal tolerance tried")
    p.add_argument("--finetune-steps", type=int, default=1, help="bisections between a pass and a failure")
    args = base.parse(argv, p)
    if args.init == "scratch":
        p.error("the common floor needs a pretrained reference: use --init pretrained or pretrained-holdout")
    if not 0 < args.tolerance < args.finetune_low <= args.finetune_high or args.finetune_epochs <= 0 \
            or args.finetune_steps < 0:
        p.error("need 0 < --tolerance < --finetune-low <= --finetune-high, --finetune-epochs > 0 and "
                "--finetune-steps >= 0")
    return args


def rung(model: torch.nn.Module, tolerance: float, args: argparse.Namespace, data: dict) -> dict:
    """Search at ``tolerance`` (from the model's own accuracy), remove, fine-tune, evaluate."""
    res = base.threshold(model, argparse.Namespace(**{**vars(args), "tolerance": tolerance}), data)
    pruned = res.model
    start = time.perf_counter()
    if res.n_removed:
        train(pruned, data["x"], data["y"], epochs=args.finetune_epochs, lr=args.finetune_lr, seed=args.seed,
              channels_last=True, progress=False)
    seconds = time.perf_counter() - start
    return dict(tolerance=tolerance, removed=res.n_removed, total=len(res.norms),
                macs=(res.macs_before, res.macs_after), params=(res.params_before, res.params_after),
                val_pruned=res.accuracy_after, val_tuned=evaluate(pruned, data["val_x"], data["val_y"]),
                test_tuned=evaluate(pruned, data["test_x"], data["test_y"]), seconds=seconds)


def recovered(label: str, method: str, options: dict, args: argparse.Namespace, data: dict, ref: dict) -> dict:
    """The removal-tolerance search for one trained model, each rung cached beside its weights."""
    model, seconds, path = base.trained(method, args, data, **options)
    row = base._searches(label, model, seconds, path, args, data, ref)  # the no-fine-tune searches
    floor = ref["val"] - args.tolerance
    rungs: dict[float, dict] = {}

    def passes(tolerance: float) -> bool:
        tolerance = round(tolerance, 6)
        if tolerance not in rungs:
            cached = path.with_name(f"{path.stem}{base.score_suffix(args)}_ft{args.finetune_epochs:g}"
                                    f"_lr{args.finetune_lr:g}_tol{tolerance:g}.json")
            r = rungs[tolerance] = base._json_cached(cached, lambda: rung(model, tolerance, args, data))
            print(f"{label}: tolerance {tolerance:g}, {r['removed']} groups, val {r['val_pruned']:.4f} -> "
                  f"{r['val_tuned']:.4f} (floor {floor:.4f})", flush=True)
        r = rungs[tolerance]
        return bool(r["removed"]) and r["val_tuned"] >= floor - 1e-12

    low, high = args.finetune_low, args.finetune_high
    while not passes(low) and low / 2 > args.tolerance:
        low, high = low / 2, low  # the smallest failure so far bounds the bisection
    if passes(low):
        if high > low and not passes(high):
            for _ in range(args.finetune_steps):
                mid = (low + high) / 2
                low, high = (mid, high) if passes(mid) else (low, mid)
    passed = [r for t, r in rungs.items() if passes(t)]
    best = max(passed, key=lambda r: (r["removed"], r["tolerance"])) if passed else None
    return dict(row=row, rungs=sorted(rungs.values(), key=lambda r: r["tolerance"]), best=best)


def _pct(before: float, after: float) -> str:
    return f"{100 * (1 - after / before):.1f}%"


def table_row(label: str, r: dict, ref: dict, high: float) -> str:
    row, best, common = r["row"], r["best"], r["row"]["common"]
    tried = ", ".join(f"{100 * t['tolerance']:g}: {t['removed']} / {t['val_tuned']:.4f}" for t in r["rungs"])
    no_ft = _pct(*common["macs"]) if common["removed"] else "-"
    if best is None:
        answer = (f"no rung passed: [common] without fine-tuning | {common['removed']} | {no_ft} | "
                  f"{common['val_after']:.4f} | {common['test_after']:.4f} | "
                  f"{100 * (ref['test'] - common['test_after']):.2f}")
    else:
        top = " (top of the range: more may pass)" if best["tolerance"] >= high else ""
        answer = (f"{100 * best['tolerance']:g}{top} | {best['removed']} / {best['total']} | "
                  f"{_pct(*best['macs'])} | {best['val_tuned']:.4f} | {best['test_tuned']:.4f} | "
                  f"{100 * (ref['test'] - best['test_tuned']):.2f}")
    return (f"| {label} | {row['test_trained']:.4f} | {no_ft} | {answer} | {tried} | "
            f"{sum(t['seconds'] for t in r['rungs']):.0f} |")


def report(args: argparse.Namespace, data: dict, ref: dict, rows: list[str], argv: list[str] | None) -> str:
    command = base._command(argv, "perspective_finetune.py")
    floor = ref["val"] - args.tolerance
    return "\n".join([
        "# Threshold, remove, fine-tune: SPR vs no regulariser vs group norm after the same recovery", "",
        f"Command: `{command}`", "",
        f"Setting (training as in `perspective_training.py`): {base._setting(args, data)}", "",
        f"Pretrained, unpruned: val acc {ref['val']:.4f}, test acc {ref['test']:.4f}; common floor: val acc "
        f">= {floor:.4f} ({100 * args.tolerance:g} points below the pretrained model). Each trained model is "
        f"thresholded at a removal tolerance measured from its own val acc (searched: "
        f"{100 * args.finetune_low:g} points first, halved while it fails; then {100 * args.finetune_high:g}; then "
        f"{args.finetune_steps} bisection(s)), the groups below it removed, then fine-tuned "
        f"{args.finetune_epochs:g} epoch(s) on the same training images (task loss "
        f"only, one-cycle max lr {args.finetune_lr:g}); the answer is the largest removal whose fine-tuned val "
        "acc meets the floor (the validation split chooses, the test column reports). `[common], no fine-tune` "
        "is `perspective_training.py`'s answer on the same trained model.", "",
        "| training | test acc (trained) | [common] MACs removed, no fine-tune | fine-tuned: rung, points "
        "| groups removed | MACs removed | val acc fine-tuned | test acc fine-tuned | test drop vs pretrained, "
        "points | rungs tried (points: groups / val acc fine-tuned) | fine-tune s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows, "",
        "Fine-tune seconds are wall time on a shared 2-core machine, one torch thread: not a speed comparison.", ""])


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    data = base.load_data(args)
    ref = base._reference(args, data)
    rows = [table_row(label, recovered(label, method, options, args, data, ref), ref, args.finetune_high)
            for label, method, options in base.runs(args)]
    text = report(args, data, ref, rows, argv)
    base.RESULTS.mkdir(parents=True, exist_ok=True)
    (base.RESULTS / f"perspective_finetune{args.tag}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
