"""Model registry: compact CNNs designed for 48x48 faces (VGG- and ResNet-style), VGG16, ResNet50V2 and any
timm model.

Every model takes a float batch (N, 1, 48, 48) in [0, 1] and returns logits (N, 7): input
normalisation (and upsampling where an architecture needs a larger input) happens inside the model,
so training, evaluation, ONNX export and inference all feed it the same thing.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import did_you_mean

# a fixed normalisation of pixels / 255 (FER-2013's own: mean 0.514, std 0.307; the BatchNorm after every first
# convolution absorbs the difference); the shipped weights were trained with it
MEAN, STD = 0.5, 0.25


class Preprocess(nn.Module):
    """Normalise [0, 1] pixels and optionally resize to the size the backbone was designed for."""

    def __init__(self, size: int | None = None) -> None:
        super().__init__()
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"pre_size must be a whole number of pixels or null, got {size!r}")
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - MEAN) / STD
        if self.size is not None and x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class VGGNet(nn.Module):
    """VGG-style CNN: stages of 3x3 conv-BN-ReLU blocks, each followed by 2x2 max-pooling, then global
    average pooling, dropout and one linear layer (so the weights stay small)."""

    def __init__(
        self,
        stages: list[list[int]],
        num_classes: int = 7,
        in_chans: int = 1,
        dropout: float = 0.3,
        pre_size: int | None = None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [Preprocess(pre_size)]
        cin = in_chans
        for stage in stages:
            for cout in stage:
                layers += _conv_bn(cin, cout)
                cin = cout
            layers.append(nn.MaxPool2d(2, ceil_mode=True))  # an odd size keeps its last row and column
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class PreActBasic(nn.Module):
    """ResNet V2 basic block (two 3x3 convolutions, as in ResNet-18): BN-ReLU before each convolution."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(cin, width, 1, stride=stride, bias=False) if stride != 1 or cin != width else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out))) + shortcut


class PreActBottleneck(nn.Module):
    """ResNet V2 bottleneck: BN-ReLU before each convolution, identity shortcut kept clean."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + shortcut


class ResNetV2(nn.Module):
    """Pre-activation ResNet (He et al. 2016, 'Identity Mappings'); ``layers=(3, 4, 6, 3)`` is ResNet50V2.

    ``small_input``: a 3x3 stride-1 stem without max-pooling, for 48x48 faces at their own size (the
    ImageNet stem, 7x7 stride 2 and a max-pool, would leave 12x12 to the first stage). ``width`` scales
    every stage's channels."""

    def __init__(
        self,
        layers: tuple[int, ...] = (3, 4, 6, 3),
        num_classes: int = 7,
        in_chans: int = 1,
        pre_size: int | None = 96,
        dropout: float = 0.2,
        block: type[PreActBasic] | type[PreActBottleneck] = PreActBottleneck,
        small_input: bool = False,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(small_input, bool):  # a YAML 'yes' is true, but '"no"' is a string, and truthy
            raise ValueError(f"small_input must be true or false, got {small_input!r}")
        self.pre = Preprocess(pre_size)
        cin = max(4, int(64 * width))
        if small_input:
            self.stem = nn.Sequential(nn.Conv2d(in_chans, cin, 3, padding=1, bias=False))
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, cin, 7, stride=2, padding=3, bias=False), nn.MaxPool2d(3, stride=2, padding=1)
            )
        blocks: list[nn.Module] = []
        for i, n in enumerate(layers):
            planes = max(4, int(64 * 2**i * width))
            for j in range(n):
                blocks.append(block(cin, planes, stride=2 if (j == 0 and i > 0) else 1))
                cin = planes * block.expansion
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(cin, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(self.pre(x))))


class TimmModel(nn.Module):
    """Any timm architecture, built with one input channel and no download."""

    def __init__(
        self, arch: str, num_classes: int = 7, in_chans: int = 1, pre_size: int | None = None, **kwargs
    ) -> None:
        super().__init__()
        if not arch or arch.startswith(("hf-hub:", "hf_hub:")):  # timm reads an hf-hub model's config online
            raise ValueError("not an architecture name: give one, such as timm:resnet18 (nothing is downloaded: "
                             "ImageNet weights come from a local file, --init-weights)")  # fmt: skip
        try:
            import timm
        except ImportError as e:
            raise ImportError("timm models need timm: pip install timm") from e
        self.pre = Preprocess(pre_size)
        try:
            self.net = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
        except RuntimeError as e:
            if str(e).startswith("Unknown model"):
                raise ValueError(f"timm {timm.__version__} has no such architecture"
                                 f"{did_you_mean(arch, timm.list_models())}") from None  # fmt: skip
            raise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.pre(x))


def _scaled(stages: list[list[int]], width: float) -> list[list[int]]:
    return [[max(4, int(c * width)) for c in s] for s in stages]


MODELS: dict[str, Callable[..., nn.Module]] = {
    # ~1.2M params: trains on a 2-core CPU in about 3 minutes an epoch.
    "ferkit_small": lambda width=1.0, **kw: VGGNet(_scaled([[32, 32], [64, 64], [128, 128], [256, 256]], width), **kw),
    # ~7.6M params: the stronger 48x48 VGG-style net, for a GPU.
    "ferkit_vgg": lambda width=1.0, **kw: VGGNet(
        _scaled([[64, 64], [128, 128], [256, 256, 256], [512, 512, 512]], width), **kw
    ),
    # VGG16's 13 convolutions (with BatchNorm: vgg16_bn's) and the head above, 14.7M params (not its 138M classifier)
    "vgg16": lambda **kw: VGGNet([[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3], **kw),
    # ~11M params: pre-activation ResNet-18 at the faces' own 48x48 (stages at 48, 24, 12 and 6 pixels).
    "ferkit_resnet": lambda **kw: ResNetV2(
        (2, 2, 2, 2), **{"block": PreActBasic, "small_input": True, "pre_size": None, **kw}
    ),
    "resnet50v2": lambda **kw: ResNetV2((3, 4, 6, 3), **kw),
}


def _from_vgg_bn(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's (or timm's) ``vgg16_bn`` ImageNet weights in :class:`VGGNet`'s names: its layers are
    ``features.N`` one place further on (after Preprocess); each conv bias, which VGGNet's convs do without,
    is folded into the BatchNorm after it (BN(conv(x) + b) with mean m is BN(conv(x)) with mean m - b)."""
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"features\.(\d+)\.(.+)", key)
        out[f"features.{int(m[1]) + 1}.{m[2]}" if m else key] = value  # the classifier: another head, unused
    for key in [k for k in out if re.fullmatch(r"features\.\d+\.bias", k)]:
        i = int(key.split(".")[1])
        weight, mean = out.get(f"features.{i}.weight"), f"features.{i + 1}.running_mean"
        if weight is not None and weight.ndim == 4 and mean in out:  # a conv's bias, a BatchNorm after it
            out[mean] = out[mean] - out.pop(key)
    return out


def _from_timm_resnetv2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's ``resnetv2_50`` ImageNet weights in :class:`ResNetV2`'s names (the same network: stem conv,
    stages of pre-activation bottlenecks, final norm)."""
    layers = (3, 4, 6, 3)  # blocks per stage
    out = {}
    for key, value in state.items():
        if m := re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", key):
            rest = m[3].replace("downsample.conv.", "shortcut.").replace("norm", "bn")
            key = f"blocks.{sum(layers[: int(m[1])]) + int(m[2])}.{rest}"
        else:
            key = key.replace("stem.conv.", "stem.0.").replace("norm.", "head.0.")
        out[key] = value
    return out


# other layouts of a model's weights that --init-weights reads: the ImageNet files of the same networks
FOREIGN_LAYOUTS: dict[str, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = {
    "vgg16": _from_vgg_bn,
    "resnet50v2": _from_timm_resnetv2,
}


def model_names() -> list[str]:
    """Names accepted by :func:`build_model` (plus ``timm:<arch>``)."""
    return [*MODELS, "timm:<arch>"]


def build_model(name: str, num_classes: int = 7, **kwargs) -> nn.Module:
    """Build a registered model by name, or ``timm:<arch>`` for any timm architecture."""
    if not name.startswith("timm:") and name not in MODELS:
        raise ValueError(f"unknown model {name!r}{did_you_mean(name, list(MODELS))}; choose one of "
                         f"{', '.join(model_names())}")  # fmt: skip
    if name in MODELS:  # a number where the model's own default is one ('{width: hello}' failed deep inside)
        params = inspect.signature(MODELS[name]).parameters
        for k, v in kwargs.items():
            default = params[k].default if k in params else None
            is_number = isinstance(v, (int, float)) and not isinstance(v, bool)
            if isinstance(default, (int, float)) and not isinstance(default, bool) and not is_number:
                raise ValueError(f"model {name}: {k} must be a number (default {default}), got {v!r}")
        if "width" in kwargs and not kwargs["width"] > 0:  # every layer would be clamped to 4 channels
            raise ValueError(f"model {name}: width must be positive, got {kwargs['width']!r}")
    try:
        if name.startswith("timm:"):
            return TimmModel(name.removeprefix("timm:"), num_classes=num_classes, **kwargs)
        return MODELS[name](num_classes=num_classes, **kwargs)
    except TypeError as e:  # an argument the model does not take
        if name in MODELS and (m := re.search(r"unexpected keyword argument '(\w+)'", str(e))):
            takes = _options(name)
            raise ValueError(f"model {name}: no option {m[1]!r}{did_you_mean(m[1], takes)}; it takes "
                             f"{', '.join(takes) or 'none'}") from None  # fmt: skip
        raise ValueError(f"model {name} with arguments {kwargs}: {e}") from e
    except ValueError as e:  # an option's value out of its range ('{dropout: 1.5}', '{pre_size: 0}')
        raise ValueError(f"model {name}: {e}") from e


def _options(name: str) -> list[str]:
    """The ``model_kwargs`` a registered model takes: its builder's own and those of the class it builds, less
    the class's first (its layout, which the builder gives), the fixed ones and those that take a class."""
    own = list(inspect.signature(MODELS[name]).parameters.values())
    built = list(inspect.signature(type(MODELS[name](num_classes=7))).parameters.values())[1:]
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    found = [p.name for p in own + built if p.kind in named and not isinstance(p.default, type)]
    return [p for p in dict.fromkeys(found) if p not in ("num_classes", "in_chans")]


def describe(model: nn.Module, size: int = 48) -> dict[str, float]:
    """Parameter count (millions) and forward MFLOPs (multiply-adds count 2) for one 1x48x48 image."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 1, size, size))
    model.train(was_training)
    params = sum(p.numel() for p in model.parameters())
    return {"params_m": params / 1e6, "mflops": counter.get_total_flops() / 1e6}
