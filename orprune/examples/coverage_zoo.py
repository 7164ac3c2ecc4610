"""Networks built from the pieces of issue 21, for the coverage suite: concatenation (DenseNet), grouped
convolutions (ResNeXt), parallel branches concatenated (Inception), split and channel shuffle (ShuffleNetV2), chunk
(YOLOv8's C2f without and with the bottleneck shortcut, :mod:`orprune.examples.csp_zoo`), fused
norms and token MLPs, LayerNorm / GroupNorm over the channels, and ``transformers`` vision models at tiny widths.

Random initialisation (BatchNorm statistics randomised as after training), a few channels per layer, 16x16
or 32x32 inputs: :data:`CASES` maps a name to a builder returning ``(model, calibration batches)``.
``transformers`` is imported only by its builders (``pip install transformers``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from orprune.examples.csp_zoo import C2fNet

__all__ = [
    "CASES",
    "BatchNormAct2d",
    "ConvBN",
    "DenseLayer",
    "DenseNet",
    "FusedNet",
    "Inception",
    "InceptionBlock",
    "LayerNorm2d",
    "NormNet",
    "ResNeXt",
    "ResNeXtBlock",
    "ShuffleBlock",
    "ShuffleNetV2",
    "TRANSFORMERS_CASES",
    "channel_shuffle",
    "randomize_batchnorm",
]


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

    def __init__(self, growth: int = 4, n_layers: int = 3, stem: int = 8, n_classes: int = 5, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)
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
    residual add (with a 1x1 projection when the widths or the resolution differ; ``stride`` on the 3x3)."""

    def __init__(self, in_channels: int, width: int, out_channels: int, groups: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        self.downsample = None
        if in_channels != out_channels or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNeXt(nn.Module):
    """A stem and two ResNeXt blocks (4 paths of width 2 each: 8 grouped channels), pooled Linear head;
    ``stride`` is the second block's."""

    def __init__(self, stem: int = 8, width: int = 8, out_channels: int = 16, groups: int = 4, n_classes: int = 5,
                 in_channels: int = 3, stride: int = 1):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem)
        self.block1 = ResNeXtBlock(stem, width, out_channels, groups)
        self.block2 = ResNeXtBlock(out_channels, width, out_channels, groups, stride)
        self.fc = nn.Linear(out_channels, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ConvBN(nn.Sequential):
    """torchvision's ``BasicConv2d``: conv (no bias), BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())


class InceptionBlock(nn.Module):
    """GoogLeNet's Inception module: 1x1; 1x1 -> 3x3; 1x1 -> 3x3 -> 3x3; 3x3 max-pool -> 1x1; concatenated."""

    def __init__(self, in_channels: int, b1: int, r3: int, b3: int, r5: int, b5: int, pool: int):
        super().__init__()
        self.branch1 = ConvBN(in_channels, b1, 1)
        self.branch2 = nn.Sequential(ConvBN(in_channels, r3, 1), ConvBN(r3, b3, 3))
        self.branch3 = nn.Sequential(ConvBN(in_channels, r5, 1), ConvBN(r5, b5, 3), ConvBN(b5, b5, 3))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), ConvBN(in_channels, pool, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class Inception(nn.Module):
    """A GoogLeNet in miniature: a stem, two Inception modules with a max-pool between, pooled Linear head."""

    def __init__(self, n_classes: int = 5):
        super().__init__()
        self.stem = ConvBN(3, 12, 3)
        self.block1 = InceptionBlock(12, 8, 6, 8, 4, 4, 4)  # 24 channels out
        self.block2 = InceptionBlock(24, 8, 8, 12, 4, 6, 6)  # 32 channels out
        self.fc = nn.Linear(32, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.block1(self.stem(x)), 2)
        x = self.block2(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle: channel ``g * per + i`` moves to ``i * groups + g``."""
    b, c, h, w = x.size()
    x = torch.transpose(x.view(b, groups, c // groups, h, w), 1, 2).contiguous()
    return x.view(b, c, h, w)


class ShuffleBlock(nn.Module):
    """torchvision's ShuffleNetV2 ``InvertedResidual``. Stride 1: split the channels in two halves, keep the
    first, run the second through 1x1 -> depthwise 3x3 -> 1x1; stride 2: both branches read the whole input.
    Concatenate and shuffle."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride, half = stride, out_channels // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False),
                nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, half, 1, bias=False), nn.BatchNorm2d(half),
                nn.ReLU())
        branch_in = in_channels if stride > 1 else half
        self.branch2 = nn.Sequential(
            nn.Conv2d(branch_in, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """A ShuffleNetV2 in miniature: stem, two stages of a stride-2 and a stride-1 block, 1x1 conv5, head.

    One stride-1 block per stage: torch-pruning 1.6 cannot trace two in a row (a ``ZeroDivisionError`` in its
    reshape index mapping), so neither library could prune torchvision's stages of 3-7 stride-1 blocks.
    """

    def __init__(self, widths: tuple[int, int] = (16, 32), n_classes: int = 5, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.stage = nn.Sequential(ShuffleBlock(8, widths[0], 2), ShuffleBlock(widths[0], widths[0], 1),
                                   ShuffleBlock(widths[0], widths[1], 2), ShuffleBlock(widths[1], widths[1], 1))
        self.conv5 = nn.Sequential(nn.Conv2d(widths[1], 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.fc = nn.Linear(24, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stage(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's fused BatchNorm + ReLU: ``F.batch_norm`` inside the module's own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = self.training and self.track_running_stats
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training,
                         self.momentum, self.eps)
        return F.relu(x)


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm over the channels of an NCHW tensor: permute, ``F.layer_norm``, permute."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class FusedNet(nn.Module):
    """Two conv + fused-BN layers, then a token MLP (Linear on ``(B, T, C)``, residual) and a head."""

    def __init__(self, layer_norm: bool = False, offset: bool = False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), BatchNormAct2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 12, 3, padding=1), BatchNormAct2d(12)
        self.norm = LayerNorm2d(12) if layer_norm else None
        self.offset = nn.Parameter(torch.randn(12, 1, 1)) if offset else None  # not any module's own
        self.fc1, self.fc2 = nn.Linear(12, 24), nn.Linear(24, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        if self.norm is not None:
            x = self.norm(x)
        if self.offset is not None:
            x = x + self.offset
        tokens = x.flatten(2).transpose(1, 2)  # (B, T, C)
        tokens = tokens + self.fc2(F.gelu(self.fc1(tokens)))
        return self.head(tokens.mean(1))


class NormNet(nn.Module):
    """Norms over the channels: conv -> GroupNorm(2) -> conv -> LayerNorm2d -> tokens -> Linear ->
    LayerNorm -> token MLP (residual) -> head (``formulations/channel_norms.md``)."""

    def __init__(self, n_classes: int = 4):
        super().__init__()
        self.conv1, self.gn = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.conv2, self.ln2d = nn.Conv2d(8, 12, 3, padding=1), LayerNorm2d(12)
        self.fc0, self.ln = nn.Linear(12, 10), nn.LayerNorm(10)
        self.fc1, self.fc2 = nn.Linear(10, 16), nn.Linear(16, 10)
        self.head = nn.Linear(10, n_classes)
        with torch.no_grad():  # non-trivial affine parameters, as after training
            for m in (self.gn, self.ln2d, self.ln):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln2d(self.conv2(F.relu(self.gn(self.conv1(x)))))
        tokens = self.fc0(x.flatten(2).transpose(1, 2))  # (B, T, C)
        tokens = tokens + self.fc2(F.gelu(self.fc1(self.ln(tokens))))
        return self.head(tokens.mean(1))


class _Logits(nn.Module):
    """A ``transformers`` image classifier as ``pixel_values -> logits``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def _hf(name: str) -> nn.Module:
    import transformers as T

    configs: dict[str, Callable[[], nn.Module]] = {
        "hf_resnet": lambda: T.ResNetForImageClassification(T.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="bottleneck", num_labels=5)),
        "hf_regnet": lambda: T.RegNetForImageClassification(T.RegNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=4, num_labels=5)),
        "hf_convnext": lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
            num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5)),
        "hf_mobilenet_v2": lambda: T.MobileNetV2ForImageClassification(T.MobileNetV2Config(
            depth_multiplier=0.25, image_size=32, num_labels=5)),
        "hf_efficientnet": lambda: T.EfficientNetForImageClassification(T.EfficientNetConfig(
            width_coefficient=0.25, depth_coefficient=0.1, hidden_dim=320, dropout_rate=0.0, image_size=32, num_labels=5)),
    }
    return _Logits(configs[name]())


def _batches(size: int, n: int = 3, batch: int = 8, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=gen) for _ in range(n)]


def _case(build: Callable[[], nn.Module], size: int) -> Callable[[], tuple[nn.Module, list[torch.Tensor]]]:
    def make() -> tuple[nn.Module, list[torch.Tensor]]:
        torch.manual_seed(0)
        return randomize_batchnorm(build()), _batches(size)
    return make


@torch.no_grad()
def _default_init(model: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """PyTorch's default initialisation of every conv and Linear (``transformers`` draws weights of std
    0.02, under which activations vanish within a few layers and every error is zero), then BatchNorm
    statistics measured on ``batches``; eval mode."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.reset_parameters()
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
    model.train()
    for x in batches:
        model(x)
    return model.eval()


def _hf_case(name: str) -> Callable[[], tuple[nn.Module, list[torch.Tensor]]]:
    def make() -> tuple[nn.Module, list[torch.Tensor]]:
        torch.manual_seed(0)
        batches = _batches(32)
        return _default_init(_hf(name), batches), batches
    return make


#: Hand-written cases: name -> builder of (model in eval mode, calibration batches).
CASES: dict[str, Callable[[], tuple[nn.Module, list[torch.Tensor]]]] = {
    "densenet": _case(DenseNet, 8),
    "resnext": _case(lambda: ResNeXt(width=16, groups=4), 8),
    "fused_bn_token_mlp": _case(FusedNet, 8),
    "fused_layernorm": _case(lambda: FusedNet(layer_norm=True), 8),
    "norms": _case(NormNet, 8),
    "inception": _case(Inception, 8),
    "shufflenet_v2": _case(ShuffleNetV2, 16),
    "c2f": _case(C2fNet, 16),
    "c2f_shortcut": _case(lambda: C2fNet(shortcut=True), 16),  # YOLOv8's backbone C2f (a residual add per bottleneck)
}
#: ``transformers`` cases (tiny configs, random init, 32x32 inputs).
TRANSFORMERS_CASES: dict[str, Callable[[], tuple[nn.Module, list[torch.Tensor]]]] = {
    name: _hf_case(name)
    for name in ("hf_resnet", "hf_regnet", "hf_convnext", "hf_mobilenet_v2", "hf_efficientnet")
}
