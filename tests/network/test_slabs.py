"""The target cache's storage: tensors carved out of large buffers, and float16 with a power-of-two scale."""

import pytest
import torch

from orprune.network._slabs import SLAB_BYTES, Slabs, half, unhalf


def test_small_tensors_share_buffers_and_are_independent_copies():
    slabs = Slabs()
    values = [torch.randn(100, 7) for _ in range(50)] + [torch.arange(12).reshape(3, 4)]
    stored = [slabs.store(v) for v in values]
    assert len(slabs._buffers) == 1 and slabs.nbytes == SLAB_BYTES
    for v, s in zip(values, stored):
        assert torch.equal(v, s) and s.dtype == v.dtype and s.is_contiguous()
        assert s.untyped_storage().data_ptr() == slabs._buffers[0].untyped_storage().data_ptr()
    values[0].zero_()  # a copy: later changes of the source do not reach it
    assert stored[0].abs().sum() > 0
    stored[1].zero_()  # and stored tensors do not overlap
    assert torch.equal(stored[2], values[2])
    assert slabs.store(torch.randn(10), torch.float16).dtype == torch.float16


def test_large_tensors_get_their_own_allocation():
    slabs = Slabs()
    big = torch.randn(SLAB_BYTES // 4 // 4 + 1)
    out = slabs.store(big)
    assert torch.equal(out, big) and out.data_ptr() != big.data_ptr() and not slabs._buffers


@pytest.mark.parametrize("magnitude", [1e-30, 1e-6, 1.0, 1e6, 1e30])
def test_half_keeps_eleven_bits_at_any_magnitude(magnitude):
    x = torch.randn(4000) * magnitude * torch.logspace(-3, 3, 4000)  # six decades within one tensor
    stored = half(Slabs(), x)
    scale = stored[1]
    assert stored[0].dtype == torch.float16 and scale == 2.0 ** round(torch.tensor(scale).log2().item())
    back = unhalf(stored)
    assert back.dtype == torch.float32 and back.shape == x.shape
    # 11 significant bits down to 2^-24 of the largest magnitude (float16's normal range under the scale)
    assert bool(((back - x).abs() <= 2**-11 * x.abs() + 2**-24 * x.abs().max()).all())
    assert unhalf(half(Slabs(), back)).equal(back)  # float16 values times the scale: exact on the way back


def test_half_leaves_other_tensors_alone():
    for x in (torch.zeros(5), torch.tensor([1.0, float("inf")]), torch.arange(5), torch.randn(5).half()):
        stored = half(Slabs(), x)
        assert stored[1] == 1.0 and stored[0].dtype == x.dtype and torch.equal(unhalf(stored), x)
