"""Training with SPR vs no regulariser vs torch-pruning's group-norm regulariser, then one threshold.

A model is trained three ways with the same loop (``orprune.training.train``: SGD Nesterov,
one-cycle, weight decay, flips), epochs and data:

* ``spr``: plus ``strength * PerspectiveRegularizer(alpha, lam, M="auto" * m_scale)`` in the loss;
* ``none``: nothing more;
* ``group_norm``: torch-pruning's ``GroupNormPruner(reg=...).regularize(model)`` after every backward
  (through a global optimizer pre-step hook, so the loop stays the same).

``--init pretrained`` starts all three from the same trained network
(``benchmarks.common.trained_model(model, epochs=--pretrain-epochs)``, all 60000 Fashion-MNIST training
images) instead of a fresh initialisation, the SPR authors' protocol: the big-M bounds ``M="auto"`` are then
taken from the pretrained weights, and the table also reports each accuracy drop against the pretrained model
and, in the columns marked ``[common]``, a second search whose tolerance is measured from the pretrained
model's validation accuracy for every method (``prune_by_threshold(reference_accuracy=...)``), the fair
criterion. That network saw the validation images, so its validation accuracy (the common reference) is
inflated; ``--init pretrained-holdout`` is the clean protocol: the same recipe (``trained_model``'s call of
``orprune.training.train``: same initialisation, epochs, seed, one thread) on the training images minus the
benchmark's validation split (same permutation, ``--seed`` and ``--val-size``; disjointness checked), cached
under a key hashing the held-out indices; everything else as ``--init pretrained``. ``--spr a/s/m/r`` trains
with the layer-relative penalty (``relative=True``; ``/rd``: detached scale); ``--score relative_norm``
thresholds norms relative to each layer's root-mean-square group norm.

Each trained model is then pruned by the same search (``orprune.spr.pruning.prune_by_threshold``):
the largest norm threshold on the channel groups' norms whose removal costs at most ``--tolerance``
validation accuracy; the table reports channels, MACs and params removed and test accuracy.
``--tune`` instead runs a grid over the SPR parameters and writes a tuning table.

Run ``python benchmarks/perspective_training.py --epochs 2 --train-size 20000 --spr 0.5/0.015/4,0.5/0.03/4
--gn-reg 5e-4,1e-2`` (the exact command of each table is in its header); trained weights and search
results are cached in ``benchmarks/cache/``; writes ``benchmarks/results/perspective_training.md`` and ``.png``
(``perspective_training_tuning.md`` with ``--tune``; ``perspective_training_pretrained*`` with
``--init pretrained``, ``perspective_training_clean*`` with ``--init pretrained-holdout``; ``--tag`` appends a
suffix).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from orprune.examples.datasets import load_digits, load_fashion_mnist
from orprune.examples.zoo import SmallCNN, resnet20
from orprune.spr import PerspectiveRegularizer
from orprune.spr.pruning import ThresholdPruning, prune_by_threshold
from orprune.training import evaluate, step_counts, train

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import perspective_report as report  # noqa: E402
from benchmarks.common import machine, trained_model  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS, CACHE = HERE / "results", HERE / "cache"
METHODS = ("spr", "none", "group_norm")
INITS = ("scratch", "pretrained", "pretrained-holdout")
LABELS = {"spr": "(a) SPR regulariser", "none": "(b) no regulariser", "group_norm": "(c) torch-pruning group norm"}


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


# flags after alpha/strength/m_scale -> (include_consumers, relative, detach_scale, MACs-priced)
_FLAGS = {"c": (True, False, False, False), "r": (False, True, False, False), "rd": (False, True, True, False),
          "m": (False, False, False, True)}


def _triples(text: str) -> list[tuple[float, float, float, bool, bool, bool, bool]]:
    """``alpha/strength/m_scale`` items; ``/c`` appended penalises consumer input slices too, ``/r`` makes
    the penalty layer-relative (``relative=True``), ``/rd`` relative with a detached scale, ``/m`` prices
    each group's indicator by the MACs its channel saves (``costs="macs"``)."""
    out = []
    for item in text.split(","):
        parts = item.split("/")
        flags = [False, False, False, False]
        while parts and parts[-1] in _FLAGS:
            flags = [a or b for a, b in zip(flags, _FLAGS[parts.pop()])]
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"expected alpha/strength/m_scale[/c][/r|/rd][/m], got {item!r}")
        out.append((*(float(v) for v in parts), *flags))
    return out


def parser(description: str = __doc__.split("\n")[0]) -> argparse.ArgumentParser:
    """The options of this benchmark (``benchmarks/perspective_finetune.py`` adds its own to them)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", choices=["resnet20", "small_cnn"], default="resnet20")
    p.add_argument("--dataset", choices=["fashion-mnist", "digits"], default="fashion-mnist")
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--train-size", type=int, default=20000, help="training images (a random subset)")
    p.add_argument("--val-size", type=int, default=5000, help="held-out training images for the threshold")
    p.add_argument("--init", choices=list(INITS), default="scratch",
                   help="start from a fresh initialisation, from the cached pretrained network (all training "
                        "images), or from one pretrained the same way without the validation split (the clean "
                        "protocol)")
    p.add_argument("--pretrain-epochs", type=int, default=6,
                   help="epochs of the pretrained network (--init pretrained / pretrained-holdout)")
    p.add_argument("--tolerance", type=float, default=0.005)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--score", choices=["norm", "relative_norm", "optimal_y"], default="norm",
                   help="threshold the group norms, the norms relative to their layer's RMS group norm, or "
                        "SPR's relaxed indicators y* (same alpha and M scale for every method)")
    p.add_argument("--score-bounds", choices=["start", "trained"], default="trained",
                   help="M of y* from the starting weights or from the trained weights being pruned "
                        "(the latter makes y* relative to each layer's largest entry)")
    p.add_argument("--score-alpha", type=float, default=0.1, help="alpha of y* (lam = 1 - alpha), --score optimal_y")
    p.add_argument("--score-m-scale", type=float, default=1.5, help="M scale of y*, --score optimal_y")
    p.add_argument("--spr", type=_triples, default="0.5/0.015/4",
                   help="SPR settings alpha/strength/m_scale[/c][/r|/rd][/m], comma-separated (lam = 1 - alpha; "
                        "/c: consumer input slices in the groups too; /r: layer-relative penalty; /rd: relative "
                        "with a detached scale; /m: indicators priced by MACs); one row each")
    p.add_argument("--gn-reg", type=_floats, default=[5e-4], help="GroupNormPruner's reg value(s), one row each")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--reg-until", type=float, default=1.0,
                   help="both regularisers act during this fraction of the steps; the rest trains the task loss "
                        "alone (the same for every method)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tune", action="store_true", help="grid over the SPR parameters instead")
    p.add_argument("--grid-alpha", type=_floats, default=[0.1, 0.5])
    p.add_argument("--grid-strength", type=_floats, default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--grid-m-scale", type=_floats, default=[1.5, 4.0])
    p.add_argument("--tag", default="", help="suffix of the output file names")
    return p


def parse(argv: list[str] | None = None, p: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    p = parser() if p is None else p
    args = p.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    if unknown := sorted(set(args.methods) - set(METHODS)):
        p.error(f"unknown methods {unknown}; choose from {METHODS}")
    if args.init != "scratch" and args.dataset != "fashion-mnist":
        p.error(f"`--init {args.init}` needs `--dataset fashion-mnist` (the pretrained network's dataset)")
    return args


def pretrained(args: argparse.Namespace) -> tuple[nn.Module, dict]:
    """The shared starting point of ``--init pretrained`` (trained on the whole training split, cached)
    or of ``--init pretrained-holdout`` (:func:`pretrained_holdout`)."""
    if args.init == "pretrained-holdout":
        return pretrained_holdout(args)
    model, meta = trained_model(args.model, epochs=args.pretrain_epochs, seed=args.seed)
    if meta["dataset"] != args.dataset:
        raise SystemExit(f"the pretrained {args.model} was trained on {meta['dataset']}, not {args.dataset}")
    return model, meta


def pretrained_holdout(args: argparse.Namespace, log: Callable[[str], None] | None = print) -> tuple[nn.Module, dict]:
    """``benchmarks.common.trained_model``'s recipe on the training split minus the benchmark's validation images.

    Same initialisation (``torch.manual_seed(seed)`` then the constructor), the same call of
    ``orprune.training.train`` (``--pretrain-epochs`` epochs, default max lr 0.05, ``seed``, one thread), on the
    training images in their stored order with the :func:`split` validation indices of this ``--seed`` and
    ``--val-size`` removed, so the threshold's validation images are unseen. Cached in ``benchmarks/cache/``
    under a key that hashes the held-out indices.
    """
    x, y = _train_split(args.dataset)
    val, _ = split(args, len(y))
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[val] = False
    pool = keep.nonzero().squeeze(1)
    if set(pool.tolist()) & set(val.tolist()) or len(pool) + len(val) != len(y):
        raise AssertionError("the pretraining images must be exactly the training split minus the validation split")
    held_out = hashlib.sha1(val.numpy().tobytes()).hexdigest()[:10]
    setting = dict(model=args.model, dataset=args.dataset, epochs=args.pretrain_epochs, seed=args.seed,
                   held_out=held_out, n_held_out=len(val))
    key = hashlib.sha1(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:10]
    path = CACHE / f"{args.model}_{args.dataset}_holdout{len(val)}_{key}.pt"
    model = build_model(args, x.shape[1])  # seeds torch exactly as trained_model does before its constructor
    if path.exists():
        saved = torch.load(path, map_location="cpu")
        model.load_state_dict(saved["state_dict"])
        return model.eval(), saved["meta"]
    start = time.perf_counter()
    train(model, x[pool], y[pool], epochs=args.pretrain_epochs, seed=args.seed, threads=1, channels_last=True,
          progress=False, log=log)  # the format of trained_model's recipe
    seconds = time.perf_counter() - start
    test_x, test_y = _test_split(args.dataset)
    meta = {**setting, "test_accuracy": evaluate(model, test_x, test_y), "train_seconds": seconds,
            "n_train": len(pool)}
    if log:
        log(f"{args.model} on {args.dataset} without {len(val)} validation images: "
            f"test accuracy {meta['test_accuracy']:.4f} after {seconds:.0f} s")
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "meta": meta}, path)
    return model.eval(), meta


def _train_split(dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    return load_fashion_mnist(split="train") if dataset == "fashion-mnist" else load_digits("train")


def _test_split(dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    return load_fashion_mnist(split="test") if dataset == "fashion-mnist" else load_digits("test")


def split(args: argparse.Namespace, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the validation images and of the training subset among the ``n`` training-split images."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    n_val = min(args.val_size, n // 4)
    return order[:n_val], order[n_val:n_val + args.train_size]


def load_data(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Train / validation (held out from the training split) / test tensors."""
    x, y = _train_split(args.dataset)
    test_x, test_y = _test_split(args.dataset)
    val, rest = split(args, len(y))
    return {"x": x[rest], "y": y[rest], "val_x": x[val], "val_y": y[val], "test_x": test_x, "test_y": test_y}


def build_model(args: argparse.Namespace, in_channels: int) -> nn.Module:
    torch.manual_seed(args.seed)
    return resnet20(10, in_channels) if args.model == "resnet20" else SmallCNN(in_channels, 10)


def trained(method: str, args: argparse.Namespace, data: dict, *, alpha: float = 0.5, lam: float = 0.5,
            strength: float = 0.0, m_scale: float = 1.0, consumers: bool = False, relative: bool = False,
            detach_scale: bool = False, macs_priced: bool = False, gn_reg: float = 0.0) -> tuple[nn.Module, float, Path]:
    """A model trained with ``method``, from the cache when the same setting ran before."""
    setting = dict(method=method, model=args.model, dataset=args.dataset, epochs=args.epochs, lr=args.lr,
                   train_size=len(data["y"]), val_size=len(data["val_y"]), seed=args.seed)
    if args.init != "scratch":  # scratch keys stay as they were, so the old tables regenerate from cache
        setting.update(init=args.init, pretrain_epochs=args.pretrain_epochs)
    if args.reg_until != 1.0 and method != "none":  # likewise only when set
        setting.update(reg_until=args.reg_until)
    if method == "spr":
        setting.update(alpha=alpha, lam=lam, strength=strength, m_scale=m_scale)
        if consumers:
            setting.update(include_consumers=True)
        if relative:  # only when set, so the keys of the earlier rows stay valid
            setting.update(relative=True, detach_scale=detach_scale)
        if macs_priced:
            setting.update(costs="macs")
    elif method == "group_norm":
        setting.update(gn_reg=gn_reg)
    key = hashlib.sha1(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:10]
    path = CACHE / f"perspective_{method}_{args.model}_{args.dataset}_{key}.pt"
    model = build_model(args, data["x"].shape[1])
    if path.exists():
        saved = torch.load(path, map_location="cpu")
        model.load_state_dict(saved["state_dict"])
        return model.eval(), saved["seconds"], path
    if args.init != "scratch":
        model.load_state_dict(pretrained(args)[0].state_dict())
    example = data["val_x"][:1]
    model.eval()  # tracing must not touch BatchNorm statistics; M="auto" reads the starting weights
    regularizer, handle = None, None
    if method == "spr":
        regularizer = PerspectiveRegularizer(model, alpha=alpha, lam=lam, m_scale=m_scale, example_inputs=example,
                                             include_consumers=consumers, relative=relative,
                                             detach_scale=detach_scale, costs="macs" if macs_priced else None)
    elif method == "group_norm":
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
        pruner = tp.pruner.GroupNormPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                           reg=gn_reg, ignored_layers=head)
        # the steps train() regularizes with `regularizer_until`: the hook runs once before each step
        _, limit = step_counts(len(data["y"]), args.epochs, regularizer_until=args.reg_until)
        done = [0]

        def regularize(*_) -> None:
            if done[0] < limit:
                pruner.regularize(model)
            done[0] += 1

        handle = register_optimizer_step_pre_hook(regularize)
    start = time.perf_counter()
    try:
        train(model, data["x"], data["y"], epochs=args.epochs, lr=args.lr, seed=args.seed, regularizer=regularizer,
              regularizer_strength=strength, regularizer_until=args.reg_until, channels_last=True,
              progress=False, log=print)  # as the tables ran
    finally:
        if handle is not None:
            handle.remove()
    seconds = time.perf_counter() - start
    model = model.eval()
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "seconds": seconds, "setting": setting}, path)
    return model, seconds, path


def threshold(model: nn.Module, args: argparse.Namespace, data: dict,
              reference: float | None = None) -> ThresholdPruning:
    """The same search for every method, on the same groups (filter + BatchNorm affine norms, or y*).

    ``reference``: the validation accuracy the tolerance is measured from (default: the model's own).
    """
    example = data["val_x"][:1]
    if args.score in ("norm", "relative_norm"):
        groups = PerspectiveRegularizer(model, alpha=0.5, lam=0.5, example_inputs=example)
    else:  # y*, with the same rule for every method
        start = model
        if args.score_bounds == "start":
            start = build_model(args, data["x"].shape[1])
            if args.init != "scratch":
                start.load_state_dict(pretrained(args)[0].state_dict())
        a = args.score_alpha
        bounds = PerspectiveRegularizer(start.eval(), alpha=a, lam=1 - a, m_scale=args.score_m_scale,
                                        example_inputs=example).bounds_
        groups = PerspectiveRegularizer(model, alpha=a, lam=1 - a, M=bounds, example_inputs=example)
    return prune_by_threshold(model, groups, data["val_x"], data["val_y"], tolerance=args.tolerance,
                              score=args.score, reference_accuracy=reference)


def _command(argv: list[str] | None, script: str = "perspective_training.py") -> str:
    return f"python benchmarks/{script} " + shlex.join(sys.argv[1:] if argv is None else argv)


def _setting(args: argparse.Namespace, data: dict) -> str:
    start = ""
    if args.init == "pretrained":
        _, meta = pretrained(args)
        start = (f"every method starts from the same pretrained {args.model} ({meta['epochs']} epochs on all 60000 "
                 f"training images, max lr 0.05; test acc {meta['test_accuracy']:.4f}; the validation images of the "
                 "threshold were part of its training set), then trains each method on ")
    elif args.init == "pretrained-holdout":
        _, meta = pretrained(args)
        start = (f"every method starts from the same pretrained {args.model} ({meta['epochs']} epochs on the "
                 f"{meta['n_train']} training images outside the {meta['n_held_out']} validation images, max lr 0.05, "
                 f"otherwise the recipe of `benchmarks.common.trained_model`; test acc {meta['test_accuracy']:.4f}; "
                 "it never saw the validation images of the threshold), then trains each method on ")
    return (f"{args.model} on {args.dataset}: {start}{len(data['y'])} training images, {args.epochs:g} epochs "
            f"(batch 128, SGD Nesterov, one-cycle max lr {args.lr:g}, weight decay 5e-4, flips), "
            f"{len(data['val_y'])} held-out validation images for the threshold, {len(data['test_y'])} test images; "
            + (f"the regularisers act during the first {args.reg_until:.0%} of the steps, the rest trains the task "
               "loss alone; " if args.reg_until != 1.0 else "")
            + f"tolerance {args.tolerance * 100:g} points of validation accuracy; seed {args.seed}; "
            f"{torch.get_num_threads()} torch thread(s), {machine()}.")


def _row(label: str, method: str, options: dict, args: argparse.Namespace, data: dict,
         ref: dict | None = None) -> dict:
    """Train (or load), then :func:`_searches`."""
    return _searches(label, *trained(method, args, data, **options), args, data, ref)


def score_suffix(args: argparse.Namespace) -> str:
    """The part of a cached search's file name that names what was thresholded (``--score`` and y*'s options)."""
    if args.score in ("norm", "relative_norm"):
        return {"norm": "", "relative_norm": "_relnorm"}[args.score]
    return f"_y{args.score_alpha:g}_{args.score_m_scale:g}_{args.score_bounds}"


def _searches(label: str, model: nn.Module, seconds: float, path: Path, args: argparse.Namespace, data: dict,
              ref: dict | None = None) -> dict:
    """Prune the trained ``model`` (weights at ``path``) by the threshold search and evaluate; cached beside it.

    With ``ref`` (the pretrained model's accuracies) the search runs a second time with the tolerance
    measured from the pretrained validation accuracy; its results are the row's ``common`` entry.
    """
    cached = path.with_name(f"{path.stem}_tol{args.tolerance:g}{score_suffix(args)}.json")

    def search() -> dict:
        res = threshold(model, args, data)
        print(label, res.summary(), flush=True)
        return dict(seconds=seconds, test_trained=evaluate(model, data["test_x"], data["test_y"]),
                    test_after=evaluate(res.model, data["test_x"], data["test_y"]), removed=res.n_removed,
                    total=len(res.norms), macs=(res.macs_before, res.macs_after),
                    params=(res.params_before, res.params_after), val=(res.accuracy_before, res.accuracy_after),
                    threshold=res.threshold, norms=res.norms.tolist(), search_seconds=res.seconds,
                    scores=res.scores.tolist())

    def common_search() -> dict:
        res = threshold(model, args, data, reference=ref["val"])
        print(label, "(common reference)", res.summary(), flush=True)
        return dict(removed=res.n_removed, macs=(res.macs_before, res.macs_after), val_after=res.accuracy_after,
                    within=res.within_tolerance, test_after=evaluate(res.model, data["test_x"], data["test_y"]),
                    threshold=res.threshold)

    row = _json_cached(cached, search)
    if ref is not None:
        row["common"] = _json_cached(cached.with_name(f"{cached.stem}_ref{ref['val']:.4f}.json"), common_search)
    return row


def _json_cached(path: Path, make: Callable[[], dict]) -> dict:
    """``make()``, stored as JSON at ``path`` on the first call and read back afterwards."""
    if path.exists():
        return json.loads(path.read_text())
    value = make()
    path.write_text(json.dumps(value))
    return value


def _reference(args: argparse.Namespace, data: dict) -> dict | None:
    """Validation and test accuracy of the pretrained, unpruned model (``--init pretrained``)."""
    if args.init == "scratch":
        return None
    model, _ = pretrained(args)
    return dict(val=evaluate(model, data["val_x"], data["val_y"]), test=evaluate(model, data["test_x"], data["test_y"]))


def runs(args: argparse.Namespace) -> list[tuple[str, str, dict]]:
    """``(label, method, options of trained())`` of every row the options ask for."""
    out = []
    for method in args.methods:
        if method == "spr":
            out += [(f"{LABELS[method]}{', relative' if rel else ''}{' (detached scale)' if det else ''}"
                     f"{', MACs-priced' if mp else ''}, alpha {a:g}, strength {v:g}, M scale {ms:g}"
                     + (", with consumer slices" if c else ""),
                     method, dict(alpha=a, lam=1 - a, strength=v, m_scale=ms, consumers=c, relative=rel,
                                  detach_scale=det, macs_priced=mp))
                    for a, v, ms, c, rel, det, mp in args.spr]
        elif method == "group_norm":
            out += [(f"{LABELS[method]}, reg {v:g}", method, dict(gn_reg=v)) for v in args.gn_reg]
        else:
            out.append((LABELS[method], method, {}))
    return out


def run_comparison(args: argparse.Namespace, data: dict, argv: list[str] | None) -> str:
    ref = _reference(args, data)
    curves = {label: _row(label, method, options, args, data, ref) for label, method, options in runs(args)}
    plot = f"{_base(args)}{args.tag}.png"
    report.plot_scores(curves, args, RESULTS / plot)
    return report.comparison_text(args, ref, [report.comparison_row(label, r, ref) for label, r in curves.items()],
                                  command=_command(argv), setting=_setting(args, data), plot=plot)


def run_tuning(args: argparse.Namespace, data: dict, argv: list[str] | None) -> str:
    ref = _reference(args, data)
    rows = []
    for alpha in args.grid_alpha:
        for strength in args.grid_strength:
            for m_scale in args.grid_m_scale:
                label = f"alpha {alpha:g} strength {strength:g} M scale {m_scale:g}"
                r = _row(label, "spr", dict(alpha=alpha, lam=1 - alpha, strength=strength, m_scale=m_scale),
                         args, data)
                rows.append(report.tuning_row(alpha, strength, m_scale, r, ref))
    return report.tuning_text(ref, rows, command=_command(argv), setting=_setting(args, data))


def _base(args: argparse.Namespace) -> str:
    """Output file stem: the from-scratch tables keep their old names."""
    return "perspective_training" + {"scratch": "", "pretrained": "_pretrained"}.get(args.init, "_clean")


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    data = load_data(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.tune:
        text, name = run_tuning(args, data, argv), f"{_base(args)}_tuning{args.tag}.md"
    else:
        text, name = run_comparison(args, data, argv), f"{_base(args)}{args.tag}.md"
    (RESULTS / name).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
