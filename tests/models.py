"""Architectures for the tests, written out with torchvision's module structure and attribute names.

torchvision does not import beside the CPU torch build used here, but orprune must accept torchvision
models: these copies have the same modules, names and forward code paths (in-place residual adds, a
ReLU module reused twice per block, functional pooling in MobileNetV2, flatten before the classifier),
so torch-pruning traces the same graph. Widths are scaled by ``width`` so tests stay fast; ``width=1``
gives the published architectures.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

__all__ = [
    "SMALL",
    "BasicBlock",
    "CifarResNet",
    "InvertedResidual",
    "MobileNetV2",
    "ResNet",
    "VGG",
    "calibrate_batchnorm",
    "one_thread",
    "mobilenet_v2",
    "resnet18",
    "resnet20",
    "small_model",
    "vgg11_bn",
]


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


# --------------------------------------------------------------------------- ResNets (torchvision)
def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    """torchvision's ResNet with basic blocks (``resnet18``: ``layers=[2, 2, 2, 2]``)."""

    def __init__(
        self, layers: list[int], num_classes: int = 1000, width: float = 1.0, in_channels: int = 3
    ):
        super().__init__()
        widths = [_scaled(c, width) for c in (64, 128, 256, 512)]
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3] * BasicBlock.expansion, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet18(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> ResNet:
    return ResNet([2, 2, 2, 2], num_classes=num_classes, width=width, in_channels=in_channels)


class CifarResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, section 4.2): 3x3 stem, three stages of basic blocks with
    16/32/64 channels, 1x1-conv + BN downsample shortcuts, global average pooling, one Linear."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"`depth` must be 6n + 2, got {depth}.")
        n = (depth - 2) // 6
        widths = [_scaled(c, width) for c in (16, 32, 64)]
        self.inplanes = widths[0]
        self.conv1 = conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(widths[0], n)
        self.layer2 = self._make_layer(widths[1], n, stride=2)
        self.layer3 = self._make_layer(widths[2], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[2], num_classes)

    _make_layer = ResNet._make_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet20(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    return CifarResNet(20, num_classes=num_classes, in_channels=in_channels, width=width)


# --------------------------------------------------------------------------- VGG (torchvision)
class VGG(nn.Module):
    def __init__(
        self, features: nn.Module, num_classes: int = 1000, hidden: int = 4096, dropout: float = 0.5
    ):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        last = [m for m in features.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        self.classifier = nn.Sequential(
            nn.Linear(last * 7 * 7, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg11_bn(num_classes: int = 10, width: float = 1.0, hidden: int = 4096, in_channels: int = 3) -> VGG:
    cfg: list[int | str] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
    layers: list[nn.Module] = []
    c_in = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            c_out = _scaled(int(v), width)
            conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)
            layers += [conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
    return VGG(nn.Sequential(*layers), num_classes=num_classes, hidden=hidden)


# --------------------------------------------------------------------------- MobileNetV2 (torchvision)
def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class Conv2dNormActivation(nn.Sequential):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        activation_layer: Callable[..., nn.Module] = nn.ReLU6,
    ):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            activation_layer(inplace=True),
        )
        self.out_channels = out_channels


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden_dim, kernel_size=1))
        layers += [
            Conv2dNormActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup
        self._is_cn = stride > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2):
        super().__init__()
        settings = [  # expansion t, channels c, repeats n, first stride s
            [1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2],
            [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1],
        ]
        input_channel = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [Conv2dNormActivation(3, input_channel, stride=2)]
        for t, c, n, s in settings:
            output_channel = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(Conv2dNormActivation(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v2(num_classes: int = 10, width: float = 1.0) -> MobileNetV2:
    return MobileNetV2(num_classes=num_classes, width_mult=width)


# --------------------------------------------------------------------------- helpers
@torch.no_grad()
def calibrate_batchnorm(
    model: nn.Module, example: torch.Tensor, *, steps: int = 3, seed: int = 0
) -> nn.Module:
    """Give every BatchNorm random affine parameters and running statistics from a few train-mode
    passes, so that tests do not run on the degenerate identity initialisation. Returns ``model`` in
    eval mode."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
            m.momentum = None  # cumulative average over the passes
            m.reset_running_stats()
    model.train()
    for _ in range(steps):
        model(example + 0.1 * torch.randn(example.shape, generator=gen))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
    return model.eval()


#: Small configurations for fast tests: name -> (builder, input shape of one sample).
SMALL: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int]]] = {
    "resnet20": (lambda: resnet20(width=0.5), (3, 16, 16)),
    "resnet18": (lambda: resnet18(width=1 / 16), (3, 32, 32)),
    "vgg11_bn": (lambda: vgg11_bn(width=1 / 16, hidden=32), (3, 32, 32)),
    "mobilenet_v2": (lambda: mobilenet_v2(width=0.25), (3, 32, 32)),
}


def small_model(name: str, batch: int = 4, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A small model of ``SMALL`` with calibrated BatchNorm, in eval mode, and an input batch."""
    builder, shape = SMALL[name]
    torch.manual_seed(seed)
    model = builder()
    example = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed + 1))
    return calibrate_batchnorm(model, example, seed=seed), example


def fitted_greedy_pruner(name: str = "resnet20", n_batches: int = 2):
    """``(model, example, pruner)``: a greedy ``orprune.Pruner`` fitted on ``n_batches`` random batches of 8 for
    a ``SMALL`` model (8 positions per image, no progress bars; tracing warnings silenced)."""
    import warnings

    import orprune

    model, example = small_model(name)
    gen = torch.Generator().manual_seed(0)
    calibration = [torch.randn(8, *example.shape[1:], generator=gen) for _ in range(n_batches)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruner = orprune.Pruner(solver="greedy", progress=False, positions_per_image=8).fit(model, calibration)
    return model, example, pruner


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Run a test module single-threaded (torch and numpy's BLAS): on the shared 2-core machine,
    intra-op threads of small layers spin against other processes and run 10-30x slower than one
    thread. Import it into a test module to apply it there."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # numpy's BLAS then keeps its threads
        limits = contextlib.nullcontext()
    else:
        limits = threadpool_limits(1)
    with limits:
        yield
    torch.set_num_threads(n)


class TinyNet(nn.Module):
    """Three convs, two prunable units of four channels: small enough to enumerate every allocation."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x)))))
