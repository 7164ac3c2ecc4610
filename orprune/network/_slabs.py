"""Compact storage of the :class:`TargetCache`'s rows: float16 with a power-of-two scale, in a few large buffers.

Half precision with one power-of-two scale per stored tensor keeps 11 significant bits of every value whatever
its range (float16's own range is 6e-5..65504): a relative rounding error of at most 2^-12 per target, which the
least-squares refit averages over thousands of rows (on ResNet-50 the held-out output error of the pruned model
moved by under 1e-6; bfloat16's 8 bits moved it by 5e-5, ``benchmarks/results/scale_network_224.md``). It halves
the cache, the largest thing a fit keeps (2.9 GB in float32 at 512 images).

The target cache keeps, for every consumer and calibration batch, a few kB to a few MB of sampled rows for the
whole life of a :class:`orprune.Pruner` (thousands of tensors on ResNet-50), while calibration allocates and frees
temporaries of the same sizes around them. glibc's ``malloc`` serves such sizes from its heap and can only give
memory back above the last live chunk, so the long-lived rows pin the freed temporaries between them: at 512
images of 224x224 the process held about 2.4 GB more than its live tensors after calibration
(``benchmarks/results/scale_network_224.md``). Buffers of ``SLAB_BYTES`` are above ``malloc``'s largest mmap
threshold (32 MB), so each is its own mapping and the heap only ever holds short-lived temporaries.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SLAB_BYTES", "Slabs", "half", "unhalf"]

#: Size of one buffer. Above glibc's largest mmap threshold (32 MiB), so every buffer is its own mapping.
SLAB_BYTES = 64 << 20

_ALIGN = 64  # bytes: every carved tensor starts on a cache line (any dtype's alignment)


class Slabs:
    """Copies of tensors stored back to back in ``SLAB_BYTES`` buffers (CPU only; other devices copy as usual).

    A tensor larger than a quarter of a buffer gets its own allocation (large enough to be mapped on its own); the
    unused tail of the last buffer is the only waste. Stored tensors are never freed one by one: the buffers live as
    long as the object (a cache is dropped whole).
    """

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        self._used = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers (stored data and the unused tail of the last buffer)."""
        return sum(b.numel() for b in self._buffers)

    def store(self, value: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A contiguous copy of ``value`` (converted to ``dtype`` when given) that never shares memory with it."""
        dtype = value.dtype if dtype is None else dtype
        size = value.numel() * torch.empty((), dtype=dtype).element_size()
        if value.device.type != "cpu" or size > SLAB_BYTES // 4 or size == 0:
            return value.detach().to(dtype=dtype, copy=True).contiguous()
        if not self._buffers or self._used + size > SLAB_BYTES:
            self._buffers.append(torch.empty(SLAB_BYTES, dtype=torch.uint8))
            self._used = 0
        out = self._buffers[-1][self._used : self._used + size].view(dtype).view(value.shape)
        out.copy_(value.detach())
        self._used += -(-size // _ALIGN) * _ALIGN
        return out


def half(slabs: Slabs, value: torch.Tensor) -> tuple[torch.Tensor, float, torch.dtype]:
    """``value`` (float32 / float64) stored as float16 times a power-of-two scale: ``(stored, scale, dtype)``.

    The scale puts the largest magnitude in ``[2^14, 2^15)``, so nothing overflows and values down to 2^-24 of the
    largest stay normal (11 significant bits). Other dtypes, and tensors with NaN / inf (which calibration rejects
    right after), are stored as they are.
    """
    dtype = value.dtype
    amax = float(value.detach().abs().max()) if value.numel() else 0.0
    if dtype not in (torch.float32, torch.float64) or not math.isfinite(amax) or amax == 0.0:
        return slabs.store(value), 1.0, dtype
    scale = math.ldexp(1.0, math.frexp(amax)[1] - 15)  # amax / scale in [2^14, 2^15)
    return slabs.store(value.detach() * (1.0 / scale), torch.float16), scale, dtype


def unhalf(stored: tuple[torch.Tensor, float, torch.dtype]) -> torch.Tensor:
    """The tensor :func:`half` stored, in its own dtype (exactly the float16 values times the scale)."""
    value, scale, dtype = stored
    return value.to(dtype) if scale == 1.0 else value.to(dtype) * scale
