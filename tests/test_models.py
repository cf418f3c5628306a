"""The model registry, describe() and loading initial weights."""

from __future__ import annotations

import re
import sys

import pytest
import torch
import torch.nn as nn

from ferkit.checkpoint import load_init_weights
from ferkit.models import MODELS, VGGNet, build_model, describe, model_names


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_gives_logits(name):
    torch.manual_seed(0)
    n = 2 if name in ("resnet50v2", "vgg16", "ferkit_resnet") else 3
    model = build_model(name)
    x = torch.rand(n, 1, 48, 48)
    with torch.no_grad():
        out = model.eval()(x)
    assert out.shape == (n, 7)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])  # depends on the input


def test_train_mode_backward():
    model = build_model("ferkit_small", width=0.25)
    out = model.train()(torch.rand(4, 1, 48, 48))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_num_classes_and_width():
    assert build_model("ferkit_small", num_classes=3, width=0.25)(torch.rand(2, 1, 48, 48)).shape == (2, 3)
    full = describe(build_model("ferkit_small"))
    quarter = describe(build_model("ferkit_small", width=0.25))
    assert 1.0 < full["params_m"] < 1.4  # "~1.2M params"
    assert quarter["params_m"] < full["params_m"] / 8
    assert quarter["mflops"] < full["mflops"] / 8


def test_ferkit_resnet_works_at_the_faces_own_size():
    """A pre-activation ResNet-18 whose stages see 48, 24, 12 and 6 pixels (no ImageNet stem); width scales it."""
    model = build_model("ferkit_resnet").eval()
    sizes = []
    for stage_end in (1, 3, 5, 7):  # the last block of each stage
        model.blocks[stage_end].register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:])))
    with torch.no_grad():
        model(torch.rand(1, 1, 48, 48))
    assert sizes == [(64, 48, 48), (128, 24, 24), (256, 12, 12), (512, 6, 6)]
    assert 10.5 < describe(model)["params_m"] < 11.5  # ResNet-18's ~11M
    half = build_model("ferkit_resnet", width=0.5)
    assert half.head[-1].in_features == 256 and describe(half)["mflops"] < describe(model)["mflops"] / 3


def test_describe_counts_params_and_flops():
    model = VGGNet([[4]])  # conv 1->4 (3x3, no bias), BN(4), linear 4->7
    model.train()
    d = describe(model)
    assert d["params_m"] == pytest.approx((4 * 9 + 2 * 4 + 4 * 7 + 7) / 1e6)
    assert d["params_m"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)
    assert d["mflops"] == pytest.approx((2 * 48 * 48 * 4 * 9 + 2 * 4 * 7) / 1e6)
    assert model.training  # mode restored
    assert describe(model.eval())["mflops"] > 0 and not model.training


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'nope'.*ferkit_small"):
        build_model("nope")
    with pytest.raises(ValueError, match=r"unknown model 'resnet50' \(did you mean 'resnet50v2'\?\)"):
        build_model("resnet50")
    assert model_names() == [*MODELS, "timm:<arch>"]
    for name in ("timm:hf-hub:timm/resnet18.a1_in1k", "timm:hf_hub:x", "timm:"):  # timm read hf-hub configs online
        with pytest.raises(ValueError, match=f"^model {re.escape(name)}: not an architecture name: give one, such"):
            build_model(name)
    with pytest.raises(ValueError, match=r"^model resnet50v2: small_input must be true or false, got 'no'$"):
        build_model("resnet50v2", small_input="no")


def test_model_arguments_of_the_wrong_type_are_named():
    """'{width: hello}' failed deep inside the model with "invalid literal for int() ... 'hellohello...'"."""
    with pytest.raises(ValueError, match="model ferkit_vgg: width must be a number \\(default 1.0\\), got 'hello'"):
        build_model("ferkit_vgg", width="hello")
    with pytest.raises(ValueError, match=r"^model ferkit_small: no option 'depth'; it takes width, dropout, pre_size$"):
        build_model("ferkit_small", depth=3)  # one it does not take: was "VGGNet.__init__() got an unexpected..."
    with pytest.raises(ValueError, match=r"^model ferkit_resnet: no option 'widht' \(did you mean 'width'\?\); it "
                                         r"takes pre_size, dropout, small_input, width$"):  # fmt: skip
        build_model("ferkit_resnet", widht=0.5)
    assert build_model("ferkit_small", width=1).head[-1].out_features == 7  # an int is a number


def test_timm_models_without_timm_say_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # as where it is not installed: importing it fails
    with pytest.raises(ImportError, match="timm models need timm: pip install timm"):
        build_model("timm:resnet18")


def test_timm_models():
    """Skipped where timm is not installed (CI: timm needs a torchvision that the CPU torch pin has not; README)."""
    pytest.importorskip("timm")
    model = build_model("timm:resnet18")
    assert model.eval()(torch.rand(2, 1, 48, 48)).shape == (2, 7)


def _rgb_state(model: nn.Module, classes: int = 1000) -> dict[str, torch.Tensor]:
    """A state dict like an ImageNet checkpoint of ``model``'s architecture: 3-channel first conv,
    a ``classes``-way classifier, random values everywhere, plus an unrelated tensor."""
    g = torch.Generator().manual_seed(1)
    state = {}
    for k, v in model.state_dict().items():
        if k == "features.1.weight":
            v = torch.empty(v.shape[0], 3, *v.shape[2:])
        if k == "head.3.weight":
            v = torch.empty(classes, v.shape[1])
        if k == "head.3.bias":
            v = torch.empty(classes)
        state[k] = torch.rand(v.shape, generator=g) if v.is_floating_point() else v.clone()
    state["aux.weight"] = torch.rand(3, 3, generator=g)
    return state


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_load_init_weights_rgb_to_gray_and_skips_classifier(tmp_path, wrap):
    torch.manual_seed(0)
    model = build_model("ferkit_small", width=0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    src = _rgb_state(model)
    path = tmp_path / "imagenet.pth"
    torch.save(src if wrap is None else {wrap: src}, path)
    loaded, unused, untouched = load_init_weights(model, path)
    after = model.state_dict()
    counted = [k for k in after if not k.endswith("num_batches_tracked")]
    assert (unused, untouched) == (3, 2)  # classifier weight + bias, aux.weight; the model's classifier
    assert loaded == len(counted) - 2
    torch.testing.assert_close(after["features.1.weight"], src["features.1.weight"].sum(1, keepdim=True))
    assert after["features.1.weight"].shape[1] == 1
    assert torch.equal(after["head.3.weight"], before["head.3.weight"])
    assert torch.equal(after["head.3.bias"], before["head.3.bias"])
    for k in after:
        if k not in ("features.1.weight", "head.3.weight", "head.3.bias"):
            assert torch.equal(after[k], src[k]), k
    assert model(torch.rand(2, 1, 48, 48)).shape == (2, 7)


def test_load_init_weights_net_prefix(tmp_path):
    """timm models live under ``net.``; weights saved without that prefix still load."""

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 46 * 46, 7))

    model = Wrapped()
    state = {"0.weight": torch.rand(4, 3, 3, 3), "0.bias": torch.rand(4), "2.weight": torch.rand(1000, 4 * 46 * 46)}
    torch.save(state, tmp_path / "w.pt")
    assert load_init_weights(model, tmp_path / "w.pt") == (2, 1, 2)  # the Linear's weight and bias stay
    torch.testing.assert_close(model.net[0].weight, state["0.weight"].sum(1, keepdim=True))
    assert torch.equal(model.net[0].bias, state["0.bias"])


def test_load_init_weights_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        load_init_weights(build_model("ferkit_small", width=0.25), tmp_path / "nothere.pt")


def test_load_init_weights_refuses_what_does_not_fit(tmp_path):
    model = build_model("ferkit_small", width=0.25)
    torch.save(_rgb_state(model), tmp_path / "good.pt")
    good = (tmp_path / "good.pt").read_bytes()
    cases = {
        "truncated.pt": (good[: len(good) // 2], "not a readable weights file"),
        "garbage.pt": (b"\x80\x02 not a torch file" * 10, "not a readable weights file"),
        # torch's words for these were "KeyError: 101" and a bare "EOFError"
        "text.pt": (b"hello text", "not a readable weights file (not the zip file torch.save writes, nor in its older"),
        "empty.pt": (b"", "not a readable weights file (an empty file)"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name}: {message}")):
            load_init_weights(model, tmp_path / name)
    torch.save(_rgb_state(model), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # still read
    assert load_init_weights(model, tmp_path / "legacy.pt")[0] > 0
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list.pt: not a weights file"):
        load_init_weights(model, tmp_path / "list.pt")
    torch.save(build_model("ferkit_vgg", width=0.25).state_dict(), tmp_path / "vgg.pt")  # another architecture
    with pytest.raises(ValueError, match=r"vgg.pt: only \d+ of the model's \d+ tensors match"):
        load_init_weights(model, tmp_path / "vgg.pt")
    torch.save(nn.Linear(2, 2), tmp_path / "pickled.pt")  # a whole module: torch would advise running its code
    with pytest.raises(ValueError, match=r"pickled.pt: not a weights file \(it holds Python objects, left unread\)"):
        load_init_weights(model, tmp_path / "pickled.pt")
    # BatchNorm's step counters fit any BatchNorm of the same name: they no longer count as a match
    counters = {k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}
    torch.save({**counters, "features.1.weight": torch.rand(8, 3, 3, 3)}, tmp_path / "counters.pt")
    with pytest.raises(ValueError, match=r"counters.pt: only 1 of the model's \d+ tensors match"):
        load_init_weights(model, tmp_path / "counters.pt")


def test_load_init_weights_refuses_a_file_of_shapes_shared_by_chance(tmp_path):
    """A ResNet-50 file fitted half of a ResNet-18's tensors (BatchNorms, 3x3 convolutions of equal widths), and
    BiT's GroupNorm weights filled resnet50v2's BatchNorms: both trained on as initial weights."""
    model = build_model("ferkit_small", width=0.25)
    own = model.state_dict()
    bigger = {**own, **{f"extra.{i}.weight": torch.rand(3) for i in range(len(own))}}  # more unused than used
    torch.save(bigger, tmp_path / "bigger.pt")
    with pytest.raises(ValueError, match=r"bigger\.pt: \d+ of its tensors fit none of the model's, more than the"):
        load_init_weights(model, tmp_path / "bigger.pt")
    group_norm = {k: v for k, v in own.items() if not k.endswith(("running_mean", "running_var", "tracked"))}
    torch.save(group_norm, tmp_path / "gn.pt")
    with pytest.raises(ValueError, match=r"gn\.pt: 8 of the model's BatchNorms \(features\.2\.weight, \.\.\.\) would"):
        load_init_weights(model, tmp_path / "gn.pt")
    torch.save({f"module.{k}": v for k, v in own.items()}, tmp_path / "ddp.pt")  # saved from a DDP wrapper
    counted = sum(not k.endswith("num_batches_tracked") for k in own)
    assert load_init_weights(model, tmp_path / "ddp.pt") == (counted, 0, 0)
    (tmp_path / "m.onnx").write_bytes(b"onnx")
    with pytest.raises(ValueError, match=r"m\.onnx: an ONNX model; initial weights come from a \.pt"):
        load_init_weights(model, tmp_path / "m.onnx")


def test_load_init_weights_of_another_ferkit_model_says_which_it_is(tmp_path):
    from ferkit.checkpoint import save_checkpoint

    weights = build_model("ferkit_vgg", width=0.5).state_dict()
    state = {"model": "ferkit_vgg", "model_kwargs": {"width": 0.5}, "classes": ["a"] * 7, "state_dict": weights}
    path = save_checkpoint(tmp_path / "best.pt", state)
    message = "(it is a ferkit checkpoint of ferkit_vgg {'width': 0.5}: give that model and those options)"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_init_weights(build_model("ferkit_vgg"), path)


def test_load_init_weights_from_a_ferkit_checkpoint_takes_its_ema_weights(tmp_path):
    from ferkit.checkpoint import save_checkpoint

    source = build_model("ferkit_small", width=0.25)
    weights = source.state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}
    state = {"model": "ferkit_small", "model_kwargs": {"width": 0.25}, "classes": ["a"] * 7, "state_dict": weights}
    path = save_checkpoint(tmp_path / "best.pt", {**state, "ema_state_dict": ema})
    model = build_model("ferkit_small", width=0.25)
    counted = sum(not k.endswith("num_batches_tracked") for k in weights)
    assert load_init_weights(model, path) == (counted, 0, 0)
    assert torch.equal(model.state_dict()["head.3.weight"], ema["head.3.weight"])  # what it was evaluated with


def test_vgg16_sees_its_whole_last_feature_map():
    """At 48x48 block 5 runs at 3x3: a floor-rounding max-pool dropped its last row and column."""
    model = build_model("vgg16").eval()
    last = model.features[:-1](torch.rand(1, 1, 48, 48)).detach().requires_grad_()
    assert last.shape[-2:] == (3, 3)
    model.head(model.features[-1](last)).sum().backward()
    assert (last.grad.abs().sum(1) > 0).all()


def test_vgg16_takes_vgg16_bn_imagenet_weights(tmp_path):
    """torchvision's (and timm's) vgg16_bn: conv i, BN i+1, ReLU, ..., max-pools; conv biases folded into BN.
    (Checked against timm's own vgg16_bn and resnetv2_50 too: identical features, README.)"""
    from ferkit.models import FOREIGN_LAYOUTS

    torch.manual_seed(0)
    reference = nn.Sequential(*list(build_model("vgg16", in_chans=3).features)[1:]).eval()  # no Preprocess
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):  # BN statistics that matter
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2)
        if isinstance(m, nn.Conv2d):  # vgg16_bn's convs have biases
            m.bias = nn.Parameter(torch.rand(m.out_channels) - 0.5)
    imagenet = {f"features.{k}": v for k, v in reference.state_dict().items()}
    assert "features.0.bias" in imagenet and "features.1.running_mean" in imagenet  # conv 0, its BN at 1
    imagenet |= {"classifier.0.weight": torch.rand(64, 25088), "classifier.6.weight": torch.rand(1000, 64)}
    torch.save(imagenet, tmp_path / "vgg16_bn.pth")
    model = build_model("vgg16", in_chans=3).eval()
    assert load_init_weights(model, tmp_path / "vgg16_bn.pth", FOREIGN_LAYOUTS["vgg16"]) == (65, 2, 2)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(model.features[1:](x), reference(x), atol=1e-4, rtol=1e-4)


def test_init_weights_in_a_foreign_layout_load_through_the_model_s_converter(tmp_path):
    from ferkit.models import FOREIGN_LAYOUTS

    model = build_model("resnet50v2")
    names = {  # timm's resnetv2_50 names for some of ours
        "stem.0.weight": "stem.conv.weight",
        "blocks.0.shortcut.weight": "stages.0.blocks.0.downsample.conv.weight",
        "blocks.0.bn1.weight": "stages.0.blocks.0.norm1.weight",
        "blocks.3.conv2.weight": "stages.1.blocks.0.conv2.weight",
        "blocks.15.bn3.running_var": "stages.3.blocks.2.norm3.running_var",
        "head.0.bias": "norm.bias",
    }
    inverse = {}  # every other name, in timm's layout, from the converter itself
    for k in model.state_dict():
        if k.startswith("blocks."):
            i, rest = int(k.split(".")[1]), k.split(".", 2)[2]
            stage = next(s for s, end in enumerate((3, 7, 13, 16)) if i < end)
            block = i - (0, 3, 7, 13)[stage]
            rest = rest.replace("shortcut.", "downsample.conv.").replace("bn", "norm")
            inverse[k] = f"stages.{stage}.blocks.{block}.{rest}"
    inverse |= names
    state = {
        inverse.get(k, k): torch.rand_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()
    }
    state["stem.conv.weight"] = torch.rand(64, 3, 7, 7)
    assert FOREIGN_LAYOUTS["resnet50v2"](state).keys() == model.state_dict().keys()
    torch.save(state, tmp_path / "resnetv2_50.pth")
    with pytest.raises(ValueError, match=r"only \d+ of the model's"):  # by name alone: a few
        load_init_weights(build_model("resnet50v2"), tmp_path / "resnetv2_50.pth")
    loaded, unused, untouched = load_init_weights(model, tmp_path / "resnetv2_50.pth", FOREIGN_LAYOUTS["resnet50v2"])
    assert (unused, untouched) == (0, 0) and loaded > 250
    torch.testing.assert_close(model.state_dict()["stem.0.weight"], state["stem.conv.weight"].sum(1, keepdim=True))
    assert torch.equal(model.state_dict()["blocks.15.bn3.running_var"], state["stages.3.blocks.2.norm3.running_var"])
