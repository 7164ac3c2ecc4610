"""Heads and neurons of a small LLaMA-style byte-level LM: orprune vs magnitude / Wanda-sp / FLAP / Taylor.

Trains (once, cached under ``benchmarks/cache/``) a ``LlamaForCausalLM`` from a small config (4 layers,
d=128, 4 query heads sharing 2 key/value heads, gated MLP) on the Python standard library's own
sources read from this machine, byte-level tokens, on one thread for ``--train-seconds``; then
removes 20 / 30 / 50% of the params without fine-tuning and reports held-out perplexity of every
method at the same params budget, in one run. Writes ``benchmarks/results/transformers.md``.

Run ``python -m benchmarks.transformers`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import CACHE_DIR, RESULTS_DIR, _key, machine
from orprune.transformer import TransformerPruner

HEADS_AND_MLP, MLP_ONLY = ("heads", "neurons"), ("neurons",)
#: (label, TransformerPruner options, method, which units shrink). The baselines' common keep ratio
#: takes one of the two key/value groups of every layer at 20% already, so they also run on the MLP only.
METHODS = [("orprune greedy", dict(solver="greedy"), "orprune", HEADS_AND_MLP),
           ("orprune greedy + swap", dict(solver="greedy", swap=True), "orprune", HEADS_AND_MLP),
           ("orprune greedy, sequential refit", dict(solver="greedy", sequential=True), "orprune", HEADS_AND_MLP),
           ("magnitude", {}, "magnitude", HEADS_AND_MLP), ("Wanda-sp", {}, "wanda_sp", HEADS_AND_MLP),
           ("FLAP", {}, "flap", HEADS_AND_MLP), ("Taylor (LLM-Pruner)", {}, "taylor", HEADS_AND_MLP),
           ("magnitude, MLP only", {}, "magnitude", MLP_ONLY), ("Wanda-sp, MLP only", {}, "wanda_sp", MLP_ONLY),
           ("FLAP, MLP only", {}, "flap", MLP_ONLY), ("Taylor, MLP only", {}, "taylor", MLP_ONLY)]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--train-seconds", type=float, default=300.0,
                        help="training CPU time (process time, one thread: wall time varies on a shared machine)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens (bytes) per sequence")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate (cosine decay)")
    parser.add_argument("--corpus-mb", type=float, default=8.0, help="megabytes of standard library sources")
    parser.add_argument("--calibration", type=int, default=64, help="calibration sequences (from training text)")
    parser.add_argument("--eval", type=int, default=256, help="held-out sequences for perplexity")
    parser.add_argument("--swap-time", type=float, default=30.0, help="seconds of swap search per unit")
    parser.add_argument("--removed", type=float, nargs="+", default=[0.2, 0.3, 0.5],
                        help="fractions of all params to remove")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "transformers.md")
    return parser.parse_args(argv)


def corpus(megabytes: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Bytes of the standard library's ``.py`` files in sorted order; the last tenth of the files
    (by path) is held out. Returns (train bytes, held-out bytes, number of files)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    chunks, total = [], 0
    for path in files:
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= megabytes * 2**20:
            break
    split = int(0.9 * len(chunks))
    as_array = lambda parts: np.frombuffer(b"\n".join(parts), dtype=np.uint8).astype(np.int64)  # noqa: E731
    return as_array(chunks[:split]), as_array(chunks[split:]), len(chunks)


def sequences(data: np.ndarray, count: int, seq_len: int, seed: int) -> torch.Tensor:
    starts = np.random.default_rng(seed).integers(0, data.size - seq_len - 1, size=count)
    return torch.as_tensor(np.stack([data[s : s + seq_len] for s in starts]))


def build(seed: int, seq_len: int):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq_len,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def trained(args: argparse.Namespace, train_data: np.ndarray) -> tuple[torch.nn.Module, dict]:
    key = _key(cpu_seconds=args.train_seconds, seq=args.seq_len, batch=args.batch_size, lr=args.lr, mb=args.corpus_mb,
               seed=args.seed)
    path = CACHE_DIR / f"llama_bytes_{key}.pt"
    model = build(args.seed, args.seq_len)
    if path.exists():
        saved = torch.load(path, map_location="cpu")
        model.load_state_dict(saved["state_dict"])
        return model.eval(), saved["meta"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    rng = np.random.default_rng(args.seed)
    start, cpu_start, steps = time.perf_counter(), time.process_time(), 0
    model.train()
    while (elapsed := time.process_time() - cpu_start) < args.train_seconds:
        fraction = elapsed / args.train_seconds
        lr = args.lr * min(1.0, 20 * fraction) * 0.5 * (1 + math.cos(math.pi * fraction))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = sequences(train_data, args.batch_size, args.seq_len + 1, int(rng.integers(2**31)))
        logits = model(batch[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        steps += 1
    meta = {"steps": steps, "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start,
            "last_loss": float(loss.detach())}
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "meta": meta}, path)
    return model.eval(), meta


@torch.no_grad()
def perplexity(model: torch.nn.Module, data: torch.Tensor, batch_size: int = 32) -> float:
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        batch = data[i : i + batch_size]
        logits = model(batch[:, :-1]).logits
        total += float(F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1), reduction="sum"))
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(1)
    train_data, held_out, n_files = corpus(args.corpus_mb)
    model, meta = trained(args, train_data)
    print(f"trained: {meta}", flush=True)
    calibration = sequences(train_data, args.calibration, args.seq_len, args.seed + 1)
    evaluation = sequences(held_out, args.eval, args.seq_len + 1, args.seed + 2)
    calibration_batches = list(calibration.split(16))
    dense = perplexity(model, evaluation)
    print(f"dense perplexity {dense:.3f}", flush=True)
    rows: dict[str, dict[float, tuple[float, int, float, float]]] = {}
    fitted: dict[str, tuple[TransformerPruner, float, float]] = {}
    for label, options, method, kinds in METHODS:
        if options.get("swap"):
            options = dict(options, swap_time=args.swap_time)
        key = repr(sorted(options.items()))
        if key not in fitted:
            start, cpu = time.perf_counter(), time.process_time()
            pruner = TransformerPruner(**options).fit(model, calibration_batches)
            fitted[key] = (pruner, time.perf_counter() - start, time.process_time() - cpu)
            print(f"fit {label}: {fitted[key][1]:.1f} s", flush=True)
        pruner, fit_wall, fit_cpu = fitted[key]
        rows[label] = {}
        for removed in args.removed:
            start, cpu = time.perf_counter(), time.process_time()
            result = pruner.prune(params=1 - removed, method=method, seq_len=args.seq_len, kinds=kinds)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            if method == "orprune":  # the error curves belong to the method's cost
                wall, cpu = wall + fit_wall, cpu + fit_cpu
            ppl = perplexity(result.model, evaluation)
            rows[label][removed] = (ppl, result.params_after, wall, cpu)
            widths = [r.channels_after for r in result.report]
            print(f"{label} removed {removed:.0%}: ppl {ppl:.3f}, params {result.params_after}, widths {widths}",
                  flush=True)
    params = sum(p.numel() for p in model.parameters())
    ranks = effective_ranks(next(iter(fitted.values()))[0])
    args.out.write_text(report(args, argv, dense, params, meta, n_files, train_data.size, held_out.size, rows,
                               ranks))
    print(args.out.read_text())


def effective_ranks(pruner: TransformerPruner, energy: float = 0.999) -> dict[str, int]:
    """Per unit, how many eigen-directions of the output projection's input Gram matrix hold
    ``energy`` of its trace: a low count is why few channels can reconstruct the output."""
    out = {}
    for unit in pruner.units_:
        eig = np.sort(np.linalg.eigvalsh(pruner.statistics_[unit.name].statistics()[0]))[::-1]
        out[unit.name] = int(np.searchsorted(np.cumsum(eig) / eig.sum(), energy) + 1)
    return out


def report(args, argv, dense, params, meta, n_files, n_train, n_held, rows, ranks) -> str:
    command = "python -m benchmarks.transformers" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    lines = [
        "# Heads and neurons of a small LLaMA-style LM: orprune vs magnitude / Wanda-sp / FLAP / Taylor",
        "",
        f"Produced by `{command}` on {date.today().isoformat()} ({machine()}, 1 torch thread).",
        "",
        f"Model: LlamaForCausalLM, 4 layers, d=128, 4 query heads / 2 key-value heads (head_dim 32), gated MLP of "
        f"352, byte vocabulary; {params:,} params. Trained {meta['cpu_seconds']:.0f} s CPU ({meta['seconds']:.0f} s wall, "
        f"{meta['steps']} AdamW steps, "
        f"batch {args.batch_size} x {args.seq_len} bytes) on the first {n_files} standard-library `.py` files "
        f"({n_train:,} bytes; the last tenth of those files, {n_held:,} bytes, held out). No fine-tuning after "
        f"pruning. Calibration: {args.calibration} training sequences of {args.seq_len} bytes; perplexity on "
        f"{args.eval} held-out sequences. Budgets are fractions of *all* params (embeddings and head included); "
        f"every method meets the same budget (FLAP's bias compensation adds an output bias of 128 per "
        f"projection, not counted). Taylor: LLM-Pruner's first-order |w * dL/dw| per head group / neuron, the "
        f"next-token loss differentiated on the calibration sequences. Time: pruning at that budget, wall / CPU "
        f"seconds, orprune's including its one-off fit (calibration and error curves).",
        "",
        f"Dense perplexity: {dense:.4f}.",
        "",
        "| method | " + " | ".join(f"{r:.0%} removed: ppl (increase) | time s (CPU)" for r in args.removed) + " |",
        "|---|" + "---|---|" * len(args.removed),
    ]
    for label, by_ratio in rows.items():
        cells = [f"{ppl:.4f} ({ppl - dense:+.4f}) | {wall:.1f} ({cpu:.1f})"
                 for ppl, _, wall, cpu in (by_ratio[r] for r in args.removed)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    baselines = [label for label in rows if not label.startswith("orprune")]
    lines += ["", "Perplexity increase of orprune (greedy) over the best baseline's, per budget:", ""]
    for r in args.removed:
        best = min(baselines, key=lambda b: rows[b][r][0])
        ours = rows["orprune greedy"][r][0] - dense
        theirs = rows[best][r][0] - dense
        ratio = f"ratio {ours / theirs:.3f}" if theirs > 0 else "no ratio (the baseline does not increase it)"
        lines.append(f"- {r:.0%} removed: {ours:+.4f} vs {theirs:+.4f} ({best}): {ratio}")
    lines += ["", "Directions of each output projection's input (uncentred Gram matrix of the calibration tokens) "
              "that hold 99.9% of its energy, of 128 (attention) / 352 (MLP) columns: "
              + ", ".join(f"{name.removeprefix('model.layers.')}: {k}" for name, k in ranks.items()) + "."]
    lines += ["", "Params after pruning: " + ", ".join(
        f"{r:.0%}: {rows['orprune greedy'][r][1]:,}" for r in args.removed) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
