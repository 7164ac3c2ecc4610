"""Architecture adapters: the attention-head and MLP-neuron units of each transformer block.

A unit is a set of output rows of some projections (its "rows": q/k/v, gate/up, fc1) and a set of
input columns of one projection (its "columns": o_proj, down_proj, fc2). Channel ``c`` of a unit
owns, in every row block ``(module, offset, size)``, the rows ``offset + c*size + [0, size)``, and
in the output projection the input columns ``c*g + [0, g)`` with ``g`` the group size.

Recognised blocks (read from the installed Hugging Face modeling code):

* LLaMA / Mistral / Qwen style: ``q_proj, k_proj, v_proj, o_proj`` Linear; one channel per key/value
  head, together with the ``num_attention_heads // num_key_value_heads`` query heads that share it
  (``repeat_kv`` maps query head ``h`` to kv head ``h // n_rep``, so they are contiguous); gated MLP
  ``gate_proj, up_proj, down_proj``.
* GPT-2: fused ``c_attn`` Conv1D (weight ``(in, out)``, outputs ``[q | k | v]``), ``c_proj``; MLP
  ``c_fc, c_proj``.
* BERT / ViT: ``attention.self.{query,key,value}`` (ViT: ``attention.attention``) and
  ``attention.output.dense``; MLP ``intermediate.dense, output.dense`` (ViT in transformers 5:
  ``mlp.fc1, mlp.fc2``).
* Plain torch: :class:`~orprune.transformer.torch_attention.SplitMultiheadAttention` (what
  :func:`~orprune.transformer.torch_attention.split_attention` turns ``nn.MultiheadAttention`` into),
  ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` MLPs (``linear1, linear2``), and
  hand-written modules following the LLaMA names: an attention module with Linear children
  ``q_proj, k_proj, v_proj, o_proj`` and an integer ``head_dim`` attribute (its ``num_heads`` /
  ``num_key_value_heads`` integer attributes, if any, follow the pruning; its forward must reshape
  with them or with ``-1``), and an MLP whose module has Linear children ``fc1, fc2`` with
  ``fc2(act(fc1(x)))`` for an elementwise ``act``.

The residual width is never pruned. See ``formulations/transformer_units.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from orprune.transformer.torch_attention import SplitMultiheadAttention

__all__ = ["TransformerUnit", "find_units", "weight_out_in", "is_conv1d"]

HEADS, NEURONS = "heads", "neurons"


@dataclass(frozen=True)
class TransformerUnit:
    """One prunable unit of a block: its attention heads or its MLP neurons.

    Attributes
    ----------
    name : str
        ``"<block path>.heads"`` or ``"<block path>.neurons"`` (unique in the model).
    kind : {"heads", "neurons"}
    rows : tuple of (module name, offset, rows per channel)
        Output rows that channel ``c`` owns: ``offset + c*size + [0, size)``.
    out : str
        The projection whose input columns ``c*group_size + [0, group_size)`` channel ``c`` feeds.
    n_channels : int
        Key/value heads (attention) or neurons (MLP).
    group_size : int
        Columns of ``out`` per channel (``heads_per_kv * head_dim``, or 1).
    attention : str or None
        The attention module whose head-count attributes follow the pruning.
    heads_per_channel : int
        Query heads per channel (1 for neurons).
    head_dim : int
    """

    name: str
    kind: str
    rows: tuple[tuple[str, int, int], ...]
    out: str
    n_channels: int
    group_size: int
    attention: str | None = None
    heads_per_channel: int = 1
    head_dim: int = 1


def is_conv1d(module: nn.Module) -> bool:
    """A Hugging Face ``Conv1D`` (GPT-2): ``y = x W + b`` with ``W`` of shape ``(in, out)``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as ``(out_features, in_features)`` for Linear and Conv1D alike."""
    return module.weight.T if is_conv1d(module) else module.weight


def _features(module: nn.Module) -> tuple[int, int]:
    out, inp = weight_out_in(module).shape
    return int(inp), int(out)


def _is_projection(module: object) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Module) and is_conv1d(module))


def _heads_unit(prefix: str, attention: str, q: str, k: str, v: str, out: str, n_heads: int, n_kv: int,
                head_dim: int, fused: bool = False) -> TransformerUnit:
    if n_heads % n_kv:
        raise ValueError(f"{attention}: {n_heads} query heads do not split into {n_kv} key/value heads.")
    rep = n_heads // n_kv
    if fused:  # GPT-2: one module, outputs [q | k | v] each n_heads*head_dim wide
        width = n_heads * head_dim
        rows = ((q, 0, rep * head_dim), (q, width, head_dim), (q, 2 * width, head_dim))
    else:
        rows = ((q, 0, rep * head_dim), (k, 0, head_dim), (v, 0, head_dim))
    return TransformerUnit(name=f"{prefix}.heads", kind=HEADS, rows=rows, out=out, n_channels=n_kv,
                           group_size=rep * head_dim, attention=attention, heads_per_channel=rep,
                           head_dim=head_dim)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _attention(name: str, module: nn.Module) -> TransformerUnit | None:
    children = dict(module.named_children())
    if isinstance(module, SplitMultiheadAttention):  # plain torch (nn.MultiheadAttention, split)
        return _heads_unit(name, name, *(_join(name, p) for p in ("q_proj", "k_proj", "v_proj", "out_proj")),
                           module.num_heads, module.num_heads, module.head_dim)
    if all(_is_projection(children.get(p)) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        head_dim = int(getattr(module, "head_dim", 0))
        if head_dim <= 0:
            return None
        n_heads = _features(children["q_proj"])[1] // head_dim
        n_kv = _features(children["k_proj"])[1] // head_dim
        return _heads_unit(name, name, *(_join(name, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
                           n_heads, n_kv, head_dim)
    if (_is_projection(children.get("c_attn")) and _is_projection(children.get("c_proj"))
            and hasattr(module, "head_dim") and not getattr(module, "is_cross_attention", False)):
        head_dim = int(module.head_dim)
        n_heads = _features(children["c_attn"])[1] // (3 * head_dim)
        c_attn = _join(name, "c_attn")
        return _heads_unit(name, name, c_attn, c_attn, c_attn, _join(name, "c_proj"), n_heads, n_heads,
                           head_dim, fused=True)
    output = children.get("output")
    for child_name in ("self", "attention"):  # BERT: attention.self; ViT: attention.attention
        inner = children.get(child_name)
        if (inner is not None and output is not None and _is_projection(getattr(output, "dense", None))
                and all(_is_projection(getattr(inner, p, None)) for p in ("query", "key", "value"))
                and hasattr(inner, "attention_head_size")):
            head_dim = int(inner.attention_head_size)
            n_heads = _features(inner.query)[1] // head_dim
            base = _join(name, child_name)
            return _heads_unit(name, base, _join(base, "query"), _join(base, "key"), _join(base, "value"),
                               _join(name, "output", "dense"), n_heads, n_heads, head_dim)
    return None


def _mlp(name: str, module: nn.Module) -> TransformerUnit | None:
    children = dict(module.named_children())
    if all(_is_projection(children.get(p)) for p in ("gate_proj", "up_proj", "down_proj")):
        rows, out = ("gate_proj", "up_proj"), "down_proj"
    elif _is_projection(children.get("c_fc")) and _is_projection(children.get("c_proj")):
        rows, out = ("c_fc",), "c_proj"
    elif _is_projection(children.get("fc1")) and _is_projection(children.get("fc2")):  # ViT (transformers 5)
        rows, out = ("fc1",), "fc2"
    elif (isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
          and _is_projection(children.get("linear1")) and _is_projection(children.get("linear2"))):
        rows, out = ("linear1",), "linear2"
    elif (_is_projection(getattr(children.get("intermediate"), "dense", None))
          and _is_projection(getattr(children.get("output"), "dense", None))
          and "attention" in children):  # BERT / ViT layer
        rows, out = ("intermediate.dense",), "output.dense"
    else:
        return None
    width = _features(module.get_submodule(out))[0]
    return TransformerUnit(name=f"{name}.neurons", kind=NEURONS, rows=tuple((_join(name, r), 0, 1) for r in rows),
                           out=_join(name, out), n_channels=width, group_size=1)


def find_units(model: nn.Module) -> list[TransformerUnit]:
    """Every attention-head and MLP-neuron unit of ``model``, in the order of their output projections.

    Raises
    ------
    ValueError
        ``model`` holds no recognised block, or a unit's projections disagree in shape.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    packed = [name or "model" for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if packed:
        raise ValueError(f"`model` holds nn.MultiheadAttention ({', '.join(packed[:3])}), whose packed weights "
                         "cannot hold fewer heads: call `orprune.transformer.split_attention(model)` first "
                         "(TransformerPruner does it on its copy).")
    units = []
    for name, module in model.named_modules():
        for unit in (_attention(name, module), _mlp(name, module)):
            if unit is not None:
                _check(model, unit)
                units.append(unit)
    # forward order (the sequential refit depends on it): a BERT layer is listed before its own
    # attention module, but its output projection comes after the attention's
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}
    units.sort(key=lambda u: position[u.out])
    if not units:
        raise ValueError(
            f"`model` ({type(model).__name__}) holds no recognised transformer block: orprune knows "
            "LLaMA-style (q/k/v/o_proj, gate/up/down_proj), GPT-2 (c_attn, c_proj, c_fc), BERT/ViT "
            "(query/key/value, attention.output.dense, intermediate.dense, output.dense) and plain torch "
            "(nn.MultiheadAttention after split_attention, nn.TransformerEncoderLayer's linear1/linear2, fc1/fc2)."
        )
    return units


def _check(model: nn.Module, unit: TransformerUnit) -> None:
    for module_name, offset, size in unit.rows:
        n_out = _features(model.get_submodule(module_name))[1]
        if offset + unit.n_channels * size > n_out:
            raise ValueError(f"{unit.name}: {module_name} has {n_out} outputs, fewer than "
                             f"{unit.n_channels} channels x {size} rows from offset {offset}.")
    n_in = _features(model.get_submodule(unit.out))[0]
    if n_in != unit.n_channels * unit.group_size:
        raise ValueError(f"{unit.name}: {unit.out} has {n_in} inputs, not {unit.n_channels} x {unit.group_size}.")
