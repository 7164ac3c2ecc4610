"""Small hand-written networks built from the pieces of issue 21: concatenation (DenseNet), grouped
convolutions (ResNeXt), fused norms. Random initialisation, widths of a few channels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DenseLayer", "DenseNet", "ResNeXt", "ResNeXtBlock", "randomize_batchnorm"]


class DenseLayer(nn.Module):
    """torchvision's DenseNet layer: BN-ReLU-conv1x1 (bottleneck) then BN-ReLU-conv3x3 (growth)."""

    def __init__(self, in_channels: int, growth: int, bottleneck: int = 2):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, bottleneck * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bottleneck * growth)
        self.conv2 = nn.Conv2d(bottleneck * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv1(F.relu(self.norm1(torch.cat(features, 1))))
        return self.conv2(F.relu(self.norm2(x)))


class DenseNet(nn.Module):
    """A stem, one dense block of ``n_layers`` layers (each reads the concatenation of all earlier
    outputs), a transition (BN-ReLU-conv1x1-pool), a second block, and a BN + Linear head."""

    def __init__(self, growth: int = 4, n_layers: int = 3, stem: int = 8, n_classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, stem, 3, padding=1, bias=False)
        channels = stem
        self.block1 = nn.ModuleList()
        for _ in range(n_layers):
            self.block1.append(DenseLayer(channels, growth))
            channels += growth
        self.trans_norm = nn.BatchNorm2d(channels)
        self.trans_conv = nn.Conv2d(channels, channels // 2, 1, bias=False)
        channels //= 2
        self.block2 = nn.ModuleList()
        for _ in range(n_layers):
            self.block2.append(DenseLayer(channels, growth))
            channels += growth
        self.norm = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, n_classes)

    @staticmethod
    def _block(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in layers:
            features.append(layer(features))
        return torch.cat(features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._block(self.block1, self.stem(x))
        x = F.avg_pool2d(self.trans_conv(F.relu(self.trans_norm(x))), 2)
        x = F.relu(self.norm(self._block(self.block2, x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (as after training); eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.5 * torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=gen))
    return model.eval()


class ResNeXtBlock(nn.Module):
    """torchvision's ResNeXt bottleneck: 1x1 reduce, 3x3 grouped conv (``groups`` paths), 1x1 expand,
    residual add (with a 1x1 projection when the widths differ)."""

    def __init__(self, in_channels: int, width: int, out_channels: int, groups: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        self.downsample = None
        if in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNeXt(nn.Module):
    """A stem and two ResNeXt blocks (4 paths of width 2 each: 8 grouped channels), pooled Linear head."""

    def __init__(self, stem: int = 8, width: int = 8, out_channels: int = 16, groups: int = 4, n_classes: int = 5):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem)
        self.block1 = ResNeXtBlock(stem, width, out_channels, groups)
        self.block2 = ResNeXtBlock(out_channels, width, out_channels, groups)
        self.fc = nn.Linear(out_channels, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
