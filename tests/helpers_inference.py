"""Shared helpers for the inference-side tests: the shipped test photos, IoU, a small checkpoint that
responds to its input (no training), random face-sized crops and a tiny video."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ASSETS = Path(__file__).parent / "assets"
CANVAS = ASSETS / "faces_canvas.jpg"  # three real FER-2013 faces pasted at 120, 160 and 220 px
ASTRONAUT = ASSETS / "astronaut.jpg"  # scikit-image's astronaut: one face


def placed_boxes(photo: Path) -> list[tuple[int, int, int, int]]:
    """Where the faces of a shipped photo are (see tests/assets/make_assets.py), left to right."""
    return [tuple(b) for b in json.loads(photo.with_suffix(".json").read_text())["boxes"]]


def iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    return inter / (aw * ah + bw * bh - inter)


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def photo_crops(n: int, seed: int) -> np.ndarray:
    """``n`` random square crops of the shipped photos, resized to 48x48 grayscale uint8."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        gray = cv2.cvtColor(read_rgb((CANVAS, ASTRONAUT)[i % 2]), cv2.COLOR_RGB2GRAY)
        s = int(rng.integers(40, min(gray.shape) // 2))
        y, x = int(rng.integers(0, gray.shape[0] - s)), int(rng.integers(0, gray.shape[1] - s))
        out.append(cv2.resize(gray[y : y + s, x : x + s], (48, 48), interpolation=cv2.INTER_AREA))
    return np.stack(out)


def make_checkpoint(path: Path, seed: int = 0) -> Path:
    """An untrained quarter-width ``ferkit_small`` saved like ``training.py`` saves ``best.pt``.

    A freshly initialised network gives nearly the same output for every input, which would make
    backend-agreement tests vacuous: so the BatchNorm statistics are set from one forward pass over
    photo crops and the classifier weights are scaled up. No gradient step is taken."""
    import torch

    from ferkit.checkpoint import save_checkpoint
    from ferkit.data import CLASSES
    from ferkit.models import build_model

    torch.manual_seed(seed)
    model = build_model("ferkit_small", width=0.25)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: the statistics of the one batch below
    with torch.no_grad():
        model.train()(torch.from_numpy(photo_crops(128, seed)[:, None].astype(np.float32) / 255))
        model.head[-1].weight.mul_(10.0)
    model.eval()
    return save_checkpoint(
        path,
        {
            "model": "ferkit_small",
            "model_kwargs": {"width": 0.25},
            "classes": list(CLASSES),
            "input_size": 48,
            "config": {"model": "ferkit_small", "model_kwargs": {"width": 0.25}},
            "state_dict": model.state_dict(),
            "ema_state_dict": None,
            "metrics": {"epoch": 1, "accuracy": 0.5},
        },
    )


def make_video(path: Path, n_frames: int = 12, fps: float = 10.0) -> Path:
    """A small mp4 (256x256) of the astronaut's face drifting sideways, one face in every frame."""
    frame = cv2.resize(read_rgb(ASTRONAUT), (256, 256), interpolation=cv2.INTER_AREA)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (256, 256))
    assert writer.isOpened(), "this OpenCV cannot write mp4v video"
    for i in range(n_frames):
        writer.write(cv2.cvtColor(np.roll(frame, i, axis=1), cv2.COLOR_RGB2BGR))
    writer.release()
    return path
