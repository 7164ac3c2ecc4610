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

__all__ = ["collect_statistics", "conv_patches", "DEFAULT_POSITIONS_PER_IMAGE"]

#: Output positions sampled per image for a convolution consumer.
DEFAULT_POSITIONS_PER_IMAGE = 32
# Unfold at most this many elements at once (about 64 MB in float32); larger batches are chunked.
_UNFOLD_CHUNK = 1 << 24


def conv_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Unfolded input patches of ``conv``: shape ``(B, C*kh*kw, H_out*W_out)``, channel-major.

    Handles stride, dilation, numeric or string padding and every ``padding_mode``
    (``groups`` must be 1), so that ``weight_matrix(conv).T @ patches + bias`` is the conv output.
    """
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        padding: Any = 0
    else:
        padding = conv.padding
    return F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)


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
        self.pending: list[tuple[int, torch.Tensor | None, torch.Tensor]] = []  # (L, positions, targets)
        self.batch = -1

    # -- positions and targets
    def _draw(self, n_images: int, n_positions: int, device: torch.device) -> torch.Tensor | None:
        if self.positions is None or n_positions <= self.positions:
            return None
        scores = torch.rand(n_images, n_positions, generator=self.gen)
        return scores.argsort(dim=1)[:, : self.positions].to(device)

    def targets(self, output: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        """Rows of the output at the sampled positions, without the bias."""
        out = output.detach()
        bias = self.bias
        if isinstance(self.module, nn.Linear):
            y = out.reshape(-1, out.shape[-1])
        else:
            y = out.flatten(2)  # (B, O, L)
            if idx is not None:
                y = y.gather(2, idx[:, None, :].expand(-1, y.shape[1], -1))
            y = y.transpose(1, 2).reshape(-1, y.shape[1])
        # a copy in float64 (the statistics are accumulated in it): in sequential mode the targets
        # wait for the other model's pass, and an in-place op after the layer must not change them
        y = y.to(torch.float64, copy=True)
        return y if bias is None else y - bias.detach().double()

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
        n_feat = x.shape[1] * int(torch.tensor(self.module.kernel_size).prod())
        per_image = n_feat * max(1, x.shape[2] * x.shape[3])
        step = max(1, _UNFOLD_CHUNK // per_image)
        for start in range(0, x.shape[0], step):
            cols = conv_patches(self.module, x[start : start + step])  # (b, F, L)
            if idx is not None:
                sel = idx[start : start + step]
                cols = cols.gather(2, sel[:, None, :].expand(-1, cols.shape[1], -1))
            yield slice(start, start + step), cols.transpose(1, 2).reshape(-1, cols.shape[1])

    def update(self, x: torch.Tensor, y_all: torch.Tensor, idx: torch.Tensor | None) -> None:
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
    reference: nn.Module | None = None,
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
    reference : nn.Module, optional
        Gives the targets (the original model, when ``model`` is partially pruned): both run on each
        batch and share the sampled positions. Default: ``model`` itself.
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
    if reference is not None and not isinstance(reference, nn.Module):
        raise ValueError(f"`reference` must be a torch.nn.Module or None, got {type(reference).__name__}.")
    for arg, value in (("positions_per_image", positions_per_image), ("max_batches", max_batches)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"`{arg}` must be a positive integer or None, got {value!r}.")
    names = list(dict.fromkeys(c.name if isinstance(c, Consumer) else c for c in consumers))
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError("`consumers` must be a non-empty iterable of Consumer or module names.")
    gen = torch.Generator().manual_seed(int(seed))
    streams = {n: _ConsumerStream(n, _module(model, n, "model"), positions_per_image, gen) for n in names}
    if reference is not None:
        for n in names:
            ref = _module(reference, n, "reference")
            if type(ref) is not type(streams[n].module):
                raise ValueError(f"consumer {n!r} is a {type(ref).__name__} in `reference` but a "
                                 f"{type(streams[n].module).__name__} in `model`.")
            streams[n].bias = ref.bias
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    n_batches = 0
    with _eval(model, reference), torch.no_grad():
        total = len(batches) if hasattr(batches, "__len__") else None
        if total is not None and max_batches is not None:
            total = min(total, max_batches)
        for batch in tqdm(batches, total=total, disable=not progress, desc="calibration", leave=False):
            if max_batches is not None and n_batches >= max_batches:
                break
            inputs = _to(_batch_input(batch), device)
            for s in streams.values():
                s.batch = n_batches
            if reference is None:
                with _hooks(model, streams, _record_own):
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
    stream.update(inputs[0], stream.targets(output, idx), idx)


def _record_targets(stream: _ConsumerStream, inputs: tuple, output: torch.Tensor) -> None:
    idx = stream.draw(output)
    stream.pending.append((_n_positions(output), idx, stream.targets(output, idx)))


def _record_inputs(stream: _ConsumerStream, inputs: tuple, output: torch.Tensor) -> None:
    if not stream.pending:
        raise ValueError(f"consumer {stream.name!r} ran in `model` but not in `reference`.")
    n_pos, idx, y = stream.pending.pop(0)
    if _n_positions(output) != n_pos:
        raise ValueError(f"consumer {stream.name!r} has output shape {tuple(output.shape)} in `model`, "
                         f"which does not match its {n_pos} rows per sample in `reference`.")
    stream.update(inputs[0], y, idx)


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
