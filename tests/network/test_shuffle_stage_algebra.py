"""The index algebra of ``formulations/split_and_shuffle.md`` section 2.1 (not built into orprune yet): in a
ShuffleNetV2 stage (a stride-2 block, then stride-1 blocks), the kept set ``Q`` of the stride-2 branch outputs
fixes every other kept set, and pruning commutes with the chunks and shuffles iff ``Q`` is balanced at every
level. Checked on tensors: the ops applied to the kept channels equal the kept entries of the ops applied to all."""

from __future__ import annotations

import random

import torch

from orprune.examples.coverage_zoo import channel_shuffle

H = 8  # channels per branch


def _stage(q: list[int], blocks: int) -> bool:
    """Whether the pruned stage (``blocks`` stride-1 blocks) computes the kept entries of the full one."""
    gen = torch.Generator().manual_seed(len(q))
    b1, b2 = torch.randn(1, H, 1, 1, generator=gen), torch.randn(1, H, 1, 1, generator=gen)
    full = channel_shuffle(torch.cat([b1, b2], 1), 2)
    kept = sorted([2 * i for i in q] + [2 * i + 1 for i in q])
    pruned = channel_shuffle(torch.cat([b1[:, q], b2[:, q]], 1), 2)
    if not torch.equal(pruned, full[:, kept]):
        return False
    for t in range(1, blocks + 1):
        f = torch.randn(1, H, 1, 1, generator=gen)  # the stride-1 branch's output (its last 1x1 conv)
        x1, _ = full.chunk(2, 1)
        x1_pruned, _ = pruned.chunk(2, 1)
        p = [k for k in kept if k < H]  # the kept positions of x1, which f must keep too
        if x1_pruned.shape[1] != len(p) or not torch.equal(x1_pruned, x1[:, p]):
            return False  # the chunk boundary moved: the halves kept different counts
        full = channel_shuffle(torch.cat([x1, f], 1), 2)
        pruned = channel_shuffle(torch.cat([x1_pruned, f[:, p]], 1), 2)
        kept = sorted([2 * j for j in p] + [2 * j + 1 for j in p])
        if not torch.equal(pruned, full[:, kept]):
            return False
        # the closed form: the 2^(t+1) channels of each position i < H / 2^t
        assert kept == sorted(2 ** (t + 1) * i + r for i in q if i < H // 2 ** t for r in range(2 ** (t + 1)))
    return True


def test_balanced_kept_sets_commute_with_chunk_and_shuffle():
    rng = random.Random(0)
    for _ in range(50):
        m = rng.randint(1, H // 4)
        q = sorted(rng.sample(range(H // 4), m) + rng.sample(range(H // 4, H // 2), m)
                   + rng.sample(range(H // 2, H), 2 * m))
        assert _stage(q, blocks=2)


def test_unbalanced_kept_sets_do_not():
    assert not _stage([0, 1, 2], blocks=1)  # |Q ∩ [0, H/2)| = 3, |Q ∩ [H/2, H)| = 0
    assert _stage([0, 1, 4, 5], blocks=1)  # balanced at level 1 ...
    assert not _stage([0, 1, 4, 5], blocks=2)  # ... not at level 2 (|Q ∩ [0, H/4)| = 2, not 1)
