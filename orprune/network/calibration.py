"""Calibration statistics: stream batches through the model and accumulate each consumer's problem.

For a consumer with weights :math:`W` (layout of :func:`orprune.network.graph.weight_matrix`) and input
channels split into blocks, every calibration sample gives a row :math:`x` of the design matrix
(for a ``Conv2d`` one unfolded patch, channel-major so that channel ``c`` owns columns
``[c*g, (c+1)*g)``; for a ``Linear`` its input as it is) and a target row :math:`y`, the layer's
original output at that position *without its bias*. Only

.. math:: G = X^T X,\\quad B = X^T Y,\\quad \\|Y\\|_F^2,\\quad \\textstyle\\sum x,\\ \\sum y

are kept (:class:`orprune.layer.problem.StatisticsAccumulator`, float64), so memory does not grow with the
number of samples. Convolutions contribute ``positions_per_image`` random output positions per image
(seeded) instead of all ``H_out * W_out``.

Sequential pruning (``shared/design.md`` section 3, step 2) takes the inputs from a partially pruned
model and the targets from the original one (``reference``): both run on the same batch and the same
positions, so errors of earlier layers are compensated instead of accumulated. With ``offsets``,
a consumer's targets also gain a scaled difference of tensors tapped in both models (the other
operand of a residual addition, :mod:`orprune.network.residual_targets`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from orprune.layer.problem import StatisticsAccumulator
from orprune.network._consumer_stream import ConsumerStream, TargetCache
from orprune.network.graph import Consumer, call_model
from orprune.network.residual_targets import TargetOffset

__all__ = ["collect_statistics", "TargetCache", "DEFAULT_POSITIONS_PER_IMAGE"]

#: Output positions sampled per image for a convolution consumer.
DEFAULT_POSITIONS_PER_IMAGE = 32


def _batch_input(batch: Any) -> Any:
    """The model input of one calibration batch: a tensor, or the first item of (input, target)."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("`batches` yielded an empty tuple; expected a tensor or (input, target).")
        return batch[0]
    return batch


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _module(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise ValueError(f"`consumers` names {name!r}, which is not a module of `{what}`.") from exc


def collect_statistics(
    model: nn.Module,
    consumers: Iterable[Consumer | str],
    batches: Iterable[Any],
    *,
    reference: nn.Module | TargetCache | None = None,
    cache: TargetCache | None = None,
    offsets: Mapping[str, TargetOffset] | None = None,
    positions_per_image: int | None = DEFAULT_POSITIONS_PER_IMAGE,
    seed: int = 0,
    max_batches: int | None = None,
    progress: bool = True,
    float32: bool = False,
) -> dict[str, StatisticsAccumulator]:
    """Accumulate the least-squares statistics of each consumer over calibration batches.

    Parameters
    ----------
    model : nn.Module
        Gives the consumers' inputs. Run in eval mode under ``torch.no_grad``; modes are restored.
    consumers : iterable of Consumer or str
        Consumer layers (e.g. ``find_groups(...).consumers``) or their module names.
    batches : iterable
        Tensors, or tuples / lists whose first item is the model input (a DataLoader works).
    reference : nn.Module or TargetCache, optional
        Gives the targets (the original model, when ``model`` is partially pruned): both run on each
        batch and share the sampled positions. A :class:`TargetCache` filled by an earlier call on the
        same batches replaces the original model's pass (and its positions). Default: ``model``.
    cache : TargetCache, optional
        Filled with the sampled targets of this call, for later calls' ``reference``.
    offsets : mapping of str -> TargetOffset, optional
        Per consumer, targets ``y + scale * (sum of taps in reference - sum of taps in model)``
        (:mod:`orprune.network.residual_targets`), the taps sampled at the consumer's positions; each such
        consumer and tapped module must run once per pass. Without ``reference`` the offset is zero
        and the taps only go into ``cache``; with a :class:`TargetCache` reference, its tapped rows
        (filled with the same offsets) replace the reference's. Costs a copy of the consumer's input
        and of each tapped tensor per batch.
    positions_per_image : int or None, default 32
        Random output positions per image for conv consumers (all when None or when the layer has
        fewer).
    seed : int
        Seed of the position sampler.
    max_batches : int, optional
        Stop after this many batches.
    progress : bool, default True
        Show a tqdm progress bar.
    float32 : bool, default False
        Each batch's ``X^T X`` and ``X^T Y`` in float32 on the model's device (sums over batches in
        float64): about twice as fast on CPU, no float64 copy of the rows; agrees with float64 to
        ``StatisticsAccumulator.FLOAT32_RTOL`` relative (Frobenius norm; tested).

    Returns
    -------
    dict of str -> StatisticsAccumulator or WideAccumulator
        One accumulator per consumer: ``acc.to_problem(group_size=consumer.group_size, center=True)``
        is its problem with an unpenalised intercept (a :class:`~orprune.layer.wide.WideAccumulator` for a
        consumer given as a wide :class:`Consumer`: compressed statistics and the stored rows); the bias to write for weights ``W`` is
        ``original_bias + mean_y - mean_x @ W`` with ``mean_x, mean_y = acc.means()``.

    Raises
    ------
    ValueError
        Bad arguments, no batch at all, a consumer that never ran, or NaN / inf activations.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if reference is not None and not isinstance(reference, (nn.Module, TargetCache)):
        raise ValueError("`reference` must be a torch.nn.Module, a TargetCache or None, "
                         f"got {type(reference).__name__}.")
    if cache is not None and (not isinstance(cache, TargetCache) or cache is reference):
        raise ValueError("`cache` must be a TargetCache other than `reference`.")
    offsets = dict(offsets or {})
    if not all(isinstance(o, TargetOffset) for o in offsets.values()):
        raise ValueError("`offsets` must map consumer names to TargetOffset.")
    for arg, value in (("positions_per_image", positions_per_image), ("max_batches", max_batches)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"`{arg}` must be a positive integer or None, got {value!r}.")
    consumers = list(consumers)
    names = list(dict.fromkeys(c.name if isinstance(c, Consumer) else c for c in consumers))
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError("`consumers` must be a non-empty iterable of Consumer or module names.")
    gen = torch.Generator().manual_seed(int(seed))
    streams = {n: ConsumerStream(n, _module(model, n, "model"), positions_per_image, gen) for n in names}
    for stream in streams.values():
        stream.cache = cache
        stream.float32 = bool(float32)
    for c in consumers:
        if isinstance(c, Consumer) and c.wide:  # compressed selection statistics and the rows for the refit
            streams[c.name].sketch = (c.group_size, c.sketch)
    for name, offset in offsets.items():
        if name not in streams:
            raise ValueError(f"`offsets` names {name!r}, which is not one of `consumers`.")
        n_out = streams[name].module.weight.shape[0]
        if offset.scale is not None and offset.scale.numel() != n_out:
            raise ValueError(f"`offsets[{name!r}].scale` has {offset.scale.numel()} entries; the consumer has "
                             f"{n_out} outputs.")
        for tap in offset.taps:
            for what, m in (("model", model), ("reference", reference)):
                if isinstance(m, nn.Module):
                    _module(m, tap.module, what)
        if isinstance(reference, TargetCache) and name not in reference._offsets:
            raise ValueError(f"the target cache has no tapped rows of consumer {name!r}: fill it with `offsets`.")
        if reference is not None or cache is not None:  # else the offset is zero and nothing is stored
            streams[name].offset = offset
    if isinstance(reference, TargetCache):
        missing = [n for n in names if n not in reference]
        if missing:
            raise ValueError(f"the target cache has no targets of consumers {missing}.")
        for n in names:
            streams[n].bias = reference._bias[n]
    elif reference is not None:
        for n in names:
            ref = _module(reference, n, "reference")
            if type(ref) is not type(streams[n].module):
                raise ValueError(f"consumer {n!r} is a {type(ref).__name__} in `reference` but a "
                                 f"{type(streams[n].module).__name__} in `model`.")
            streams[n].bias = ref.bias
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    n_batches = 0
    with _eval(model, reference if isinstance(reference, nn.Module) else None), torch.no_grad():
        total = len(batches) if hasattr(batches, "__len__") else None
        if total is not None and max_batches is not None:
            total = min(total, max_batches)
        for batch in tqdm(batches, total=total, disable=not progress, desc="calibration", leave=False):
            if max_batches is not None and n_batches >= max_batches:
                break
            inputs = _to(_batch_input(batch), device)
            if reference is None:
                _pass(model, inputs, streams, _record_own, n_batches)
            elif isinstance(reference, TargetCache):
                if n_batches >= reference.n_batches:
                    raise ValueError(f"the target cache holds {reference.n_batches} batches; `batches` has more.")
                _pass(model, inputs, streams, lambda st, args, out: _record_cached(st, args, out, reference), n_batches)
            else:
                _pass(reference, inputs, streams, _record_targets, n_batches)
                _pass(model, inputs, streams, _record_inputs, n_batches)
                left = [n for n, s in streams.items() if s.pending]
                if left:
                    raise ValueError(f"consumers {left} ran more often in `reference` than in `model`.")
            n_batches += 1
    if n_batches == 0:
        raise ValueError("`batches` is empty: calibration needs at least one batch.")
    missing = [n for n, s in streams.items() if s.acc is None]
    if missing:
        raise ValueError(f"consumers {missing} were never called during calibration; they are not "
                         "used by the model's forward pass.")
    return {n: s.acc for n, s in streams.items()}


# ------------------------------------------------------------------------------------ hooks
def _keep_taps(stream: ConsumerStream, output: torch.Tensor, idx: torch.Tensor | None) -> None:
    """The reference's tapped rows: for this batch's model pass and for the cache."""
    def then(rows: torch.Tensor) -> None:
        stream.ref_offset = rows
        if stream.cache is not None:
            stream.cache._add_offset(stream, rows, output.dtype)
    stream.taps.expect(output, idx, then)


def _record_own(stream: ConsumerStream, inputs: tuple, output: torch.Tensor) -> None:
    idx = stream.draw(output)
    rows = stream.sample(output, idx)
    if stream.cache is not None:
        stream.cache._add(stream, (_n_positions(output), idx, rows))
    stream.update(inputs[0], rows, idx)  # the reference is the model itself: a zero offset
    if stream.offset is not None:
        _keep_taps(stream, output, idx)


def _record_targets(stream: ConsumerStream, inputs: tuple, output: torch.Tensor) -> None:
    idx = stream.draw(output)
    entry = (_n_positions(output), idx, stream.sample(output, idx))
    if stream.cache is not None:
        stream.cache._add(stream, entry)
    stream.pending.append(entry)
    if stream.offset is not None:
        _keep_taps(stream, output, idx)


def _record_inputs(stream: ConsumerStream, inputs: tuple, output: torch.Tensor) -> None:
    if not stream.pending:
        raise ValueError(f"consumer {stream.name!r} ran in `model` but not in `reference`.")
    _update_from(stream, inputs, output, stream.pending.pop(0), "`reference`", stream.ref_offset)


def _record_cached(stream: ConsumerStream, inputs: tuple, output: torch.Tensor, cache: TargetCache) -> None:
    entry = cache._get(stream)
    stream.calls += 1
    _update_from(stream, inputs, output, entry, "the target cache",
                 None if stream.offset is None else cache._get_offset(stream))


def _update_from(stream: ConsumerStream, inputs: tuple, output: torch.Tensor,
                 entry: tuple[int, torch.Tensor | None, torch.Tensor], source: str,
                 reference_taps: torch.Tensor | None = None) -> None:
    n_pos, idx, rows = entry
    if _n_positions(output) != n_pos:
        raise ValueError(f"consumer {stream.name!r} has output shape {tuple(output.shape)} in `model`, "
                         f"which does not match its {n_pos} rows per sample in {source}.")
    if stream.offset is None:
        stream.update(inputs[0], rows, idx)
        return
    x = inputs[0].detach().clone()  # waits for the taps; a later in-place op must not change it
    scale = stream.offset.scale

    def then(model_taps: torch.Tensor) -> None:
        diff = reference_taps.double() - model_taps
        stream.update(x, rows, idx, diff if scale is None else diff * scale.to(diff))
    stream.taps.expect(output, idx, then)


def _n_positions(output: torch.Tensor) -> int:
    """Rows per sample: output positions of a conv, tokens of a Linear."""
    channels = output.shape[1] if output.dim() == 4 else output.shape[-1]
    return int(output[0].numel() // channels)


class _AllRecorded(Exception):
    """Raised by the last consumer hook of a pass: the rest of the forward pass is not needed."""


def _forward(model: nn.Module, inputs: Any) -> None:
    try:
        call_model(model, inputs)
    except _AllRecorded:
        pass


def _pass(model: nn.Module, inputs: Any, streams: dict[str, ConsumerStream], record: Any, batch: int) -> None:
    """One forward pass of ``model`` recording every stream; offsets must complete within it."""
    for s in streams.values():
        s.begin(batch)
    with _hooks(model, streams, record):
        _forward(model, inputs)
    late = [n for n, s in streams.items() if s.taps is not None and s.taps.late]
    if late:
        raise ValueError(f"consumers {late} ran but a tapped module of their offset did not.")


@contextlib.contextmanager
def _hooks(model: nn.Module, streams: dict[str, ConsumerStream], record: Any) -> Iterator[None]:
    """Forward hooks recording every stream; once all have fired, the pass stops early.

    Stopping is what makes the sequential refit affordable: a unit early in the network needs only
    the first layers of both models. A consumer called twice in one pass (shared weights) is seen
    once per pass by this rule, identically in both models.
    """
    handles, fired = [], set()

    def done(stream: ConsumerStream) -> None:
        if stream.taps is not None and stream.taps.waiting:  # its tapped tensors are still to come
            return
        fired.add(stream.name)
        if len(fired) == len(streams):
            fired.clear()
            raise _AllRecorded

    def hook(stream: ConsumerStream, args: tuple, out: torch.Tensor) -> None:
        record(stream, args, out)
        done(stream)

    def tap(stream: ConsumerStream, i: int, args: tuple, out: Any) -> None:
        value = out if stream.offset.taps[i].port == "output" else (args[0] if args else None)
        if not torch.is_tensor(value):
            raise ValueError(f"consumer {stream.name!r}: tapped module {stream.offset.taps[i].module!r} "
                             "gave no tensor.")
        stream.taps.tap(i, value)
        done(stream)

    try:
        for name, stream in streams.items():
            module = model.get_submodule(name)
            handles.append(module.register_forward_hook(lambda _m, args, out, s=stream: hook(s, args, out)))
            for i, t in enumerate(stream.offset.taps if stream.offset is not None else ()):
                handles.append(model.get_submodule(t.module).register_forward_hook(
                    lambda _m, args, out, s=stream, i=i: tap(s, i, args, out)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _eval(*models: nn.Module | None) -> Iterator[None]:
    modes = {m: m.training for model in models if model is not None for m in model.modules()}
    try:
        for model in models:
            if model is not None:
                model.eval()
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
