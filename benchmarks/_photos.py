"""Test photos composed from FER-2013 faces, shared by the benchmarks that run face detection: a 640x480
canvas (a plain gradient, or a cluttered scene with no face in it), faces pasted as upscaled crops, JPEG."""

from __future__ import annotations

import cv2
import numpy as np
from _common import ROOT
from PIL import Image

PHOTO_SIZE = (640, 480)  # width, height
ASTRONAUT = ROOT / "src" / "ferkit" / "assets" / "astronaut.jpg"
ASTRONAUT_CHIN = 175  # the portrait's rows below this hold her suit, the flag and a shuttle model, no face


def plain_canvas(seed: int = 0) -> np.ndarray:
    """A 640x480 RGB background: a soft gradient with mild sensor-like noise."""
    w, h = PHOTO_SIZE
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = 95 + 60 * (yy / h) + 20 * (xx / w)
    rgb = np.stack([base * 0.95, base, base * 1.05], -1) + rng.normal(0, 2.0, (h, w, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8)


def cluttered_canvas(mirror: bool = False) -> np.ndarray:
    """A 640x480 RGB scene with texture and edges but no face: the astronaut portrait below her chin."""
    rgb = np.asarray(Image.open(ASTRONAUT).convert("RGB"))[ASTRONAUT_CHIN:]
    rgb = cv2.resize(rgb, PHOTO_SIZE, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgb[:, ::-1]) if mirror else rgb


def paste(canvas: np.ndarray, crop: np.ndarray, slot: tuple[int, int, int]) -> None:
    """Paste a grayscale face crop upscaled (bicubic) to the square ``slot`` = (x, y, side)."""
    x, y, side = slot
    face = cv2.resize(crop, (side, side), interpolation=cv2.INTER_CUBIC)
    canvas[y : y + side, x : x + side] = face[..., None]


def encode_jpeg(rgb: np.ndarray, quality: int = 92) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()
