"""CNN model zoo (MobileNetV2, ResNet-18/34, MCUNet-like) and ONNX export."""

from __future__ import annotations

import os
from typing import Callable

import onnx
import torch
from torch import nn


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` without dropping below 90% of it."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _init_weights(model: nn.Module) -> None:
    """Deterministic-scheme init: kaiming convs, unit BN, small-normal linear, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


class ConvBNReLU6(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU6, 'same' padding for odd kernels."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=groups,
                      bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, kxk depthwise, 1x1 linear projection (+ identity)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int,
                 kernel_size: int = 3) -> None:
        super().__init__()
        hidden = int(round(in_ch * expand_ratio))
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_ch, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, kernel_size, stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (torchvision layout, without the classifier dropout)."""

    # (expand ratio t, output channels c, repeats n, first stride s)
    SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
               (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0) -> None:
        super().__init__()
        in_ch = _make_divisible(32 * width_mult)
        last_ch = _make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [ConvBNReLU6(3, in_ch, stride=2)]
        for t, c, n, s in self.SETTING:
            out_ch = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        layers.append(ConvBNReLU6(in_ch, last_ch, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_ch, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class MCUNet(nn.Module):
    """Small MCUNet-style net: inverted residuals with mixed kernel sizes and expansions."""

    # (kernel size, expand ratio, output channels, stride)
    SETTING = [(3, 1, 16, 1),
               (7, 3, 24, 2), (3, 4, 24, 1),
               (5, 3, 40, 2), (7, 4, 40, 1), (3, 6, 40, 1),
               (5, 6, 48, 2), (3, 4, 48, 1),
               (7, 6, 96, 2), (5, 4, 96, 1)]

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        in_ch = 16
        layers: list[nn.Module] = [ConvBNReLU6(3, in_ch, stride=2)]
        for k, t, c, s in self.SETTING:
            layers.append(InvertedResidual(in_ch, c, s, t, kernel_size=k))
            in_ch = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN pairs with a (projected) identity shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ImageNet-layout ResNet built from BasicBlocks (stages of 64/128/256/512 channels)."""

    def __init__(self, block_counts: list[int], num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = 64
        for i, (width, count) in enumerate(zip((64, 128, 256, 512), block_counts)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(in_ch, width, stride)]
            blocks += [BasicBlock(width, width) for _ in range(count - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            in_ch = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 10) -> ResNet:
    """ResNet-18 (2-2-2-2 basic blocks)."""
    return ResNet([2, 2, 2, 2], num_classes)


def resnet34(num_classes: int = 10) -> ResNet:
    """ResNet-34 (3-4-6-3 basic blocks)."""
    return ResNet([3, 4, 6, 3], num_classes)


ZOO: dict[str, Callable[..., nn.Module]] = {
    "mobilenetv2": lambda num_classes=10: MobileNetV2(num_classes),
    "mobilenetv2-0.35": lambda num_classes=10: MobileNetV2(num_classes, width_mult=0.35),
    "resnet18": resnet18,
    "resnet34": resnet34,
    "mcunet": lambda num_classes=10: MCUNet(num_classes),
}


def build(name: str, num_classes: int = 10) -> nn.Module:
    """Instantiate a zoo model by name."""
    if name not in ZOO:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(ZOO))}")
    return ZOO[name](num_classes=num_classes)


def export_onnx(model: nn.Module, path: str | os.PathLike[str],
                input_shape: tuple[int, int, int, int]) -> None:
    """Export ``model`` (in eval mode) to ONNX with one initializer per state_dict entry.

    TorchScript-exporter options (``dynamo=False``) are chosen so that every initializer is
    named after its state_dict key and BatchNorm stays a BatchNormalization node:

    * ``do_constant_folding=False`` skips ``_jit_pass_onnx_eval_peephole`` (Conv+BN fusion)
      and constant folding.
    * ``keep_initializers_as_inputs=True`` skips ``_jit_pass_onnx_deduplicate_initializers``,
      which in eval mode merges equal-valued tensors (e.g. freshly initialised BN weights)
      into one initializer plus Identity nodes. The initializers it also lists as graph
      inputs are removed afterwards, leaving "input" as the only graph input.
    * ``PRESERVE`` with the model in eval mode emits inference BatchNormalization.
    """
    model.eval()
    torch.onnx.export(
        model, (torch.zeros(input_shape),), path, dynamo=False,
        input_names=["input"], output_names=["logits"],
        training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
        keep_initializers_as_inputs=True, opset_version=17,
    )
    proto = onnx.load(path)
    params = {init.name for init in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in params]
    del proto.graph.input[:]
    proto.graph.input.extend(inputs)
    onnx.save(proto, path)


DEFAULT_MODEL = "mobilenetv2-0.35"


def calibrate_batchnorm(model: nn.Module, images: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to those of ``images``. gftvm trains with BN
    in inference mode, so a freshly built model needs data statistics to train stably."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration pass
    model.train()
    with torch.no_grad():
        model(images)
    model.eval()


def export_zoo_model(name: str, path: str | os.PathLike[str], image_size: int = 32,
                     num_classes: int = 10, seed: int = 0,
                     calibration: torch.Tensor | None = None) -> nn.Module:
    """Build zoo model ``name`` with weights seeded by ``seed``, optionally calibrate its BN
    statistics on ``calibration`` images, export it, and return it."""
    torch.manual_seed(seed)
    model = build(name, num_classes)
    if calibration is not None:
        calibrate_batchnorm(model, calibration)
    export_onnx(model, path, (1, 3, image_size, image_size))
    return model
