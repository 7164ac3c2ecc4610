"""YOLOv8's C2f block (a CSP-style split by ``chunk``) in miniature, for the coverage suite.

``y = list(cv1(x).chunk(2, 1)); y.extend(m(y[-1]) for m in bottlenecks); cv2(cat(y, 1))``: the producer
``cv1``'s output is chunked into two equal parts, the second read by the first bottleneck, both concatenated
again with every bottleneck's output before ``cv2`` (``formulations/split_and_shuffle.md``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["C2f", "C2fNet", "ConvBNSiLU", "SPPF", "YoloBottleneck", "YoloV8Backbone"]


class ConvBNSiLU(nn.Module):
    """YOLOv8's ``Conv``: conv (no bias), BatchNorm, SiLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.bn(self.conv(x)))


class YoloBottleneck(nn.Module):
    """YOLOv8's ``Bottleneck``: two 3x3 ``Conv``; with ``shortcut`` the input is added to the output."""

    def __init__(self, channels: int, shortcut: bool = False):
        super().__init__()
        self.cv1, self.cv2 = ConvBNSiLU(channels, channels, 3), ConvBNSiLU(channels, channels, 3)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.shortcut else y


class C2f(nn.Module):
    """YOLOv8's ``C2f``: ``cv1`` to ``2 c`` channels, chunked in two; each bottleneck reads the last part;
    ``cv2`` reads the concatenation of both parts and every bottleneck's output."""

    def __init__(self, in_channels: int, out_channels: int, n: int = 1, shortcut: bool = False):
        super().__init__()
        self.c = out_channels // 2
        self.cv1 = ConvBNSiLU(in_channels, 2 * self.c)
        self.cv2 = ConvBNSiLU((2 + n) * self.c, out_channels)
        self.m = nn.ModuleList(YoloBottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class C2fNet(nn.Module):
    """A stem ``Conv``, two C2f blocks (one and two bottlenecks) with a stride-2 ``Conv`` between, a Linear head."""

    def __init__(self, widths: tuple[int, int] = (16, 24), n_classes: int = 5, shortcut: bool = False):
        super().__init__()
        self.stem = ConvBNSiLU(3, 8, 3)
        self.block1 = C2f(8, widths[0], 1, shortcut)
        self.down = ConvBNSiLU(widths[0], widths[1], 3, 2)
        self.block2 = C2f(widths[1], widths[1], 2, shortcut)
        self.fc = nn.Linear(widths[1], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.down(self.block1(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SPPF(nn.Module):
    """YOLOv8's ``SPPF``: ``cv1`` to half the channels, three 5x5 max pools in a row, ``cv2`` on the concatenation."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.cv1 = ConvBNSiLU(in_channels, in_channels // 2)
        self.cv2 = ConvBNSiLU(in_channels // 2 * 4, out_channels)
        self.m = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class YoloV8Backbone(nn.Module):
    """YOLOv8's backbone (``yolov8{n,s}.yaml`` layers 0-9: stride-2 ``Conv`` and C2f with ``shortcut=True``, then
    SPPF) with a pooled Linear head, so that it can be pruned as a classifier. ``scale`` "n" (widths 16..256, C2f
    depths 1, 2, 2, 1) or "s" (widths 32..512)."""

    def __init__(self, scale: str = "n", n_classes: int = 10):
        super().__init__()
        if scale not in ("n", "s"):
            raise ValueError(f"`scale` must be 'n' or 's', got {scale!r}.")
        w = [c // (4 if scale == "n" else 2) for c in (64, 128, 256, 512, 1024)]
        layers: list[nn.Module] = [ConvBNSiLU(3, w[0], 3, 2)]
        for i, depth in enumerate((1, 2, 2, 1)):
            layers += [ConvBNSiLU(w[i], w[i + 1], 3, 2), C2f(w[i + 1], w[i + 1], depth, shortcut=True)]
        layers.append(SPPF(w[4], w[4]))
        self.model = nn.Sequential(*layers)
        self.fc = nn.Linear(w[4], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.model(x), 1).flatten(1))
