"""Per-consumer sampling for :mod:`orprune.network.calibration`: positions, design rows, targets, and the target cache.

A :class:`ConsumerStream` belongs to one consumer layer during one statistics pass: it draws the
sampled output positions, turns the layer's input into design-matrix rows (unfolded patches for a
convolution) and its output into least-squares targets, and feeds the accumulator. A
:class:`TargetCache` keeps the original model's sampled outputs so that later sequential passes
need neither the original model nor a new draw.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from orprune.layer.problem import StatisticsAccumulator
from orprune.layer.wide import WideAccumulator, channel_projection
from orprune.network._slabs import Slabs, half, unhalf
from orprune.network.patches import conv_patches, sampled_patches
from orprune.network.residual_targets import PassTaps, TargetOffset
from orprune.network.units import weight_matrix

__all__ = ["ConsumerStream", "TargetCache", "HALF_TARGETS"]

#: Default of ``TargetCache(half=...)``: store the cached targets in float16 with a power-of-two scale
#: (:func:`orprune.network._slabs.half`), half the memory of float32 for a relative error of at most 2^-12.
HALF_TARGETS = True

# Unfold at most this many elements at once (about 64 MB in float32); larger batches are chunked.
_UNFOLD_CHUNK = 1 << 24


class ConsumerStream:
    """Hooks of one consumer: draws positions, extracts rows, updates the accumulator."""

    def __init__(self, name: str, module: nn.Module, positions: int | None, gen: torch.Generator):
        if not (isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and not module.transposed)):
            raise ValueError(
                f"`consumers` entry {name!r} is a {type(module).__name__}; a consumer must be a "
                "Linear or a Conv2d."
            )
        self.name, self.module, self.positions, self.gen = name, module, positions, gen
        self.bias = module.bias  # of the layer giving the targets (the reference's in sequential mode)
        self.acc: StatisticsAccumulator | None = None
        self.pending: list[tuple[int, torch.Tensor | None, torch.Tensor]] = []  # (L, positions, rows)
        self.batch = -1
        self.calls = 0  # calls in the current batch's pass
        self.cache: TargetCache | None = None
        self.offset: TargetOffset | None = None  # set when this pass applies or records an offset
        self.taps: PassTaps | None = None
        self.ref_offset: torch.Tensor | None = None  # the reference's tapped rows of this batch
        self.float32 = False  # batch products in float32 (StatisticsAccumulator(float32=True))
        self.sketch: tuple[int, int] | None = None  # (g, s) of a wide consumer: a WideAccumulator

    def begin(self, batch: int) -> None:
        """A new forward pass over calibration batch ``batch``."""
        self.batch, self.calls = batch, 0
        if self.offset is not None:
            self.taps = PassTaps(self.name, self.offset, self.sample)

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

    def update(self, x: torch.Tensor, sampled: torch.Tensor, idx: torch.Tensor | None,
               offset: torch.Tensor | None = None) -> None:
        y_all = self.targets(sampled) if offset is None else self.targets(sampled) + offset
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
                self.acc = self._accumulator(rows.shape[1], y.shape[1])
            self.acc.update(rows, y)

    def _accumulator(self, n_features: int, n_outputs: int) -> StatisticsAccumulator | WideAccumulator:
        if self.sketch is None:
            return StatisticsAccumulator(n_features, n_outputs, float32=self.float32)
        g, s = self.sketch  # compressed selection statistics and the stored rows (orprune.layer.wide)
        projection = channel_projection(weight_matrix(self.module).detach(), n_features // g, g, s)
        return WideAccumulator(projection, n_outputs, float32=self.float32)


class TargetCache:
    """The original model's sampled outputs of each consumer, per calibration batch and call.

    Filled by :func:`collect_statistics` (``cache=``) and read back as its ``reference``: a later
    pass of a partially pruned model then needs neither the original model's forward pass nor a new
    draw of positions. It holds ``n_samples * positions_per_image * out_channels`` values per conv
    consumer (:attr:`nbytes`), and as many again per consumer given an offset (the reference's tapped
    tensors at the same positions). With ``half`` (default ``HALF_TARGETS``) float32 values are stored as float16
    times a power-of-two scale (11 significant bits, any range: half the memory, a relative error of at most 2^-12
    that the least squares averages out); else in the layer's dtype, exactly. On CPU the rows live in a few large
    buffers (:mod:`orprune.network._slabs`): thousands of small long-lived tensors would pin the malloc heap.
    """

    def __init__(self, half: bool | None = None) -> None:
        if half is not None and not isinstance(half, bool):
            raise ValueError(f"`half` must be True, False or None, got {half!r}.")
        self.half = HALF_TARGETS if half is None else half
        self._slabs = Slabs()
        self._rows: dict[str, dict[int, list[tuple[int, torch.Tensor | None, tuple]]]] = {}
        self._bias: dict[str, torch.Tensor | None] = {}
        self._offsets: dict[str, dict[int, tuple]] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._rows

    @property
    def n_batches(self) -> int:
        return max((len(b) for b in self._rows.values()), default=0)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored rows, positions and tapped rows."""
        stored = [t for batches in self._rows.values() for calls in batches.values() for _, idx, y in calls
                  for t in (idx, y[0]) if t is not None]
        stored += [t[0] for batches in self._offsets.values() for t in batches.values()]
        return sum(t.element_size() * t.numel() for t in stored)

    def _store(self, value: torch.Tensor) -> tuple[torch.Tensor, float, torch.dtype]:
        return half(self._slabs, value) if self.half else (self._slabs.store(value), 1.0, value.dtype)

    def _add(self, stream: ConsumerStream, entry: tuple[int, torch.Tensor | None, torch.Tensor]) -> None:
        if stream.name not in self._rows:
            self._rows[stream.name] = {}
            self._bias[stream.name] = None if stream.bias is None else stream.bias.detach().clone()
        n_pos, idx, rows = entry
        stored = (n_pos, None if idx is None else self._slabs.store(idx), self._store(rows))
        self._rows[stream.name].setdefault(stream.batch, []).append(stored)

    def _get(self, stream: ConsumerStream) -> tuple[int, torch.Tensor | None, torch.Tensor]:
        calls = self._rows[stream.name].get(stream.batch, [])
        if stream.calls >= len(calls):
            raise ValueError(f"the target cache holds {len(calls)} call(s) of consumer {stream.name!r} in "
                             f"batch {stream.batch}; `model` made more: give the batches the cache was made from.")
        n_pos, idx, rows = calls[stream.calls]
        return n_pos, idx, unhalf(rows)

    def _add_offset(self, stream: ConsumerStream, rows: torch.Tensor, dtype: torch.dtype) -> None:
        self._offsets.setdefault(stream.name, {})[stream.batch] = self._store(rows.to(dtype))

    def _get_offset(self, stream: ConsumerStream) -> torch.Tensor:
        rows = self._offsets.get(stream.name, {}).get(stream.batch)
        if rows is None:
            raise ValueError(f"the target cache holds no tapped rows of consumer {stream.name!r} in batch "
                             f"{stream.batch}: fill it with the same `offsets`.")
        return unhalf(rows)
