"""Two ResNets as people write them, for ``onlynorm demo --resnet`` and the benchmark.

* :func:`resnet20` — the CIFAR ResNet-20 of He et al. (3×32×32 input, three stages of three basic blocks with
  16/32/64 channels, ``F.relu``, a ``shortcut`` Sequential with a 1×1 strided conv + BatchNorm where the shape
  changes, global average pooling, a linear classifier): about 0.27M parameters.
* :func:`resnet18` — torchvision's ResNet-18 layout (7×7/2 stem + 3×3/2 max-pool, ``BasicBlock`` with a
  ``downsample`` Sequential, ``out += identity``, ``nn.ReLU(inplace=True)``, ``AdaptiveAvgPool2d``,
  ``torch.flatten``) for 3×224×224 images: about 11.7M parameters.
* :func:`resnet50` — torchvision's ResNet-50 (``Bottleneck`` blocks: 1×1 → 3×3 (the stride) → 1×1 with expansion
  4, ``downsample`` = 1×1 strided conv + BatchNorm): about 25.6M parameters.

Both convert to onlynorm targets through ``torch.fx`` (:mod:`onlynorm.targets.fx`).

>>> sum(p.numel() for p in resnet20().parameters())
272474
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["resnet20", "resnet18", "resnet50", "CifarBlock", "BasicBlock", "Bottleneck"]


class CifarBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class ResNet20(nn.Module):
    def __init__(self, num_classes: int = 10, widths=(16, 32, 64), blocks: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, c = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(CifarBlock(c, w, 2 if (i > 0 and j == 0) else 1))
                c = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(c, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = self.pool(out)
        out = out.view(out.size(0), -1)
        return self.linear(out)


def resnet20(num_classes: int = 10, widths=(16, 32, 64), blocks: int = 3) -> nn.Module:
    return ResNet20(num_classes, widths, blocks)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
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


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (ResNet V1.5: the stride on the 3×3 conv)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet layout for ``block`` = :class:`BasicBlock` (ResNet-18/34) or :class:`Bottleneck`
    (ResNet-50/101/152)."""

    def __init__(self, num_classes: int = 1000, layers=(2, 2, 2, 2), block: type[nn.Module] = BasicBlock):
        super().__init__()
        self.block = block
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * int(getattr(block, "expansion", 1)), num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        out = planes * int(getattr(self.block, "expansion", 1))
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
        layers = [self.block(self.inplanes, planes, stride, downsample)]
        self.inplanes = out
        layers += [self.block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
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
        x = self.fc(x)
        return x


def resnet18(num_classes: int = 1000) -> nn.Module:
    return ResNet(num_classes)


def resnet50(num_classes: int = 1000) -> nn.Module:
    """ResNet-50 (25,557,032 parameters with 1000 classes, as torchvision's)."""
    return ResNet(num_classes, (3, 4, 6, 3), Bottleneck)
