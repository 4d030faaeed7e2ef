"""torch.fx conversion: ResNets written the way people write them convert; anything else gets one clear line."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import onlynorm
from onlynorm import InvalidTargetError, MemoryBudgetError
from onlynorm.constructions.memory import set_memory_limit
from onlynorm.targets.cnn import ConvNetSpec
from onlynorm.targets.convert import as_target, load_target
from onlynorm.targets.layers import Conv, Pool, ResidualBlock, walk


# --------------------------------------------------------------------------- models, as users write them
class TorchvisionBasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class TorchvisionResNet18(nn.Module):
    def __init__(self, num_classes=1000, width=64):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, 2)
        self.layer2 = self._make_layer(2 * width, 2, stride=2)
        self.layer3 = self._make_layer(4 * width, 2, stride=2)
        self.layer4 = self._make_layer(8 * width, 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(8 * width, num_classes)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [TorchvisionBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [TorchvisionBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(self.dropout(x))


class CifarBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = torch.add(out, self.shortcut(x))
        return torch.relu(out)


class CifarResNet20(nn.Module):
    def __init__(self, widths=(16, 32, 64), n=3, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks, c = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(n):
                blocks.append(CifarBlock(c, w, 2 if i > 0 and j == 0 else 1))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.linear = nn.Linear(c, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.blocks(out)
        out = F.adaptive_avg_pool2d(out, 1)
        out = out.view(out.size(0), -1)
        return self.linear(out)


def _randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()


# --------------------------------------------------------------------------- conversion
def test_torchvision_style_resnet18_converts_and_matches():
    torch.manual_seed(0)
    model = _randomise_bn(TorchvisionResNet18(num_classes=7, width=8).double(), 1)
    spec = as_target(model, (3, 64, 64))
    assert isinstance(spec, ConvNetSpec)
    assert [layer.type for layer in spec.layers] == (
        ["conv", "relu", "maxpool"] + ["residual"] * 8 + ["avgpool", "flatten", "linear"]
    )
    blocks = [layer for layer in spec.layers if isinstance(layer, ResidualBlock)]
    assert [len(b.shortcut) for b in blocks] == [0, 0, 1, 0, 1, 0, 1, 0]  # downsample → projection
    assert blocks[2].shortcut[0].stride == (2, 2) and blocks[2].shortcut[0].weight.shape[2:] == (1, 1)
    assert sum(isinstance(layer, Conv) for layer in walk(spec.layers)) == 1 + 16 + 3
    x = torch.rand(3, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert float((spec(x) - model(x)).abs().max()) <= 1e-10


def test_full_size_resnet18_converts_at_imagenet_geometry():
    model = TorchvisionResNet18().eval()
    spec = ConvNetSpec.from_module(model, (3, 224, 224))
    assert spec.out_features == 1000
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # every bias-free conv gains a bias from its folded BatchNorm
    assert spec.num_parameters == sum(c.weight.numel() + c.out_channels for c in convs) + 512 * 1000 + 1000
    final = [layer for layer in spec.layers if isinstance(layer, Pool)][-1]
    assert final.kernel == (7, 7) and final.mode == "avg"
    # its reconstruction is refused before anything is allocated, with the memory figure (the demo times it)
    set_memory_limit("8G")
    try:
        for method in ("width", "deep"):
            with pytest.raises(MemoryBudgetError, match=r"needs about [0-9.]+ (GiB|TiB)") as info:
                onlynorm.random_normnet(spec, method=method, dtype=torch.float32)
            assert info.value.needed_bytes > 8 << 30
    finally:
        set_memory_limit(None)


def test_cifar_resnet20_with_functional_relu_and_shortcut_sequential_converts():
    torch.manual_seed(1)
    model = _randomise_bn(CifarResNet20().double(), 2)
    assert 0.26e6 < sum(p.numel() for p in model.parameters()) < 0.28e6
    spec = ConvNetSpec.from_module(model, (3, 32, 32))
    blocks = [layer for layer in spec.layers if isinstance(layer, ResidualBlock)]
    assert len(blocks) == 9 and [len(b.shortcut) for b in blocks] == [0, 0, 0, 1, 0, 0, 1, 0, 0]
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert float((spec(x) - model(x)).abs().max()) <= 1e-10


def test_converted_model_saves_and_loads_with_shortcuts(tmp_path):
    torch.manual_seed(2)
    model = _randomise_bn(CifarResNet20(widths=(2, 3, 4), n=1).double(), 3)
    spec = ConvNetSpec.from_module(model, (3, 8, 8))
    spec.save(tmp_path / "r.safetensors")
    loaded = load_target(tmp_path / "r.safetensors")
    assert sum(len(b.shortcut) for b in loaded.layers if isinstance(b, ResidualBlock)) == 2
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    assert torch.equal(loaded(x), spec(x))


def test_sequential_holding_custom_blocks_is_traced():
    torch.manual_seed(4)
    model = _randomise_bn(
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            CifarBlock(4, 4),
            CifarBlock(4, 6, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, 2),
        ).double(),
        5,
    )
    spec = as_target(model, (3, 8, 8))
    assert [layer.type for layer in spec.layers] == [
        "conv",
        "relu",
        "residual",
        "residual",
        "avgpool",
        "flatten",
        "linear",
    ]
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert float((spec(x) - model(x)).abs().max()) <= 1e-10


def test_spec_is_immutable():
    spec = ConvNetSpec.from_module(nn.Sequential(nn.Conv2d(1, 1, 1), nn.Flatten()).double(), (1, 2, 2))
    with pytest.raises(AttributeError):
        spec.layers = ()
    with pytest.raises(AttributeError):
        spec.layers[0].stride = (2, 2)


# --------------------------------------------------------------------------- refusals
class Sigmoidal(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.act = nn.Sigmoid()

    def forward(self, x):
        return torch.flatten(self.act(self.conv(x)), 1)


class AddWithoutRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return torch.flatten(self.conv(x) + x, 1)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return torch.flatten(torch.cat([self.conv(x), x], 1), 1)


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, groups=2)

    def forward(self, x):
        return self.conv(x).flatten(1)


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return operator.mul(self.conv(x), 2.0).flatten(1)


@pytest.mark.parametrize(
    "model, fragments",
    [
        (Sigmoidal(), ["node 'act'", "call_module Sigmoid", "is not supported", "supported: Conv2d"]),
        (AddWithoutRelu(), ["node 'add'", "not followed by a ReLU"]),
        (Concat(), ["node 'cat'", "call_function cat", "is not supported"]),
        (Grouped(), ["node 'conv'", "call_module Conv2d", "groups=2"]),
        (Scaled(), ["node 'mul'", "call_function mul"]),
    ],
)
def test_unsupported_parts_are_refused_in_one_line(model, fragments):
    with pytest.raises(InvalidTargetError) as info:
        as_target(model.double().eval(), (2 if not isinstance(model, Sigmoidal) else 1, 5, 5))
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_training_mode_model_is_refused_with_what_to_do():
    with pytest.raises(InvalidTargetError, match=r"training mode; call model.eval\(\)"):
        ConvNetSpec.from_module(CifarResNet20().double(), (3, 32, 32))


def test_unsupported_layer_in_a_target_file_exits_2_on_the_cli_with_one_line(tmp_path, capsys):
    from onlynorm._io import read_tensors, write_tensors
    from onlynorm.cli.app import main

    path = tmp_path / "t.safetensors"
    ConvNetSpec.from_module(nn.Sequential(nn.Conv2d(1, 1, 1), nn.Flatten()).double(), (1, 2, 2)).save(path)
    tensors, doc = read_tensors(path)
    doc["layers"][1]["type"] = "sigmoid"
    write_tensors(path, tensors, metadata=doc)
    with pytest.raises(SystemExit) as info:
        main(["reconstruct", str(path), "--out", str(tmp_path / "o.safetensors")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "unknown layer type 'sigmoid'" in err
    assert not (tmp_path / "o.safetensors").exists()
