"""Tracing a model into torch-pruning's ``DependencyGraph`` (eval mode, flags restored), also where torch-pruning's
own index mapping divides by zero (ShuffleNetV2 stages of several stride-1 blocks).

torch-pruning 1.6 infers a split feeding a concatenation as one part wide; two stride-1 ShuffleNetV2 blocks in a
row make that zero, and the channel shuffle's reshape then computes ``in // 0`` in
``index_mapping.update_reshape_index_mapping``, both in ``build_dependency`` and again in every
``get_pruning_group``. On that error :func:`build_dependency_graph` redoes the mapping without index maps for the
splits and the shuffles' reshapes (which it marks element-wise in this graph, so the later calls skip them) and
records them in ``dg.unsized_reshapes``. No group through them is cut by torch-pruning's maps:
:func:`orprune.network.graph.find_groups` hands every such group to orprune's label maps
(:mod:`orprune.network.label_maps`), which replay the recorded ops. Graphs torch-pruning builds are untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.ops import OPTYPE

__all__ = ["build_dependency_graph", "call_model"]


def call_model(model: nn.Module, example_inputs: Any) -> Any:
    """Run ``model`` the way torch-pruning does: a dict as keywords, a tuple / list as positional
    arguments, anything else as the single argument."""
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def build_dependency_graph(
    model: nn.Module,
    example_inputs: Any,
    *,
    during_forward: Callable[[nn.Module], Any] | None = None,
) -> tuple[tp.DependencyGraph, Any]:
    """torch-pruning's ``DependencyGraph`` of ``model``, traced in eval mode.

    The training flag of every module is restored afterwards and nothing else in the model changes.
    ``during_forward(model)``, if given, is entered as a context manager around the traced forward
    (to record hooks in the same pass); the function returns the graph and the model's output.
    """
    modes = {m: m.training for m in model.modules()}
    outputs: list[Any] = []

    def forward(m: nn.Module, inputs: Any) -> Any:
        if during_forward is None:
            out = call_model(m, inputs)
        else:
            with during_forward(m):
                out = call_model(m, inputs)
        outputs.append(out)
        return out

    dg = tp.DependencyGraph()
    dg.unsized_reshapes = set()  # grad_fns of reshapes left without an index map (see _map_indices_skipping)
    try:
        with torch.enable_grad():
            dg.build_dependency(model, example_inputs=example_inputs, forward_fn=forward, verbose=False)
    except ZeroDivisionError:
        if not getattr(dg, "module2node", None):
            raise
        _map_indices_skipping(dg)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return dg, outputs[0]


def _map_indices_skipping(dg: tp.DependencyGraph) -> None:
    """torch-pruning 1.6's last build step (``index_mapping.update_index_mapping``) again, node by node, leaving
    out the reshapes whose channel counts it infers as zero (it divides by them: two ShuffleNetV2 stride-1 blocks
    in a row). Those reshapes are marked element-wise in this graph (torch-pruning maps every later group again and
    would divide again; element-wise is what a reshape without an index map does) and recorded in
    ``dg.unsized_reshapes``: a group through one is traced by orprune (a channel shuffle,
    ``orprune.network.label_maps``) or left alone with the reason."""
    from torch_pruning.dependency import index_mapping

    updates = {OPTYPE.CONCAT: index_mapping.update_concat_index_mapping,
               OPTYPE.SPLIT: index_mapping.update_split_index_mapping,
               OPTYPE.RESHAPE: index_mapping.update_reshape_index_mapping,
               OPTYPE.UNBIND: index_mapping.update_unbind_index_mapping,
               OPTYPE.EXPAND: index_mapping.update_expand_index_mapping,
               OPTYPE.SLICE: index_mapping.update_slice_index_mapping}

    def unmapped(node: Any) -> bool:
        """A split (its offsets come from the same failed inference) or a reshape of a channel shuffle (mapped as
        a flatten, whose index sets then grow at every block)."""
        near = [n.grad_fn for n in (*node.inputs, *node.outputs)]
        return node.type == OPTYPE.SPLIT or (node.type == OPTYPE.RESHAPE and any(
            type(f).__name__ in ("TransposeBackward0", "CloneBackward0") for f in near))

    for node in dg.module2node.values():
        if unmapped(node):
            node.enable_index_mapping = False
            for dep in list(node.dependencies) + [d for n in (*node.inputs, *node.outputs) for d in n.dependencies
                                                  if d.target is node]:
                dep.index_mapping[0] = None
            dg.unsized_reshapes.add(node.grad_fn)
            if node.type == OPTYPE.RESHAPE:
                node.type = OPTYPE.ELEMENTWISE
            continue
        update = updates.get(node.type)
        if update is None:
            continue
        try:
            update(dg, node)
        except ZeroDivisionError:
            dg.unsized_reshapes.add(node.grad_fn)
            node.type = OPTYPE.ELEMENTWISE
