"""Reference architectures (PyTorch) for the demo, tests and benchmarks.

Every builder takes ``(in_channels, num_classes, width, image_size)`` keywords and returns an
``nn.Module`` mapping ``(N, in_channels, image_size, image_size)`` inputs in [0, 1] to logits:

- ``cnn``: three 3x3 convs (strides 1, 2, 2) with ReLU, then Flatten -> Linear -> ReLU -> Linear;
- ``resnet``: a CIFAR-style ResNet of BasicBlocks (conv-BN-ReLU-conv-BN + shortcut, residual Add);
- ``mobilenet``: a MobileNetV2-style net of inverted residuals (1x1 expand, 3x3 depthwise,
  1x1 linear projection, ReLU6, residual Add when shapes match);
- ``resnet18``: ResNet-18 (ImageNet stem, 11.7 M parameters at 1000 classes) for the latency and
  quantize-time benchmarks at 3x224x224; random weights, no torchvision.

torch is the optional extra ``laqonnx[robustness]``; importing this module without it raises
:class:`laqonnx.errors.DependencyError`.
"""

from __future__ import annotations

from typing import Callable, Sequence

from ..errors import OptionError, require

torch = require("torch", "robustness")
nn = torch.nn

__all__ = [
    "ARCHITECTURES",
    "build_model",
    "SmallCNN",
    "BasicBlock",
    "ResNet",
    "InvertedResidual",
    "MobileNetV2",
    "small_cnn",
    "small_resnet",
    "small_mobilenet",
    "resnet18_like",
]


class SmallCNN(nn.Module):
    """Conv3x3 -> ReLU -> Conv3x3/2 -> ReLU -> Conv3x3/2 -> ReLU -> Flatten -> Linear -> ReLU -> Linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, image_size: int = 16, hidden: int = 64) -> None:
        super().__init__()
        if image_size < 4:
            raise OptionError(f"SmallCNN needs image_size >= 4, got {image_size}")
        side = (image_size + 1) // 2
        side = (side + 1) // 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet BasicBlock: conv3x3-BN-ReLU-conv3x3-BN, plus identity or 1x1-conv-BN shortcut, ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet of BasicBlocks: stem, one stage per entry of ``blocks`` (widths doubling, stride 2
    from the second stage on), global average pooling, Linear.

    ``stem="small"`` is conv3x3/1-BN-ReLU (digits, CIFAR); ``stem="imagenet"`` is
    conv7x7/2-BN-ReLU-MaxPool3x3/2 (ResNet-18 at 224x224).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, blocks: Sequence[int] = (1, 1, 1), stem: str = "small") -> None:
        super().__init__()
        if stem == "small":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        elif stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            raise OptionError(f"ResNet stem must be 'small' or 'imagenet', got {stem!r}")
        layers: list[nn.Module] = []
        planes = width
        for stage, count in enumerate(blocks):
            out_planes = width * 2**stage
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(planes, out_planes, stride))
                planes = out_planes
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.layers(self.stem(x)))
        return self.fc(torch.flatten(out, 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand-BN-ReLU6, 3x3 depthwise-BN-ReLU6, 1x1 project-BN (linear)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_planes * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(in_planes, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, out_planes, 1, bias=False),
            nn.BatchNorm2d(out_planes),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_planes == out_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """A small MobileNetV2: stem conv3x3-BN-ReLU6, inverted residuals given as
    ``(expand, channels_multiplier, repeats, stride)``, 1x1 head conv-BN-ReLU6, pooling, Linear."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 16,
        setting: Sequence[tuple[int, int, int, int]] = ((1, 1, 1, 1), (4, 2, 2, 2), (4, 4, 2, 2)),
        head: int = 4,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU6())
        layers: list[nn.Module] = []
        planes = width
        for expand, mult, repeats, stride in setting:
            for i in range(repeats):
                layers.append(InvertedResidual(planes, width * mult, stride if i == 0 else 1, expand))
                planes = width * mult
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Conv2d(planes, head * width, 1, bias=False), nn.BatchNorm2d(head * width), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.head(self.layers(self.stem(x))))
        return self.fc(torch.flatten(out, 1))


def small_cnn(in_channels: int = 1, num_classes: int = 10, width: int = 16, image_size: int = 16) -> nn.Module:
    return SmallCNN(in_channels, num_classes, width, image_size)


def small_resnet(in_channels: int = 1, num_classes: int = 10, width: int = 16, image_size: int = 16) -> nn.Module:
    del image_size  # global pooling: any input size works
    return ResNet(in_channels, num_classes, width, blocks=(1, 1, 1), stem="small")


def small_mobilenet(in_channels: int = 1, num_classes: int = 10, width: int = 16, image_size: int = 16) -> nn.Module:
    del image_size
    return MobileNetV2(in_channels, num_classes, width)


def resnet18_like(num_classes: int = 1000, in_channels: int = 3, width: int = 64, image_size: int = 224) -> nn.Module:
    """ResNet-18 (ImageNet stem, stages of 2 BasicBlocks, widths 64-512); expects 3x224x224."""
    del image_size
    return ResNet(in_channels, num_classes, width, blocks=(2, 2, 2, 2), stem="imagenet")


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "cnn": small_cnn,
    "resnet": small_resnet,
    "mobilenet": small_mobilenet,
    "resnet18": resnet18_like,
}


def build_model(arch: str, *, in_channels: int = 1, num_classes: int = 10, width: int | None = None, image_size: int = 16) -> nn.Module:
    """Build ``ARCHITECTURES[arch]``; ``width=None`` keeps the architecture's default width."""
    if arch not in ARCHITECTURES:
        raise OptionError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    kwargs: dict[str, int] = {"in_channels": in_channels, "num_classes": num_classes, "image_size": image_size}
    if width is not None:
        kwargs["width"] = width
    return ARCHITECTURES[arch](**kwargs)
