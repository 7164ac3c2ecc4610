"""Reference architectures for demos, notebooks and benchmarks (no torchvision needed).

``resnet20`` is the CIFAR-style ResNet of He et al. (2016) (three stages of basic blocks, 16/32/64
channels, 1x1 conv + BN projection shortcuts where the shape changes); ``vgg_small`` a VGG adapted
to 28x28 (three stages of two 3x3 conv + BN + ReLU, max-pooling between stages, no residuals: every
conv's output channels are prunable); ``SmallCNN`` is the demo's plain conv net. All accept 1-channel
28x28 (Fashion-MNIST) and 8x8 (digits) inputs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["BasicBlock", "CifarResNet", "SmallCNN", "SmallVGG", "resnet20", "resnet56", "vgg_small"]


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"`depth` must be 6n + 2, got {depth}.")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, in_planes = [], widths[0]
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def resnet20(num_classes: int = 10, in_channels: int = 1) -> CifarResNet:
    return CifarResNet(20, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 1) -> CifarResNet:
    return CifarResNet(56, num_classes, in_channels)


class SmallCNN(nn.Module):
    """3x3 conv + BN + ReLU stages, 2x2 max-pooling after the 1st and 2nd (28 -> 14 -> 7: it
    trains on Fashion-MNIST in about a minute on a CPU), global average pooling and a Linear
    classifier. The default widths give consumer layers with 16, 32 and 64 input channels."""

    def __init__(self, in_channels: int = 1, n_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(previous, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            if i in (0, 1):
                layers.append(nn.MaxPool2d(2))
            previous = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(previous, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class SmallVGG(nn.Module):
    """VGG-style stages of 3x3 conv + BN + ReLU, 2x2 max-pooling between stages (28 -> 14 -> 7),
    global average pooling and a Linear classifier."""

    def __init__(self, in_channels: int = 1, n_classes: int = 10,
                 stages: tuple[tuple[int, ...], ...] = ((16, 16), (32, 32), (64, 64))) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for i, stage in enumerate(stages):
            if i:
                layers.append(nn.MaxPool2d(2))
            for width in stage:
                layers += [nn.Conv2d(previous, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                           nn.ReLU(inplace=True)]
                previous = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(previous, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def vgg_small(num_classes: int = 10, in_channels: int = 1) -> SmallVGG:
    return SmallVGG(in_channels, num_classes)
