"""The stages of a residual network: units whose consumers all write into one residual stream.

UCP (Chang et al., 2020) prunes every basic block of a ResNet stage to one width. In orprune's graph a
basic block's inner unit (``conv1``'s output channels) has one consumer, ``conv2``, whose output joins the
stage's residual stream (a unit tied through the adds, or a group left alone with ``residual=False``):
the inner units of one stage are the units whose consumers all produce the same stream.
:func:`stage_ties` finds those groups for :class:`orprune.AllocationProblem`'s ``ties``
(``formulations/ucp.md``).
"""

from __future__ import annotations

from orprune.network.units import PruningGraph

__all__ = ["stage_ties"]


def _owner(graph: PruningGraph, module: str) -> str | None:
    """The unit or excluded group whose output channels ``module`` produces or carries, if any."""
    for unit in graph.units:
        if module == unit.root or module in unit.carried:
            return "unit:" + unit.name
    for group in graph.excluded:
        if module == group.root or module in group.modules:
            return "excluded:" + group.root
    return None


def stage_ties(graph: PruningGraph) -> list[tuple[str, ...]]:
    """Groups of units that share one residual stream and one width: a stage's blocks.

    A unit joins the group of stream ``s`` when every one of its consumers produces (or is sliced
    along with) the channels of ``s``, and the group holds only units of the same width; groups of
    one unit are left out. On a basic-block ResNet these are the inner units of each stage; on a
    plain chain (VGG) every unit feeds a different tensor and nothing is tied.

    Parameters
    ----------
    graph : PruningGraph
        From :func:`orprune.find_groups` (or a fitted ``Pruner.graph_``).

    Returns
    -------
    list of tuple of str
        Unit names per group, in the graph's order.
    """
    if not isinstance(graph, PruningGraph):
        raise ValueError(f"`graph` must be a PruningGraph, got {type(graph).__name__}.")
    groups: dict[tuple[str, int], list[str]] = {}
    for unit in graph.units:
        owners = {_owner(graph, c.name) for c in unit.consumers}
        if len(owners) != 1 or None in owners or owners == {"unit:" + unit.name}:
            continue
        groups.setdefault((owners.pop(), unit.n_channels), []).append(unit.name)
    return [tuple(names) for names in groups.values() if len(names) > 1]
