"""Calibration statistics: stream batches through the model and accumulate each consumer's problem.

For a consumer with weights :math:`W` (layout of :func:`orprune.graph.weight_matrix`) and input
channels split into blocks, every calibration sample gives a row :math:`x` of the design matrix
(for a ``Conv2d`` one unfolded patch, channel-major so that channel ``c`` owns columns
``[c*g, (c+1)*g)``; for a ``Linear`` its input as it is) and a target row :math:`y`, the layer's
original output at that position *without its bias*. Only

.. math:: G = X^T X,\\quad B = X^T Y,\\quad \\|Y\\|_F^2,\\quad \\textstyle\\sum x,\\ \\sum y

are kept (:class:`orprune.problem.StatisticsAccumulator`, float64), so memory does not grow with the
number of samples. Convolutions contribute ``positions_per_image`` random output positions per image
(seeded) instead of all ``H_out * W_out``.

Sequential pruning (``shared/design.md`` section 3, step 2) takes the inputs from a partially pruned
model and the targets from the original one (``reference``): both run on the same batch and the same
positions, so errors of earlier layers are compensated instead of accumulated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from orprune.graph import Consumer, call_model
from orprune.problem import StatisticsAccumulator

__all__ = ["collect_statistics", "TargetCache", "conv_patches", "sampled_patches", "DEFAULT_POSITIONS_PER_IMAGE"]

#: Output positions sampled per image for a convolution consumer.
DEFAULT_POSITIONS_PER_IMAGE = 32
# Unfold at most this many elements at once (about 64 MB in float32); larger batches are chunked.
_UNFOLD_CHUNK = 1 << 24


def _padded(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded as ``conv`` pads it (numeric or string padding, every ``padding_mode``)."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)


def conv_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Unfolded input patches of ``conv``: shape ``(B, C*kh*kw, H_out*W_out)``, channel-major.

    Handles stride, dilation, numeric or string padding and every ``padding_mode``
    (``groups`` must be 1), so that ``weight_matrix(conv).T @ patches + bias`` is the conv output.
    """
    return F.unfold(_padded(conv, x), conv.kernel_size, dilation=conv.dilation, stride=conv.stride)


def sampled_patches(conv: nn.Conv2d, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The rows of :func:`conv_patches` at ``positions`` only: shape ``(B*P, C*kh*kw)``.

    ``positions`` (B, P) indexes each image's flattened output grid. Gathering the ``kh*kw``
    shifted pixels of the sampled positions costs ``P/(H_out*W_out)`` of a full unfold (32 of 784
    positions on a 28x28 layer).
    """
    xp = _padded(conv, x)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    wp = xp.shape[3]
    w_out = (wp - dw * (kw - 1) - 1) // sw + 1
    top = (positions // w_out) * sh * wp + (positions % w_out) * sw  # (B, P) corner in the padded grid
    offsets = (torch.arange(kh, device=x.device)[:, None] * dh * wp
               + torch.arange(kw, device=x.device)[None, :] * dw).reshape(-1)  # (K,)
    index = (top[:, None, :] + offsets[None, :, None]).reshape(x.shape[0], 1, -1)  # (B, 1, K*P)
    cols = xp.flatten(2).gather(2, index.expand(-1, x.shape[1], -1))  # (B, C, K*P)
    n_pos = positions.shape[1]
    return cols.reshape(x.shape[0], -1, n_pos).transpose(1, 2).reshape(-1, cols.shape[1] * kh * kw)


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


class _ConsumerStream:
    """Hooks of one consumer: draws positions, extracts rows, updates the accumulator."""

    def __init__(self, name: str, module: nn.Module, positions: int | None, gen: torch.Generator):
        if not (isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)):
            raise ValueError(
                f"`consumers` entry {name!r} is a {type(module).__name__}; a consumer must be a "
                "Linear or a Conv2d with groups=1."
            )
        self.name, self.module, self.positions, self.gen = name, module, positions, gen
        self.bias = module.bias  # of the layer giving the targets (the reference's in sequential mode)
        self.acc: StatisticsAccumulator | None = None
        self.pending: list[tuple[int, torch.Tensor | None, torch.Tensor]] = []  # (L, positions, rows)
        self.batch = -1
        self.calls = 0  # calls in the current batch's pass
        self.cache: TargetCache | None = None

    # -- positions and targets
    def _draw(self, n_images: int, n_positions: int, device: torch.device) -> torch.Tensor | None:
        if self.positions is None or n_positions <= self.positions:
            return None
        scores = torch.rand(n_images, n_positions, generator=self.gen)
        return scores.argsort(dim=1)[:, : self.positions].to(device)

    def sample(self, output: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        """Rows of the output at the sampled positions: a copy, in the layer's dtype, bias included.

        A copy because in sequential mode the rows wait for the other model's pass (or a later
        one, cached), and an in-place op after the layer must not change them.
        """
        out = output.detach()
        if isinstance(self.module, nn.Linear):
            return out.reshape(-1, out.shape[-1]).clone()
        y = out.flatten(2)  # (B, O, L)
        if idx is not None:
            y = y.gather(2, idx[:, None, :].expand(-1, y.shape[1], -1))
        return y.transpose(1, 2).reshape(-1, y.shape[1]).clone()

    def targets(self, rows: torch.Tensor) -> torch.Tensor:
        """Least-squares targets from sampled output rows: float64, without the bias."""
        y = rows.to(torch.float64)
        return y if self.bias is None else y - self.bias.detach().double()

    def draw(self, output: torch.Tensor) -> torch.Tensor | None:
        if isinstance(self.module, nn.Linear):
            return None
        return self._draw(output.shape[0], output.shape[2] * output.shape[3], output.device)

    # -- inputs
    def rows(self, x: torch.Tensor, idx: torch.Tensor | None) -> Iterator[tuple[slice, torch.Tensor]]:
        """Design-matrix rows, yielded per chunk of images (bounded memory)."""
        x = x.detach()
        if isinstance(self.module, nn.Linear):
            yield slice(None), x.reshape(-1, x.shape[-1])
            return
        if idx is not None:
            yield slice(None), sampled_patches(self.module, x, idx)
            return
        n_feat = x.shape[1] * int(torch.tensor(self.module.kernel_size).prod())
        per_image = n_feat * max(1, x.shape[2] * x.shape[3])
        step = max(1, _UNFOLD_CHUNK // per_image)
        for start in range(0, x.shape[0], step):
            cols = conv_patches(self.module, x[start : start + step])  # (b, F, L)
            yield slice(start, start + step), cols.transpose(1, 2).reshape(-1, cols.shape[1])

    def update(self, x: torch.Tensor, sampled: torch.Tensor, idx: torch.Tensor | None) -> None:
        y_all = self.targets(sampled)
        per_image = y_all.shape[0] // max(x.shape[0], 1)
        for images, rows in self.rows(x, idx):
            start = 0 if images.start is None else images.start * per_image
            y = y_all[start : start + rows.shape[0]]
            if rows.shape[0] != y.shape[0]:
                raise ValueError(
                    f"consumer {self.name!r}: the input gives {rows.shape[0]} rows but the target "
                    f"{y.shape[0]}; the two models disagree on the layer's spatial shape."
                )
            for what, value in (("input", rows), ("original output", y)):
                if not bool(torch.isfinite(value).all()):
                    raise ValueError(
                        f"calibration batch {self.batch}: the {what} of consumer {self.name!r} holds "
                        "NaN or inf values; check the data and the model's numerical stability."
                    )
            if self.acc is None:
                self.acc = StatisticsAccumulator(rows.shape[1], y.shape[1])
            self.acc.update(rows, y)


class TargetCache:
    """The original model's sampled outputs of each consumer, per calibration batch and call.

    Filled by :func:`collect_statistics` (``cache=``) and read back as its ``reference``: a later
    pass of a partially pruned model then needs neither the original model's forward pass nor a new
    draw of positions. It holds ``n_samples * positions_per_image * out_channels`` values per conv
    consumer in the layer's dtype (:attr:`nbytes`).
    """

    def __init__(self) -> None:
        self._rows: dict[str, dict[int, list[tuple[int, torch.Tensor | None, torch.Tensor]]]] = {}
        self._bias: dict[str, torch.Tensor | None] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._rows

    @property
    def n_batches(self) -> int:
        return max((len(b) for b in self._rows.values()), default=0)

    @property
    def nbytes(self) -> int:
        return sum(y.element_size() * y.numel() + (0 if idx is None else idx.element_size() * idx.numel())
                   for batches in self._rows.values() for calls in batches.values() for _, idx, y in calls)

    def _add(self, stream: _ConsumerStream, entry: tuple[int, torch.Tensor | None, torch.Tensor]) -> None:
        if stream.name not in self._rows:
            self._rows[stream.name] = {}
            self._bias[stream.name] = None if stream.bias is None else stream.bias.detach().clone()
        self._rows[stream.name].setdefault(stream.batch, []).append(entry)

    def _get(self, stream: _ConsumerStream) -> tuple[int, torch.Tensor | None, torch.Tensor]:
        calls = self._rows[stream.name].get(stream.batch, [])
        if stream.calls >= len(calls):
            raise ValueError(f"the target cache holds {len(calls)} call(s) of consumer {stream.name!r} in "
                             f"batch {stream.batch}; `model` made more: give the batches the cache was made from.")
        return calls[stream.calls]


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
    positions_per_image: int | None = DEFAULT_POSITIONS_PER_IMAGE,
    seed: int = 0,
    max_batches: int | None = None,
    progress: bool = True,
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
    positions_per_image : int or None, default 32
        Random output positions per image for conv consumers (all when None or when the layer has
        fewer).
    seed : int
        Seed of the position sampler.
    max_batches : int, optional
        Stop after this many batches.
    progress : bool, default True
        Show a tqdm progress bar.

    Returns
    -------
    dict of str -> StatisticsAccumulator
        One accumulator per consumer: ``acc.to_problem(group_size=consumer.group_size, center=True)``
        is its problem with an unpenalised intercept; the bias to write for weights ``W`` is
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
    for arg, value in (("positions_per_image", positions_per_image), ("max_batches", max_batches)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"`{arg}` must be a positive integer or None, got {value!r}.")
    names = list(dict.fromkeys(c.name if isinstance(c, Consumer) else c for c in consumers))
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError("`consumers` must be a non-empty iterable of Consumer or module names.")
    gen = torch.Generator().manual_seed(int(seed))
    streams = {n: _ConsumerStream(n, _module(model, n, "model"), positions_per_image, gen) for n in names}
    for stream in streams.values():
        stream.cache = cache
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
            for s in streams.values():
                s.batch, s.calls = n_batches, 0
            if reference is None:
                with _hooks(model, streams, _record_own):
                    _forward(model, inputs)
            elif isinstance(reference, TargetCache):
                if n_batches >= reference.n_batches:
                    raise ValueError(f"the target cache holds {reference.n_batches} batches; `batches` has more.")
                with _hooks(model, streams, lambda st, args, out: _record_cached(st, args, out, reference)):
                    _forward(model, inputs)
            else:
                with _hooks(reference, streams, _record_targets):
                    _forward(reference, inputs)
                with _hooks(model, streams, _record_inputs):
                    _forward(model, inputs)
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
def _record_own(stream: _ConsumerStream, inputs: tuple, output: torch.Tensor) -> None:
    idx = stream.draw(output)
    rows = stream.sample(output, idx)
    if stream.cache is not None:
        stream.cache._add(stream, (_n_positions(output), idx, rows))
    stream.update(inputs[0], rows, idx)


def _record_targets(stream: _ConsumerStream, inputs: tuple, output: torch.Tensor) -> None:
    idx = stream.draw(output)
    entry = (_n_positions(output), idx, stream.sample(output, idx))
    if stream.cache is not None:
        stream.cache._add(stream, entry)
    stream.pending.append(entry)


def _record_inputs(stream: _ConsumerStream, inputs: tuple, output: torch.Tensor) -> None:
    if not stream.pending:
        raise ValueError(f"consumer {stream.name!r} ran in `model` but not in `reference`.")
    _update_from(stream, inputs, output, stream.pending.pop(0), "`reference`")


def _record_cached(stream: _ConsumerStream, inputs: tuple, output: torch.Tensor, cache: TargetCache) -> None:
    entry = cache._get(stream)
    stream.calls += 1
    _update_from(stream, inputs, output, entry, "the target cache")


def _update_from(stream: _ConsumerStream, inputs: tuple, output: torch.Tensor,
                 entry: tuple[int, torch.Tensor | None, torch.Tensor], source: str) -> None:
    n_pos, idx, rows = entry
    if _n_positions(output) != n_pos:
        raise ValueError(f"consumer {stream.name!r} has output shape {tuple(output.shape)} in `model`, "
                         f"which does not match its {n_pos} rows per sample in {source}.")
    stream.update(inputs[0], rows, idx)


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


@contextlib.contextmanager
def _hooks(model: nn.Module, streams: dict[str, _ConsumerStream], record: Any) -> Iterator[None]:
    """Forward hooks recording every stream; once all have fired, the pass stops early.

    Stopping is what makes the sequential refit affordable: a unit early in the network needs only
    the first layers of both models. A consumer called twice in one pass (shared weights) is seen
    once per pass by this rule, identically in both models.
    """
    handles, fired = [], set()

    def hook(stream: _ConsumerStream, args: tuple, out: torch.Tensor) -> None:
        record(stream, args, out)
        fired.add(stream.name)
        if len(fired) == len(streams):
            fired.clear()
            raise _AllRecorded

    try:
        for name, stream in streams.items():
            module = model.get_submodule(name)
            handles.append(module.register_forward_hook(lambda _m, args, out, s=stream: hook(s, args, out)))
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
