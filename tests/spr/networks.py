"""Small networks whose SPR channel groups are written out by hand, for the regulariser tests."""

from __future__ import annotations

import torch
from torch import nn

# ------------------------------------------------------------------------------------------------
# channel groups of small networks, written out by hand


class ConvBNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return torch.relu(out + (x if self.short is None else self.short(x)))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.blk1, self.blk2 = Block(4, 4, 1), Block(4, 6, 2)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.blk2(self.blk1(torch.relu(self.bn(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


class SelfCoupled(nn.Module):
    """x + b(x): b's input and output channels are the same channel, so b.weight[c, c] is touched twice."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 2)

    def forward(self, x):
        x = self.a(x)
        return self.fc((x + self.b(x)).mean((2, 3)))


class FlattenMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc1, self.fc2 = nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn0 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.dw, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4)
        self.pw, self.bn2 = nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = self.bn1(self.dw(torch.relu(self.bn0(self.conv(x)))))
        return self.fc(torch.relu(self.bn2(self.pw(x))).mean((2, 3)))


def randomized(model: nn.Module, seed: int) -> nn.Module:
    """Weights away from 0 (so every entry has a nonzero gradient), in double precision."""
    gen = torch.Generator().manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            sign = torch.randint(0, 2, p.shape, generator=gen).double() * 2 - 1
            p.copy_(sign * (0.2 + torch.rand(p.shape, generator=gen, dtype=torch.float64)))
    return model


X = torch.randn(2, 3, 8, 8, dtype=torch.float64)

# Each group: list of (parameter name, index into that parameter). Index ":" is slice(None).
S = slice(None)


def expected_groups(name):
    if name == "convbn":
        return ([[("conv1.weight", c), ("conv1.bias", c), ("bn1.weight", c), ("bn1.bias", c)] for c in range(4)]
                + [[("conv2.weight", c), ("bn2.weight", c), ("bn2.bias", c)] for c in range(5)])
    if name == "resnet":
        bn = lambda p, c: [(f"{p}.weight", c), (f"{p}.bias", c)]  # noqa: E731
        return ([[("stem.weight", c), *bn("bn", c), ("blk1.c2.weight", c), *bn("blk1.b2", c)] for c in range(4)]
                + [[("blk1.c1.weight", c), *bn("blk1.b1", c)] for c in range(4)]
                + [[("blk2.c1.weight", c), *bn("blk2.b1", c)] for c in range(6)]
                + [[("blk2.c2.weight", c), *bn("blk2.b2", c), ("blk2.short.0.weight", c), *bn("blk2.short.1", c)]
                   for c in range(6)])
    if name == "selfcoupled":  # with include_consumers: b's row c and column c overlap in b.weight[c, c]
        return [[("a.weight", c), ("a.bias", c), ("b.weight", c), ("b.weight", (S, c)), ("b.bias", c),
                 ("fc.weight", (S, c))] for c in range(4)]
    if name == "flatten":  # with include_consumers: channel c is fc1's inputs 4c..4c+3 after the flatten
        return ([[("conv.weight", c), ("conv.bias", c), ("bn.weight", c), ("bn.bias", c),
                  ("fc1.weight", (S, slice(4 * c, 4 * c + 4)))] for c in range(4)]
                + [[("fc1.weight", j), ("fc1.bias", j), ("fc2.weight", (S, j))] for j in range(8)])
    if name == "depthwise":
        return ([[("conv.weight", c), ("conv.bias", c), ("bn0.weight", c), ("bn0.bias", c), ("dw.weight", c),
                  ("dw.bias", c), ("bn1.weight", c), ("bn1.bias", c)] for c in range(4)]
                + [[("pw.weight", c), ("pw.bias", c), ("bn2.weight", c), ("bn2.bias", c)] for c in range(6)])
    raise KeyError(name)


CASES = {
    "convbn": (ConvBNNet, False),
    "resnet": (ResNet, False),
    "selfcoupled": (SelfCoupled, True),
    "flatten": (FlattenMLP, True),
    "depthwise": (Depthwise, False),
}


def entry_set(model, spec) -> frozenset:
    """The (parameter, flat index) pairs of a hand-written group, each once."""
    params = dict(model.named_parameters())
    out = set()
    for pname, index in spec:
        flat = torch.arange(params[pname].numel()).reshape(params[pname].shape)
        out.update((pname, int(i)) for i in flat[index].reshape(-1))
    return frozenset(out)


def manual_vectors(model, m_scale, spec_groups):
    """Hand-gathered weight vectors and per-entry bounds: a layer's bound is m_scale times the largest
    absolute value of its parameter tensors that are penalised in some group."""
    params = dict(model.named_parameters())
    penalised = {p for spec in spec_groups for p, _ in spec}
    layer_max: dict[str, float] = {}
    for p in penalised:
        layer = p.rsplit(".", 1)[0]
        layer_max[layer] = max(layer_max.get(layer, 0.0), m_scale * float(params[p].detach().abs().max()))
    vecs, bounds = [], []
    for spec in spec_groups:
        entries = sorted(entry_set(model, spec))
        vecs.append(torch.stack([params[p].reshape(-1)[i] for p, i in entries]))
        bounds.append(torch.tensor([layer_max[p.rsplit(".", 1)[0]] for p, _ in entries], dtype=torch.float64))
    return vecs, bounds
