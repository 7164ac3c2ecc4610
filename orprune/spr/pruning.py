"""After training with the Structured Perspective Regularization: threshold, remove, fine-tune.

SPR drives whole channel groups towards zero norm; which of them to remove is then decided by one
norm threshold, the largest one whose removal costs at most ``tolerance`` of held-out accuracy.
The search, and why it is monotone in the tolerance, is derived in
``formulations/perspective_regularizer.md`` section 8.
"""

from __future__ import annotations

import copy
import math
import numbers
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from orprune.network.costs import count_macs_params
from orprune.network.graph import build_dependency_graph
from orprune.spr.groups import _param_slices
from orprune.spr.regularizer import PerspectiveRegularizer
from orprune.training import evaluate

__all__ = ["SCORES", "ThresholdPruning", "prune_by_threshold"]

# Accuracies are ratios of counts; this absorbs the rounding of `base - tolerance`.
_EPS = 1e-12
#: Threshold scores: name -> the PerspectiveRegularizer method giving them.
SCORES = {"norm": "group_norms", "relative_norm": "relative_norms", "optimal_y": "optimal_y"}


@dataclass(frozen=True)
class ThresholdPruning:
    """A model with every channel group of norm at most ``threshold`` physically removed.

    Attributes
    ----------
    model : torch.nn.Module
        The pruned copy (eval mode); the input model is never modified.
    threshold : float or None
        Groups with ``score <= threshold`` were removed (one per root layer is always kept);
        ``None`` when nothing could be removed within the tolerance.
    removed : tuple of int
        Indices into ``regularizer.groups_`` of the removed groups.
    removed_per_layer : tuple of (str, int, int)
        ``(root module, channels removed, channels before)`` for every root layer.
    norms : ndarray
        The group norms the search ran on, aligned with ``regularizer.groups_``.
    macs_before, macs_after, params_before, params_after : int
        torch-pruning's counts for one validation image.
    accuracy_before, accuracy_after : float
        Validation accuracy of the input model and of the pruned model.
    masked_accuracy : float
        Validation accuracy of the input model with the removed groups zeroed.
    tolerance : float
    evaluations : int
        Masked accuracy evaluations made by the search.
    seconds : float
        Wall time of the search and the removal.
    score : {"norm", "relative_norm", "optimal_y"}
        What the threshold was on: the group norms, the norms relative to their layer's root-mean-square
        group norm, or the relaxed indicators :math:`y^*_j`.
    scores : ndarray
        The values thresholded, aligned with ``regularizer.groups_`` (equal to ``norms`` for ``"norm"``).
    reference_accuracy : float
        The accuracy the tolerance is measured from: ``accuracy_before`` unless another reference (e.g.
        the pretrained model's) was given.
    """

    model: nn.Module
    threshold: float | None
    removed: tuple[int, ...]
    removed_per_layer: tuple[tuple[str, int, int], ...]
    norms: np.ndarray
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    accuracy_before: float
    accuracy_after: float
    masked_accuracy: float
    tolerance: float
    evaluations: int
    seconds: float
    score: str = "norm"
    scores: np.ndarray | None = None
    reference_accuracy: float | None = None

    def __post_init__(self) -> None:
        if self.scores is None:
            object.__setattr__(self, "scores", self.norms)
        if self.reference_accuracy is None:
            object.__setattr__(self, "reference_accuracy", self.accuracy_before)
        self.norms.flags.writeable = False
        self.scores.flags.writeable = False

    @property
    def n_removed(self) -> int:
        return len(self.removed)

    @property
    def within_tolerance(self) -> bool:
        """Whether ``accuracy_after >= reference_accuracy - tolerance``; ``False`` only when the input
        model itself is already below that floor (then nothing is removed)."""
        return self.accuracy_after >= self.reference_accuracy - self.tolerance - _EPS

    @property
    def macs_ratio(self) -> float:
        """Fraction of the MACs kept."""
        return self.macs_after / self.macs_before

    def summary(self) -> str:
        return (f"removed {self.n_removed} of {len(self.norms)} channel groups ({self.score} <= "
                f"{self.threshold if self.threshold is None else f'{self.threshold:.3g}'}); MACs "
                f"{self.macs_before / 1e6:.2f} M -> {self.macs_after / 1e6:.2f} M ({self.macs_ratio:.1%}), params "
                f"{self.params_before:,} -> {self.params_after:,}; validation accuracy "
                f"{self.accuracy_before:.4f} -> {self.accuracy_after:.4f} (tolerance {self.tolerance:g}"
                + ("" if self.reference_accuracy == self.accuracy_before
                   else f" from reference {self.reference_accuracy:.4f}"
                   + ("" if self.within_tolerance else ", not met: the input model is below it"))
                + ")")


def prune_by_threshold(
    model: nn.Module,
    regularizer: PerspectiveRegularizer,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    tolerance: float = 0.005,
    batch_size: int = 1000,
    score: str = "norm",
    reference_accuracy: float | None = None,
) -> ThresholdPruning:
    r"""Remove the channel groups of smallest norm, as many as a held-out accuracy drop allows.

    With :math:`n_j` the norm of group :math:`j` (``regularizer.group_norms()``), :math:`P` one group
    of largest norm per root layer (never removed, so no layer loses all its channels) and
    :math:`S(\tau) = \{j \notin P : n_j \le \tau\}`, the search solves

    .. math::

        \max_{\tau \in \{n_j\}} |S(\tau)| \quad \text{s.t.} \quad
        \operatorname{acc}(\theta \odot \mathbb{1}_{\overline{S(\tau)}}) \ge \operatorname{acc}(\theta) - \varepsilon

    by binary search over the distinct norms, the accuracy taken on the validation set with the
    groups of :math:`S(\tau)` zeroed (producer filters, normalisation entries and consumer input
    slices, so a zeroed channel has no effect downstream). The groups of the accepted threshold are
    then removed through torch-pruning's dependency graph on a deep copy. Accuracy need not be
    monotone in :math:`\tau`, so the answer is a local one; but the number removed never decreases
    when :math:`\varepsilon` grows (``formulations/perspective_regularizer.md``, section 8).
    With ``score="optimal_y"`` the same search runs on the relaxed indicators
    :math:`y^*_j = \min(1, \max(r_j, \sqrt{\alpha/\lambda}\, n_j))` of ``regularizer``
    (:meth:`PerspectiveRegularizer.optimal_y`) in place of :math:`n_j`: relative to each layer's big-M
    bound, so a layer is not emptied first only because its weights are small. ``score="relative_norm"``
    thresholds :math:`n_j / c_{L(j)}` with :math:`c_L` the root-mean-square group norm of :math:`j`'s
    layer (:meth:`PerspectiveRegularizer.relative_norms`), the quantity a ``relative=True`` penalty sees.

    With ``reference_accuracy`` :math:`a_{\mathrm{ref}}` the constraint reads
    :math:`\operatorname{acc}(\cdot) \ge a_{\mathrm{ref}} - \varepsilon` instead: one common floor for
    models trained different ways (e.g. the accuracy of the model they all started from). If ``model``
    itself is below it, nothing is removed and the result's ``within_tolerance`` is ``False``.

    Parameters
    ----------
    model : torch.nn.Module
        The trained network; not modified.
    regularizer : PerspectiveRegularizer
        Built on ``model`` (it reads this very model's parameters); gives the groups and norms.
    val_images, val_labels : torch.Tensor
        Held-out images ``(N, ...)`` and integer labels ``(N,)``, ``N >= 1``.
    tolerance : float
        Largest accepted accuracy drop, as a fraction (0.005 is half a point), ``>= 0``.
    batch_size : int
        Evaluation batch size.
    score : {"norm", "relative_norm", "optimal_y"}
        The value thresholded: the group norms (default), the layer-relative norms, or ``regularizer``'s
        relaxed indicators.
    reference_accuracy : float or None
        Accuracy (a fraction in [0, 1]) the tolerance is measured from; ``None``: ``model``'s own
        validation accuracy.

    Returns
    -------
    ThresholdPruning
    """
    start = time.perf_counter()
    tolerance = _check_inputs(model, regularizer, val_images, val_labels, tolerance, batch_size)
    if score not in SCORES:
        raise ValueError(f"`score` must be one of {list(SCORES)}; got {score!r}.")
    if reference_accuracy is not None and (
            isinstance(reference_accuracy, bool) or not isinstance(reference_accuracy, numbers.Real)
            or not 0.0 <= reference_accuracy <= 1.0):
        raise ValueError(f"`reference_accuracy` must be None or an accuracy fraction in [0, 1]; "
                         f"got {reference_accuracy!r}.")
    try:
        norms = regularizer.group_norms().detach().cpu().double().numpy()
        scores = getattr(regularizer, SCORES[score])().detach().cpu().double().numpy()
    except RuntimeError as exc:  # the model changed shape since the regulariser was built
        raise ValueError(f"`regularizer` no longer matches `model`: {exc}") from exc
    groups = regularizer.groups_
    device = next(model.parameters()).device
    val_images, val_labels = val_images.to(device), val_labels.to(device)
    example = val_images[:1]

    work = copy.deepcopy(model).eval()
    pristine = {k: v.clone() for k, v in work.state_dict().items()}
    slices = [_group_slices(work, g) for g in groups]
    candidates, cuts = _candidates(groups, scores)

    cache: dict[int, float] = {}

    def masked_accuracy(i: int) -> float:
        if i not in cache:
            work.load_state_dict(pristine)
            with torch.no_grad():
                for j in candidates[:cuts[i]]:
                    for param, dim, index in slices[j]:
                        param.index_fill_(dim, index, 0.0)
            cache[i] = evaluate(work, val_images, val_labels, batch_size)
        return cache[i]

    base = masked_accuracy(0)
    reference = base if reference_accuracy is None else float(reference_accuracy)
    floor = reference - tolerance - _EPS
    # invariant: cut `lo` is feasible; when even cut 0 is not (the model is below a given reference),
    # nothing is removed
    lo, hi = 0, (len(cuts) - 1 if base >= floor else 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if masked_accuracy(mid) >= floor:
            lo = mid
        else:
            hi = mid - 1
    macs_before, params_before = count_macs_params(work, example)
    # Masked and removed models agree up to rounding; should rounding flip a prediction past the
    # floor, fall back to the next smaller accepted cut (cut 0 removes nothing and always passes).
    while True:
        removed = tuple(int(j) for j in candidates[:cuts[lo]])
        work.load_state_dict(pristine)
        pruned = _remove_groups(copy.deepcopy(work), groups, removed, example)
        accuracy = evaluate(pruned, val_images, val_labels, batch_size)
        if accuracy >= floor or lo == 0:
            break
        lo = max(i for i, a in cache.items() if i < lo and a >= floor)
    macs_after, params_after = count_macs_params(pruned, example)
    return ThresholdPruning(
        model=pruned,
        threshold=float(scores[candidates[cuts[lo] - 1]]) if cuts[lo] else None,
        removed=tuple(sorted(removed)),
        removed_per_layer=_per_layer(groups, removed),
        norms=norms,
        macs_before=macs_before, macs_after=macs_after,
        params_before=params_before, params_after=params_after,
        accuracy_before=base, accuracy_after=accuracy, masked_accuracy=masked_accuracy(lo),
        tolerance=tolerance, evaluations=len(cache),
        seconds=time.perf_counter() - start, score=score, scores=scores, reference_accuracy=reference,
    )


def _candidates(groups, norms: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Removable groups in increasing norm (or score), and the cut points between distinct values.

    Cut ``i`` removes ``candidates[:cuts[i]]``; ``cuts[0] = 0``. Ties are cut together so that
    each cut is a threshold ``norm <= tau``.
    """
    protected = {}
    for j, g in enumerate(groups):  # one group of largest norm per root layer stays
        best = protected.get(g.dependency_group)
        if best is None or norms[j] > norms[best]:
            protected[g.dependency_group] = j
    keep = set(protected.values())
    candidates = np.array([j for j in np.argsort(norms, kind="stable") if j not in keep], dtype=int)
    sorted_norms = norms[candidates]
    cuts = [0] + [k for k in range(1, len(candidates)) if sorted_norms[k] > sorted_norms[k - 1]]
    if len(candidates):
        cuts.append(len(candidates))
    return candidates, cuts


def _group_slices(model: nn.Module, group) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """(parameter, dim, indices) of every slice zeroed to mask ``group`` in ``model``."""
    out = []
    for member in group.members:
        module = model.get_submodule(member.module)
        specs, _ = _param_slices(module, member.dim)
        for pname, dim in specs or ():  # unsliceable modules were reported when tracing
            param = getattr(module, pname)
            out.append((param, dim, torch.as_tensor(member.indices, device=param.device)))
    return out


def _remove_groups(model: nn.Module, groups, removed: tuple[int, ...], example: torch.Tensor) -> nn.Module:
    """Physically remove ``removed`` groups from ``model`` (in place) with torch-pruning.

    Not :mod:`orprune.network.surgery`: its units leave out channels tied by residual adds, which SPR groups
    include (a ResNet's residual streams).
    """
    by_root: dict[str, list[int]] = {}
    for j in removed:
        by_root.setdefault(groups[j].root_module, []).append(groups[j].root_channel)
    if by_root:
        dg, _ = build_dependency_graph(model, example)  # the graph the groups came from (deep ShuffleNets too)
        # Each root layer is one dependency group, disjoint from the others: pruning one leaves the
        # channel numbering of the rest unchanged.
        for name, channels in by_root.items():
            module = model.get_submodule(name)
            prune_fn = dg.get_pruner_of_module(module).prune_out_channels
            dg.get_pruning_group(module, prune_fn, idxs=sorted(channels)).prune()
    return model.eval()


def _per_layer(groups, removed: tuple[int, ...]) -> tuple[tuple[str, int, int], ...]:
    total: dict[str, int] = {}
    for g in groups:
        total[g.root_module] = total.get(g.root_module, 0) + 1
    gone = dict.fromkeys(total, 0)
    for j in removed:
        gone[groups[j].root_module] += 1
    return tuple((name, gone[name], total[name]) for name in total)


def _check_inputs(model, regularizer, val_images, val_labels, tolerance, batch_size) -> float:
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module; got {type(model).__name__}.")
    if not isinstance(regularizer, PerspectiveRegularizer):
        raise ValueError(f"`regularizer` must be a PerspectiveRegularizer; got {type(regularizer).__name__}.")
    own = {id(m) for m in model.modules()}
    if any(id(module) not in own for module, _, _ in regularizer._sources):
        raise ValueError("`regularizer` was built for another model (it reads parameters of modules that "
                         "are not in `model`); build it on `model` itself.")
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not math.isfinite(tolerance) \
            or tolerance < 0:
        raise ValueError(f"`tolerance` must be a finite number >= 0 (an accuracy fraction); got {tolerance!r}.")
    if not isinstance(val_images, torch.Tensor) or not isinstance(val_labels, torch.Tensor):
        raise ValueError("`val_images` and `val_labels` must be torch tensors.")
    if val_images.ndim < 2 or len(val_images) == 0:
        raise ValueError(f"`val_images` must be a non-empty batch (N, ...); got shape {tuple(val_images.shape)}.")
    if val_labels.ndim != 1 or val_labels.is_floating_point() or len(val_labels) != len(val_images):
        raise ValueError(f"`val_labels` must be integer labels of shape ({len(val_images)},); got "
                         f"{val_labels.dtype} of shape {tuple(val_labels.shape)}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an integer >= 1; got {batch_size!r}.")
    return float(tolerance)
