"""Batched augmentation for 48x48 faces, run on the device the model runs on.

One ``affine_grid``/``grid_sample`` call does random scale (resized crop), rotation, translation
(crop with padding) and horizontal flip for the whole batch; brightness/contrast and random erasing
are vectorised too. Mixup/CutMix mix a batch with a shuffled copy of itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Strength of each augmentation; 0 disables it."""

    flip: float = 0.5  # probability of a horizontal flip
    scale: float = 0.15  # zoom in/out by up to this fraction (random resized crop)
    rotate: float = 10.0  # degrees
    translate: float = 0.1  # fraction of the image size (crop with padding)
    brightness: float = 0.2  # +- fraction
    contrast: float = 0.2  # +- fraction
    erase: float = 0.25  # probability of erasing one random rectangle
    mixup: float = 0.0  # Beta(a, a) parameter; 0 = off
    cutmix: float = 0.0  # Beta(a, a) parameter; 0 = off
    geometry: float = 1.0  # probability of the scale/rotate/translate resampling (the rest: only flipped, sharp)


PRESETS: dict[str, AugmentConfig] = {
    "none": AugmentConfig(0, 0, 0, 0, 0, 0, 0),
    "light": AugmentConfig(scale=0.1, rotate=8, translate=0.08, brightness=0.15, contrast=0.15, erase=0.0),
    "medium": AugmentConfig(),
    "strong": AugmentConfig(scale=0.2, rotate=15, translate=0.12, brightness=0.3, contrast=0.3, erase=0.5),
}


def _uniform(n: int, low: float, high: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (high - low) + low


def augment(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Augment a float batch ``x`` (N, 1, H, W) in [0, 1]; ``g`` is a generator on ``x.device``."""
    n, dev = x.shape[0], x.device
    if cfg.scale or cfg.rotate or cfg.translate or cfg.flip:
        s = 1.0 / _uniform(n, 1 - cfg.scale, 1 + cfg.scale, g, dev)  # >1 zooms out
        a = _uniform(n, -cfg.rotate, cfg.rotate, g, dev) * (math.pi / 180)
        flip = torch.where(torch.rand(n, generator=g, device=dev) < cfg.flip, -1.0, 1.0)
        t = _uniform(2 * n, -cfg.translate, cfg.translate, g, dev).view(n, 2) * 2
        if cfg.geometry < 1:  # drawn only then: the random streams of earlier recipes stay as they were
            # bilinear resampling at a sub-pixel offset blurs a face (test faces are sharp); these are spared it
            sharp = torch.rand(n, generator=g, device=dev) >= cfg.geometry
            s, a = torch.where(sharp, 1.0, s), torch.where(sharp, 0.0, a)
            t = torch.where(sharp.view(n, 1), 0.0, t)
        cos, sin = torch.cos(a) * s, torch.sin(a) * s
        theta = torch.stack(
            [torch.stack([cos * flip, -sin, t[:, 0]], 1), torch.stack([sin * flip, cos, t[:, 1]], 1)], 1
        )
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if cfg.brightness or cfg.contrast:
        c = _uniform(n, 1 - cfg.contrast, 1 + cfg.contrast, g, dev).view(n, 1, 1, 1)
        b = _uniform(n, -cfg.brightness, cfg.brightness, g, dev).view(n, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * c + mean + b).clamp(0, 1)
    if cfg.erase:
        x = random_erase(x, cfg.erase, g)
    return x


def _boxes(n: int, h: int, w: int, area: torch.Tensor, g: torch.Generator, dev: torch.device):
    """Random boxes (y0, y1, x0, x1) covering about ``area`` of the image, each as (N, 1, 1) tensors."""
    aspect = torch.exp(_uniform(n, math.log(0.5), math.log(2.0), g, dev))
    bh = (torch.sqrt(area * aspect) * h).clamp(1, h)
    bw = (torch.sqrt(area / aspect) * w).clamp(1, w)
    y0 = torch.rand(n, generator=g, device=dev) * (h - bh)
    x0 = torch.rand(n, generator=g, device=dev) * (w - bw)
    return [v.view(n, 1, 1) for v in (y0, y0 + bh, x0, x0 + bw)]


def _box_mask(x: torch.Tensor, box) -> torch.Tensor:
    n, _, h, w = x.shape
    y0, y1, x0, x1 = box
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    return ((ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)).unsqueeze(1)  # (N, 1, H, W)


def random_erase(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """Replace one random rectangle (2-25% of the area) of each image, with probability ``p``, by noise."""
    n, _, h, w = x.shape
    area = _uniform(n, 0.02, 0.25, g, x.device)
    mask = _box_mask(x, _boxes(n, h, w, area, g, x.device))
    mask &= (torch.rand(n, generator=g, device=x.device) < p).view(n, 1, 1, 1)
    noise = torch.rand(x.shape, generator=g, device=x.device, dtype=x.dtype)
    return torch.where(mask, noise, x)


def mix(
    x: torch.Tensor, y: torch.Tensor, cfg: AugmentConfig, g: torch.Generator, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Mixup or CutMix (chosen at random when both are on). Returns ``x, y_a, y_b, lam`` for
    ``loss = lam * loss(y_a) + (1 - lam) * loss(y_b)``; ``lam = 1`` when both are off."""
    if not (cfg.mixup or cfg.cutmix):
        return x, y, y, 1.0
    perm = torch.randperm(x.shape[0], generator=g, device=x.device)
    use_cutmix = cfg.cutmix > 0 and (cfg.mixup == 0 or rng.random() < 0.5)
    lam = float(rng.beta(cfg.cutmix, cfg.cutmix) if use_cutmix else rng.beta(cfg.mixup, cfg.mixup))
    if use_cutmix:
        n, _, h, w = x.shape
        area = torch.full((n,), 1 - lam, device=x.device)
        box = [v[:1].expand(n, 1, 1) for v in _boxes(n, h, w, area, g, x.device)]
        mask = _box_mask(x, box)
        x = torch.where(mask, x[perm], x)
        lam = 1 - float(mask[0].float().mean())
    else:
        x = lam * x + (1 - lam) * x[perm]
    return x, y, y[perm], lam


def class_weights(labels: np.ndarray, num_classes: int, power: float = 1.0, cap: float | None = None) -> np.ndarray:
    """Dynamic class weights from label counts: the 'balanced' formula ``n / (k * count_c)``, raised to
    ``power`` (0 = uniform, 0.5 = square-root smoothing, 1 = balanced), optionally capped at ``cap``,
    then scaled so that the average weight over the training samples is 1."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if (counts == 0).any():
        raise ValueError(f"class(es) {np.flatnonzero(counts == 0).tolist()} have no training samples")
    w = (len(labels) / (num_classes * counts)) ** power
    if cap is not None:
        w = np.minimum(w, cap)
    return w / (w[labels].mean())


def sample_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-sample probabilities for a class-balanced sampler: every class equally often (a class with no
    samples is not drawn)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = 1 / counts[labels]
    return w / w.sum()
