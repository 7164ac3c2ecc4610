"""Tables and plot of ``benchmarks/perspective_training.py``: rendering only, no training or search.

Each function takes the rows that script computed (dicts cached as JSON beside the trained weights) and
the parsed arguments, and returns markdown (or writes the PNG), so the committed tables regenerate
byte for byte from the cache.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SCORE_LABELS = {"norm": "norm", "relative_norm": "relative-norm", "optimal_y": "y*"}
_INIT_TITLES = {"scratch": "", "pretrained": " from pretrained",
                "pretrained-holdout": " from pretrained (validation held out)"}


def _common(r: dict, ref: dict) -> str:
    """Cells of the common-reference search: groups and MACs removed, val / test accuracy after."""
    c = r["common"]
    (mb, ma), total = c["macs"], r["total"]
    if not c["within"]:
        return (f"none: trained model {(ref['val'] - r['val'][0]) * 100:.2f} points below the reference "
                f"| - | {c['val_after']:.4f} | {c['test_after']:.4f} ")
    return (f"{c['removed']} / {total} ({c['removed'] / total:.1%}) | {1 - ma / mb:.1%} "
            f"| {c['val_after']:.4f} | {c['test_after']:.4f} ")


def drops(r: dict, ref: dict | None) -> str:
    """Accuracy drops (points, val / test) of the pruned model vs its own trained model and vs the pretrained one."""
    own = f"{(r['val'][0] - r['val'][1]) * 100:.2f} / {(r['test_trained'] - r['test_after']) * 100:.2f}"
    if ref is None:
        return own
    return f"{own} | {(ref['val'] - r['val'][1]) * 100:.2f} / {(ref['test'] - r['test_after']) * 100:.2f}"


def comparison_row(label: str, r: dict, ref: dict | None) -> str:
    """One method's line of the comparison table."""
    (mb, ma), (pb, pa), (vb, va) = r["macs"], r["params"], r["val"]
    return (f"| {label} | {r['seconds']:.0f} | {r['test_trained']:.4f} "
            f"| {r['removed']} / {r['total']} ({r['removed'] / r['total']:.1%}) "
            f"| {mb / 1e6:.2f} -> {ma / 1e6:.2f} ({1 - ma / mb:.1%}) | {pb:,} -> {pa:,} ({1 - pa / pb:.1%}) "
            f"| {vb:.4f} -> {va:.4f} | {r['test_after']:.4f} "
            + (f"| {drops(r, ref)} " if ref else "")
            + f"| {'-' if r['threshold'] is None else format(r['threshold'], '.3g')} "
            + (f"| {_common(r, ref)}" if ref else "") + "|")


def _parameters(args: argparse.Namespace, ref: dict | None) -> str:
    """The paragraph stating the regularisers, the threshold score and the two criteria."""
    params = ("SPR: loss + strength x SPR(alpha, lam = 1 - alpha, M = M scale x initial per-layer max |w|); "
              "group norm: GroupNormPruner(reg, GroupMagnitudeImportance(p=2), classifier ignored), "
              "`regularize(model)` after each backward.")
    if ref:
        params = params.replace("initial per-layer max |w|", "per-layer max |w| of the pretrained weights")
    if args.score == "optimal_y":
        params += (f" Threshold on SPR's relaxed indicator y* = min(1, max(max_i |w_i| / M_i, sqrt(alpha / lam) "
                   f"||w||)) with alpha {args.score_alpha:g}, lam {1 - args.score_alpha:g}, M = {args.score_m_scale:g} "
                   f"x per-layer max |w| of the {'starting' if args.score_bounds == 'start' else 'trained (pruned)'} weights, "
                   "the same rule for every method (not the norm).")
    if args.score == "relative_norm":
        params += (" Threshold on each group's norm divided by its layer's root-mean-square group norm (the same "
                   "rule for every method), not the raw norm.")
    if ref:
        params += (f" Pretrained, unpruned: val acc {ref['val']:.4f}, test acc {ref['test']:.4f}. Two criteria: "
                   "columns marked [own] come from the search whose 0.5-point tolerance is measured against each "
                   "method's own trained model (so a method that lost accuracy in training is allowed to lose more); "
                   f"columns marked [common] from a second search on the same trained model whose tolerance is "
                   f"measured against the pretrained model's validation accuracy {ref['val']:.4f} for every method "
                   f"(val acc after >= {ref['val'] - args.tolerance:.4f}): the fair comparison. A trained model "
                   "already below that floor can remove nothing under it.")
    return params


def comparison_text(args: argparse.Namespace, ref: dict | None, rows: list[str], *, command: str, setting: str,
                    plot: str) -> str:
    """The whole comparison table: title, command, setting, parameters, rows, notes and the plot."""
    head = ("| training | train s | test acc (trained) | [own] channel groups removed | [own] MACs M (removed) "
            "| [own] params (removed) | [own] val acc before -> after | [own] test acc after | ")
    rule = "|---|---|---|---|---|---|---|---|---|"
    if ref:
        head += "[own] drop vs own trained, points (val / test) | [own] drop vs pretrained, points (val / test) | "
        rule += "---|---|---|---|---|---|"
    return "\n".join([
        f"# Training with SPR vs no regulariser vs group-norm regulariser{' from a pretrained network' if ref else ''}"
        f", pruned by one {SCORE_LABELS[args.score]} threshold", "",
        f"Command: `{command}`", "", f"Setting: {setting}", "", _parameters(args, ref), "",
        head + "[own] threshold |" + (" [common] channel groups removed | [common] MACs removed "
                                      "| [common] val acc after | [common] test acc after |" if ref else ""),
        rule, *rows, "",
        "A channel group is one output channel of a root layer with everything removed with it (coupled "
        "residual convs, BatchNorm entries, consumer input slices); its norm is that of its filters and "
        "BatchNorm affine entries. The search keeps one channel per root layer. No fine-tuning. `train s` is "
        "wall time on a shared 2-core machine with other jobs (some runs overlapped): not a speed comparison.", "",
        f"![sorted group norms]({plot})", ""])


def plot_scores(curves: dict[str, dict], args: argparse.Namespace, path: Path) -> None:
    """Sorted threshold scores of every method (log scale), a dotted line where each search stopped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6))
    colors = plt.cm.tab20(np.linspace(0, 1, 20)) if len(curves) > 10 else [None] * len(curves)
    for (label, row), color in zip(curves.items(), colors):
        norms = np.sort(row.get("scores", row["norms"]))
        line, = ax.plot(np.arange(1, len(norms) + 1), np.maximum(norms, 1e-8), label=label, color=color)
        if row["threshold"] is not None:
            ax.axvline(row["removed"] + 0.5, color=line.get_color(), ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel(f"channel groups, sorted by {args.score} (dotted: removed up to here)")
    ax.set_ylabel({"norm": "group norm (filter + BN affine)",
                   "relative_norm": "group norm / layer's RMS group norm"}.get(
        args.score, f"SPR y* (alpha {args.score_alpha:g}, M scale {args.score_m_scale:g} of the {args.score_bounds} weights)"))
    ax.set_title(f"{args.model} on {args.dataset}, {args.epochs:g} epochs{_INIT_TITLES[args.init]}")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tuning_row(alpha: float, strength: float, m_scale: float, r: dict, ref: dict | None) -> str:
    """One grid point of the SPR tuning table."""
    (mb, ma), (vb, va) = r["macs"], r["val"]
    return (f"| {alpha:g} | {1 - alpha:g} | {strength:g} | {m_scale:g} | {r['seconds']:.0f} "
            f"| {vb:.4f} | {r['removed']} / {r['total']} | {1 - ma / mb:.1%} | {va:.4f} "
            + (f"| {r['test_trained']:.4f} | {r['test_after']:.4f} | {drops(r, ref)} " if ref else "")
            + "|")


def tuning_text(ref: dict | None, rows: list[str], *, command: str, setting: str) -> str:
    """The SPR parameter grid table."""
    head, rule = ("| alpha | lam | strength | M scale | train s | val acc | groups removed | MACs removed "
                  "| val acc after |"), "|---|---|---|---|---|---|---|---|---|"
    if ref:
        head += (" test acc | test acc after | drop vs own trained (val / test) | drop vs pretrained (val / test) |")
        rule += "---|---|---|---|"
    return "\n".join([
        "# SPR parameter grid", "", f"Command: `{command}`", "", f"Setting: {setting}", "",
        *([f"Pretrained, unpruned: val acc {ref['val']:.4f}, test acc {ref['test']:.4f}; drops in points.", ""]
          if ref else []),
        head, rule, *rows, ""])
