"""Batched augmentation, mixup/CutMix and the dynamic class weights."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from ferkit.augment import PRESETS, AugmentConfig, augment, class_weights, mix, random_erase, sample_weights

OFF = AugmentConfig(flip=0, scale=0, rotate=0, translate=0, brightness=0, contrast=0, erase=0)


def _batch(n=16, seed=0):
    return torch.rand(n, 1, 48, 48, generator=torch.Generator().manual_seed(seed))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_keep_shape_dtype_and_range(preset):
    x = _batch()
    out = augment(x, PRESETS[preset], _gen())
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    if preset == "none":
        assert torch.equal(out, x)
    else:
        assert not torch.allclose(out, x, atol=1e-3)


def test_all_off_is_identity():
    x = _batch()
    assert torch.equal(augment(x, OFF, _gen()), x)


def test_flip_only_flips():
    x = _batch()
    out = augment(x, replace(OFF, flip=1.0), _gen())
    torch.testing.assert_close(out, x.flip(-1), atol=1e-5, rtol=0)


def test_flip_half_flips_some_and_keeps_the_rest():
    x = _batch(200)
    out = augment(x, replace(OFF, flip=0.5), _gen(1))
    flipped = torch.isclose(out, x.flip(-1), atol=1e-5).flatten(1).all(1)
    kept = torch.isclose(out, x, atol=1e-5).flatten(1).all(1)
    assert (flipped ^ kept).all()  # every image is exactly one of the two
    assert 60 < int(flipped.sum()) < 140


def test_same_seed_same_output_other_seed_differs():
    x = _batch()
    cfg = PRESETS["strong"]
    a = augment(x, cfg, _gen(7))
    b = augment(x, cfg, _gen(7))
    c = augment(x, cfg, _gen(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_brightness_contrast_clamped():
    x = torch.ones(8, 1, 48, 48)
    out = augment(x, replace(OFF, brightness=0.5, contrast=0.5), _gen())
    assert out.max() <= 1 and out.min() >= 0
    assert (out < 1).any()  # some images got darker


def test_random_erase_rectangles():
    x = torch.full((64, 1, 48, 48), 0.5)
    out = random_erase(x, 1.0, _gen())
    changed = out != x
    frac = changed.float().mean(dim=(1, 2, 3))
    assert (frac > 0).all() and (frac <= 0.3).all()
    for m in changed[:, 0]:  # the changed pixels form one axis-aligned rectangle
        rows, cols = m.any(1).nonzero(), m.any(0).nonzero()
        assert m[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
    assert torch.equal(random_erase(x, 0.0, _gen()), x)


def test_mix_off_returns_input():
    x, y = _batch(8), torch.arange(8)
    xo, ya, yb, lam = mix(x, y, OFF, _gen(), np.random.default_rng(0))
    assert xo is x and torch.equal(ya, y) and torch.equal(yb, y) and lam == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_mixup(seed):
    x, y = _batch(8, seed), torch.arange(8)  # unique labels reveal the permutation
    xo, ya, yb, lam = mix(x, y, replace(OFF, mixup=0.4), _gen(seed), np.random.default_rng(seed))
    assert 0.0 <= lam <= 1.0
    assert torch.equal(ya, y)
    assert sorted(yb.tolist()) == list(range(8))
    torch.testing.assert_close(xo, lam * x + (1 - lam) * x[yb])


@pytest.mark.parametrize("seed", range(5))
def test_cutmix(seed):
    x, y = _batch(8, seed), torch.arange(8)
    xo, ya, yb, lam = mix(x, y, replace(OFF, cutmix=1.0), _gen(seed), np.random.default_rng(seed))
    assert 0.0 <= lam <= 1.0
    assert torch.equal(ya, y) and sorted(yb.tolist()) == list(range(8))
    from_other = (xo == x[yb]) & (xo != x)
    from_self = xo == x
    assert (from_other | from_self).all()  # each pixel comes from one of the two images
    for i in range(8):
        if yb[i] != i:  # lam is the share of the image's own pixels
            assert from_other[i].float().mean().item() == pytest.approx(1 - lam, abs=1e-6)


def test_mixup_and_cutmix_both_on():
    """Both on: each batch is one or the other, chosen at random (pixels copied, or blended)."""
    x, y = _batch(8), torch.arange(8)
    kinds = set()
    for seed in range(10):
        xo, _, yb, lam = mix(x, y, replace(OFF, mixup=0.4, cutmix=1.0), _gen(seed), np.random.default_rng(seed))
        assert 0 <= lam <= 1
        copied = bool(((xo == x) | (xo == x[yb])).all())  # CutMix: every pixel one of the two images'
        if not copied:
            torch.testing.assert_close(xo, lam * x + (1 - lam) * x[yb])  # mixup
        kinds.add("cutmix" if copied else "mixup")
    assert kinds == {"cutmix", "mixup"}


# ---------------------------------------------------------------- class weights

LABELS = np.repeat(np.arange(7), [40, 4, 40, 70, 48, 31, 50])


def test_class_weights_balanced_formula():
    n, k = len(LABELS), 7
    counts = np.bincount(LABELS)
    w = class_weights(LABELS, k, power=1.0)
    np.testing.assert_allclose(w, n / (k * counts))
    assert w[LABELS].mean() == pytest.approx(1.0)
    assert np.argmax(w) == 1 and np.argmin(w) == 3


@pytest.mark.parametrize("power", [0.25, 0.5, 2.0])
def test_class_weights_power_and_mean_one(power):
    w = class_weights(LABELS, 7, power=power)
    assert w[LABELS].mean() == pytest.approx(1.0)
    raw = (len(LABELS) / (7 * np.bincount(LABELS))) ** power
    np.testing.assert_allclose(w / w[0], raw / raw[0])


def test_class_weights_power_zero_is_uniform():
    np.testing.assert_allclose(class_weights(LABELS, 7, power=0.0), np.ones(7))


def test_class_weights_cap():
    raw = len(LABELS) / (7 * np.bincount(LABELS))  # disgust ~8.5, the others 0.5..1.1
    w = class_weights(LABELS, 7, power=1.0, cap=2.0)
    expected = np.minimum(raw, 2.0)
    np.testing.assert_allclose(w, expected / expected[LABELS].mean())  # capped, then mean 1 over samples
    assert w.max() / w.min() == pytest.approx(2.0 / raw.min())
    assert w[LABELS].mean() == pytest.approx(1.0)
    uncapped = class_weights(LABELS, 7, power=1.0)
    assert w[1] < uncapped[1]
    np.testing.assert_allclose(class_weights(LABELS, 7, power=1.0, cap=None), uncapped)


def test_a_class_weight_power_that_leaves_no_weight_is_refused():
    """From a power of about 40 every class but disgust weighed 0 in float32 (a batch without disgust: a NaN loss);
    beyond 300 the weights overflowed."""
    from ferkit.config import TrainConfig

    assert TrainConfig(class_weight_power=4).class_weight_power == 4
    with pytest.raises(ValueError, match=r"class_weight_power: 60.0 is outside \[0, 4\]"):
        TrainConfig(class_weight_power=60)
    w = np.float32(class_weights(LABELS, 7, power=4.0))
    assert (w > 0).all() and np.isfinite(w).all()


def test_class_weights_missing_class():
    with pytest.raises(ValueError, match=r"\[5\]"):
        class_weights(LABELS[LABELS != 5], 7)


def test_sample_weights():
    p = sample_weights(LABELS, 7)
    assert p.shape == LABELS.shape
    assert p.sum() == pytest.approx(1.0)
    per_class = np.bincount(LABELS, weights=p)
    np.testing.assert_allclose(per_class, np.full(7, 1 / 7))  # every class equally often
    without = LABELS[LABELS != 5]  # a class with no samples is not drawn (it was refused)
    per_class = np.bincount(without, weights=sample_weights(without, 7), minlength=7)
    np.testing.assert_allclose(per_class[[0, 5]], [1 / 6, 0])


def test_the_loss_names_a_class_missing_from_the_training_subset():
    from ferkit.config import TrainConfig
    from ferkit.training import make_criterion

    cfg = TrainConfig.from_dict({"train_limit": 20})
    with pytest.raises(ValueError, match=r"no Training images of disgust, surprise in the 5-image subset \(train_"):
        make_criterion(cfg, np.array([0, 2, 3, 4, 6]), torch.device("cpu"))
    make_criterion(replace(cfg, class_weights=False), np.array([0, 2, 3, 4, 6]), torch.device("cpu"))


def test_geometry_spares_a_share_of_the_faces_the_resampling():
    """Every face was resampled at a sub-pixel offset (blurred) while test faces are sharp: geometry 0 leaves
    each one exact or exactly mirrored; a share in between; and 1 draws what it always drew."""
    x = torch.rand(64, 1, 48, 48, generator=torch.Generator().manual_seed(1))
    medium = replace(PRESETS["medium"], brightness=0, contrast=0, erase=0)

    def sharp(geometry: float) -> int:
        out = augment(x, replace(medium, geometry=geometry), torch.Generator().manual_seed(0))
        return sum(
            torch.allclose(a, b, atol=1e-5) or torch.allclose(a, b.flip(-1), atol=1e-5)
            for a, b in zip(out, x, strict=True)
        )

    assert sharp(0.0) == 64 and 16 <= sharp(0.5) <= 48 and sharp(1.0) == 0
    full = PRESETS["medium"]
    once, again = (augment(x, replace(full, geometry=1.0), torch.Generator().manual_seed(0)) for _ in range(2))
    assert torch.equal(once, augment(x, full, torch.Generator().manual_seed(0))) and torch.equal(once, again)
