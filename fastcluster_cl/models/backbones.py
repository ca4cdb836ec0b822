"""Feature extractors: torchvision ResNets (optionally with the CIFAR stem) and a small CNN for
tiny images (8x8 digits, 28x28 MNIST). Each maps (N, C, H, W) images to (N, F) features and
exposes F as `feature_dim`."""

from __future__ import annotations

import torch
from torch import nn

from .._compat import ensure_torchvision_importable

RESNETS = ("resnet18", "resnet34", "resnet50")
BACKBONES = ("small_cnn", "digit_cnn") + RESNETS


class ResNetBackbone(nn.Module):
    """A torchvision ResNet trained from scratch, without its classifier.

    With `cifar_stem` the 7x7 stride-2 convolution and the max-pool are replaced by one 3x3
    stride-1 convolution, the usual choice for 32x32 inputs (SimCLR, CC): the ImageNet stem
    would shrink a CIFAR image to 8x8 before the first residual block.
    """

    def __init__(self, name: str = "resnet18", in_channels: int = 3, cifar_stem: bool = False):
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"ResNet backbone must be one of {RESNETS}, got {name!r}")
        ensure_torchvision_importable()
        import torchvision.models as tvm

        net = getattr(tvm, name)(weights=None)
        if cifar_stem:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages (widths w, 2w, 4w; the last two downsample by 2) and global
    average pooling: enough for 8x8 to 32x32 images and fast on a CPU."""

    def __init__(self, in_channels: int = 1, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            _conv_bn_relu(in_channels, width),
            _conv_bn_relu(width, width),
            _conv_bn_relu(width, 2 * width, stride=2),
            _conv_bn_relu(2 * width, 4 * width, stride=2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.feature_dim = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DigitCNN(nn.Module):
    """Four conv-BN-ReLU layers (widths 32, 64, 128, 128), a 2 x 2 max-pool after each of the
    first three, then global average pooling. On 28 px the pools give 14, 7 and 3 px, so the last
    layer's 3 x 3 convolutions see the whole digit (receptive field 36 px); SmallCNN's features
    see about 11 px before pooling. On 8 px digits the pools give 4, 2, 1 px. The measurements
    against SmallCNN are in docs/methods.md ("Digit augmentation and backbone")."""

    def __init__(self, in_channels: int = 1, widths: tuple[int, ...] = (32, 64, 128, 128)):
        super().__init__()
        layers, cin = [], in_channels
        for i, w in enumerate(widths):
            layers.append(_conv_bn_relu(cin, w))
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            cin = w
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.feature_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_backbone(name: str, in_channels: int, cifar_stem: bool = False) -> nn.Module:
    """`name` from BACKBONES; `cifar_stem` applies to ResNets only."""
    if name in ("small_cnn", "digit_cnn"):
        if cifar_stem:
            raise ValueError(f"cifar_stem applies to ResNet backbones, not {name}")
        return SmallCNN(in_channels) if name == "small_cnn" else DigitCNN(in_channels)
    if name in RESNETS:
        return ResNetBackbone(name, in_channels, cifar_stem)
    raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")
