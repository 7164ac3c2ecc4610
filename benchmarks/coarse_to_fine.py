"""Coarse-to-fine semi-structured pruning of a small graph convolutional network (digits as 64-node grid graphs).

A :class:`orprune.c2f.GridGCN` (node features: intensity, row, column; GCN layers 3->32->32->16, a linear
classifier over the 64x16 node features) is trained on scikit-learn's 8x8 digits. At each budget (fraction of the
gated weights kept: the GCN layers after the first and the classifier) it is pruned by:

- ``magnitude, unstructured``: each layer keeps its largest ``|w|`` (reference: no channel removed);
- ``magnitude, semi-structured``: each layer keeps ``k_l`` input channels then ``K_l`` weights inside them by
  magnitude (:func:`orprune.select_hierarchical` on the identity-Gram problem of ``|W|``), no training;
- ``hierarchical MIP (data)``: the same counts, :func:`orprune.select_hierarchical` (greedy) on each layer's
  least-squares problem (inputs and pre-bias outputs of the dense model on the training set), refit weights;
- the same two ``+ fine-tune``: the masks fixed, ``E + F`` epochs of Adam on the task loss;
- ``c2f gating``: :func:`orprune.c2f.train_with_gating` (``E`` epochs of budget-penalised gated training from the
  dense model, hardening on the learned scores, ``F`` epochs of fine-tuning with the masks fixed);
- ``c2f gating, data hardening``: the same, with the learned counts ``k_l, K_l`` but each layer's mask and weights
  from the data hierarchical MIP on the trained (soft-gated) network's statistics.

Without training: ``K_l = round(rho * N_l)`` (largest remainders, exact total) and
``k_l = max(ceil(K_l / per-channel), round(sqrt(rho) * C_l))`` channels (half of the reduction, on a log scale,
from whole channels). The gating learns its own ``k_l`` and ``K_l``. Every mask keeps exactly
``round(rho * N)`` weights.

Run ``python -m benchmarks.coarse_to_fine``; writes ``benchmarks/results/coarse_to_fine.md``.
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from orprune import LayerProblem
from orprune.c2f import CoarseToFineGating, GridGCN, finetune_with_masks, split_budget, train_with_gating
from orprune.c2f.hardening import from_layout, harden_layer, weight_layout
from orprune.examples.datasets import load_digits
from orprune.training import evaluate

#: the input layer (3 -> 32, 96 weights) is never pruned: its inputs are (intensity, row, column), and the
#: per-layer least-squares objective would drop the intensity channel (the coordinates, the same for every
#: image, carry most of the output energy), which leaves a classifier at chance level
IGNORED = ["convs.0.linear"]


def train_dense(images, labels, epochs: int, seed: int) -> GridGCN:
    torch.manual_seed(seed)
    model = GridGCN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(labels), generator=generator).split(64):
            loss = F.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def layer_problems(model, names, images) -> dict[str, LayerProblem]:
    """Each gated layer's least-squares problem: its inputs X (rows: image x node) and pre-bias outputs X W^T."""
    modules = dict(model.named_modules())
    seen = {}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0].detach()))
             for n in names]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    problems = {}
    for name in names:
        x = seen[name].reshape(-1, seen[name].shape[-1]).double().numpy()
        w = modules[name].weight.detach().double().numpy()
        ridge = 1e-6 * np.trace(x.T @ x) / x.shape[1]
        problems[name] = LayerProblem.from_arrays(x, x @ w.T, ridge=ridge, weights=w.T)
    return problems


def fixed_counts(model, names, rho: float) -> tuple[dict, dict]:
    modules = dict(model.named_modules())
    sizes = np.array([modules[n].weight.numel() for n in names])
    entries = split_budget(int(round(rho * sizes.sum())), sizes.astype(float), sizes)
    groups = {}
    for name, k in zip(names, entries):
        out_features, channels = modules[name].weight.shape[:2]
        groups[name] = min(channels, max(math.ceil(k / out_features), round(math.sqrt(rho) * channels))) if k else 0
    return dict(zip(names, (int(k) for k in entries))), groups


def baseline_masks(model, names, rho, kind, problems):
    """Masks (weight layout) and, for ``data``, refit weights of the no-training methods."""
    modules = dict(model.named_modules())
    entries, groups = fixed_counts(model, names, rho)
    masks, weights = {}, {}
    for name in names:
        W = modules[name].weight.detach().double().numpy()
        scores = weight_layout(np.abs(W))
        if kind == "unstructured":
            flat = np.zeros(W.size, bool)
            flat[np.argsort(-np.abs(W).ravel(), kind="stable")[:entries[name]]] = True
            masks[name] = flat.reshape(W.shape)
            continue
        mask, _, refit, _ = harden_layer(scores, groups[name], entries[name], 1,
                                         problem=problems[name] if kind == "data" else None)
        masks[name] = from_layout(mask, W.shape)
        if refit is not None:
            weights[name] = from_layout(refit, W.shape)
    return masks, weights


def masked_model(model, masks, weights):
    pruned = copy.deepcopy(model)
    modules = dict(pruned.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            w = torch.as_tensor(weights[name], dtype=torch.float32) if name in weights else modules[name].weight
            modules[name].weight.copy_(w * torch.as_tensor(np.array(mask), dtype=torch.float32))
    return pruned


def channels_kept(masks) -> tuple[int, int]:
    kept = sum(int(np.any(m != 0, axis=0).sum()) for m in masks.values())
    return kept, sum(m.shape[1] for m in masks.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.1, 0.05])
    parser.add_argument("--dense-epochs", type=int, default=40)
    parser.add_argument("--gate-epochs", type=float, default=10, help="E: gated training epochs")
    parser.add_argument("--finetune-epochs", type=float, default=5, help="F: fine-tuning epochs after hardening")
    parser.add_argument("--strength", type=float, default=100.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "coarse_to_fine.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    threadpool_limits(1)
    train_x, train_y = load_digits("train")
    test_x, test_y = load_digits("test")
    cpu = time.process_time()
    model = train_dense(train_x, train_y, args.dense_epochs, seed=0)
    dense_cpu = time.process_time() - cpu
    base = evaluate(model, test_x, test_y)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in IGNORED]
    cpu = time.process_time()
    problems = layer_problems(model, names, train_x)
    stats_cpu = time.process_time() - cpu
    print(f"dense {base:.4f}, statistics {stats_cpu:.1f} s", flush=True)
    longer = []  # the dense model trained E + F more epochs (what the trained rows add), no pruning
    for seed in args.seeds:
        tuned = copy.deepcopy(model)
        gating = CoarseToFineGating(tuned, 1.0, ignored_layers=IGNORED)
        gating.fix_masks({n: np.ones(tuple(gating.raw_weight(n).shape)) for n in gating.layer_names})
        finetune_with_masks(tuned, gating, train_x, train_y, epochs=args.gate_epochs + args.finetune_epochs, seed=seed)
        longer.append(evaluate(tuned, test_x, test_y))
    rows = []
    for rho in args.budgets:
        for kind, label in (("unstructured", "magnitude, unstructured"), ("scores", "magnitude, semi-structured"),
                            ("data", "hierarchical MIP (data)")):
            cpu = time.process_time()
            masks, weights = baseline_masks(model, names, rho, kind, problems)
            seconds = time.process_time() - cpu
            pruned = masked_model(model, masks, weights)
            rows.append(row(rho, label, [evaluate(pruned, test_x, test_y)], masks, [seconds]))
            print(rows[-1], flush=True)
            if kind == "unstructured":
                continue
            accs, times = [], []
            for seed in args.seeds:
                cpu = time.process_time()
                tuned = copy.deepcopy(masked_model(model, masks, weights))
                gating = CoarseToFineGating(tuned, rho, ignored_layers=IGNORED)
                gating.fix_masks(masks)
                finetune_with_masks(tuned, gating, train_x, train_y, epochs=args.gate_epochs + args.finetune_epochs,
                                    seed=seed)
                times.append(seconds + time.process_time() - cpu)
                accs.append(evaluate(tuned, test_x, test_y))
            rows.append(row(rho, label + " + fine-tune", accs, masks, times))
            print(rows[-1], flush=True)
        for data, label in ((False, "c2f gating (trained)"), (True, "c2f gating, data hardening (trained)")):
            accs, times, learned = [], [], None
            for seed in args.seeds:
                torch.manual_seed(seed)
                result = train_with_gating(
                    model, train_x, train_y, target=rho, epochs=args.gate_epochs, finetune_epochs=args.finetune_epochs,
                    strength=args.strength, seed=seed, ignored_layers=IGNORED,
                    problems=(lambda gated: layer_problems(gated, names, train_x)) if data else None)
                assert result.masks.kept == round(rho * result.masks.total)
                accs.append(evaluate(result.model, test_x, test_y))
                times.append(result.cpu_seconds)
                learned = learned or result
            rows.append(row(rho, label, accs, learned.masks.masks, times, soft=learned.soft_kept_fraction))
            print(rows[-1], flush=True)
    write(args, base, longer, dense_cpu, stats_cpu, rows, model, names)


def row(rho, method, accs, masks, times, soft=None) -> dict:
    kept, total = channels_kept(masks)
    weights = sum(int(np.count_nonzero(m)) for m in masks.values())
    return {"rho": rho, "method": method, "acc": accs, "channels": f"{kept}/{total}", "weights": weights,
            "cpu": float(np.mean(times)), "soft": soft}


def write(args, base, longer, dense_cpu, stats_cpu, rows, model, names) -> None:
    command = " ".join(["python -m benchmarks.coarse_to_fine", *sys.argv[1:]])
    modules = dict(model.named_modules())
    total = sum(modules[n].weight.numel() for n in names)
    shapes = ", ".join(f"{n} {tuple(modules[n].weight.shape[::-1])}" for n in names)
    lines = [
        "# Coarse-to-fine semi-structured pruning of a grid-graph GCN (digits)",
        "",
        f"Generated by `{command}` (torch {torch.__version__}, Python {platform.python_version()}, one thread, "
        "shared 2-core machine; CPU seconds from `time.process_time()`).",
        "",
        f"Dense GridGCN: test accuracy {base:.4f} after {args.dense_epochs} epochs of Adam ({dense_cpu:.1f} CPU s). "
        f"The same trained E + F more epochs without pruning (what the trained rows add): {np.mean(longer):.4f} "
        f"[{min(longer):.4f}-{max(longer):.4f}]. Gated layers (in, out): {shapes}; {total} weights. Layer statistics for the data MIP: {stats_cpu:.1f} CPU s. "
        f"Trained rows: mean accuracy over seeds {args.seeds} (min-max in brackets), E = {args.gate_epochs:g} gated "
        f"epochs, F = {args.finetune_epochs:g} fine-tuning epochs, penalty strength {args.strength:g}; the "
        "fine-tuned baselines train E + F epochs with their masks fixed. `weights`: kept weights (exactly "
        "round(rho N)); `channels`: input channels with a kept weight, summed over the gated layers (the c2f "
        "row: of seed 0). CPU s: per run (mask selection, or training + hardening + fine-tuning).",
        "",
        "| kept fraction | method | test acc. | weights | channels | CPU s |",
        "|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        accs = r["acc"]
        acc = f"{np.mean(accs):.4f}" + (f" [{min(accs):.4f}-{max(accs):.4f}]" if len(accs) > 1 else "")
        lines.append(f"| {r['rho']:g} | {r['method']} | {acc} | {r['weights']} | {r['channels']} | {r['cpu']:.2f} |")
    soft = [f"{r['rho']:g}: {r['soft']:.4f}" for r in rows if r["method"] == "c2f gating (trained)"]
    lines += ["", "Soft kept fraction of the gates at the end of gated training (seed 0), before hardening: "
              + ", ".join(soft) + "."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
