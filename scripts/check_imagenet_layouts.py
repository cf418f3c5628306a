"""Check that vgg16 and resnet50v2 take timm's ImageNet layouts (vgg16_bn, resnetv2_50) through
``--init-weights``: build timm's networks with random weights and BatchNorm statistics, save them, load the
files with ferkit's loader and compare features. Needs timm (not in ferkit's own dependencies):

    python scripts/check_imagenet_layouts.py    # prints each load's counts and the largest difference
"""

from __future__ import annotations

import tempfile

import timm
import torch
import torch.nn as nn

from ferkit.checkpoint import load_init_weights
from ferkit.models import FOREIGN_LAYOUTS, build_model


def randomised(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with BatchNorm statistics and affine parameters that change its output."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def main() -> int:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 96)
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for ours, theirs, kwargs in [("resnet50v2", "resnetv2_50", {"pre_size": None}), ("vgg16", "vgg16_bn", {})]:
            reference = randomised(timm.create_model(theirs, pretrained=False))
            torch.save(reference.state_dict(), f"{tmp}/{theirs}.pth")
            model = build_model(ours, in_chans=3, num_classes=1000, **kwargs).eval()
            loaded, unused, untouched = load_init_weights(model, f"{tmp}/{theirs}.pth", FOREIGN_LAYOUTS[ours])
            if ours == "vgg16":
                expected, got = reference.features(x), model.features[1:](x)
            else:  # pooled features: the heads differ (a 1x1 conv against a linear layer)
                expected = reference.forward_head(reference.forward_features(x), pre_logits=True)
                got = model.head[:4](model.blocks(model.stem(x)))
            diff = (expected - got).abs().max().item()
            worst = max(worst, diff / expected.abs().max().item())
            print(f"{ours} <- timm {theirs}: {loaded} tensors loaded, {unused} of the file's unused, "
                  f"{untouched} of the model's left; max |difference| {diff:.2e}")  # fmt: skip
    return 0 if worst < 1e-5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
