"""Regenerate the test photos in this folder. The tests only read the files written here; they never
need FER-2013 or scikit-image.

    .venv/bin/pip install scikit-image      # only to regenerate astronaut.jpg
    .venv/bin/pip install av                # only to regenerate the videos
    .venv/bin/python tests/assets/make_assets.py [--fer2013 /work/shared/datasets/fer2013] [--only NAME ...]

Writes:

* ``faces_canvas.jpg``: three real FER-2013 test faces (happy, surprise, neutral) upscaled to 120, 160 and
  220 px and pasted onto a 640x480 grey gradient. Haar finds a face in only about half of upscaled
  FER-2013 crops, so for each slot the script takes, in file-name order, the first face that the bundled
  Haar detector finds on its own (exactly one box, IoU > 0.6 with the pasted square), then checks
  that the whole canvas gives exactly three such boxes.
* ``faces_canvas.json``: where each face was pasted (``boxes``: x, y, w, h; left to right), its
  source file and class.
* ``astronaut.jpg``: scikit-image's ``astronaut`` (NASA portrait of Eileen Collins, public domain),
  with ``astronaut.json`` holding a hand-drawn box around her face (forehead to chin).
* ``vfr.mp4``, ``vfr.mkv``: a 64x48 MPEG-4 video of six grey frames at variable frame rate, shown at
  ``VFR_MS`` milliseconds (a phone's video: the container's average frame rate does not give each frame's
  time; Matroska keeps no frame count, and OpenCV's estimate of it is duration x the highest frame rate).
* ``held.mp4``: six such frames 100 ms apart, the last held for 4 s (a slideshow's end): 4.5 s in all.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ferkit.faces import HaarDetector

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from helpers_inference import iou  # noqa: E402  (tests/ is not a package)

CANVAS_SIZE = (640, 480)  # width, height
# (class folder, side in px, x, y): left to right, not overlapping
SLOTS = [("happy", 120, 40, 60), ("surprise", 160, 210, 240), ("neutral", 220, 400, 40)]
ASTRONAUT_FACE = (180, 68, 90, 97)  # x, y, w, h, drawn by hand
VFR_MS = [0, 100, 200, 1200, 1300, 3300]  # when vfr.mp4's and vfr.mkv's frames are shown


def background() -> np.ndarray:
    w, h = CANVAS_SIZE
    yy, xx = np.mgrid[0:h, 0:w]
    g = 70 + 80 * (xx / w) + 40 * (yy / h)
    return np.repeat(g[..., None], 3, axis=2).astype(np.uint8)


def paste(canvas: np.ndarray, face: np.ndarray, side: int, x: int, y: int) -> None:
    big = cv2.resize(face, (side, side), interpolation=cv2.INTER_CUBIC)
    canvas[y : y + side, x : x + side] = big[..., None]


def pick_face(folder: Path, side: int, x: int, y: int, detector: HaarDetector) -> tuple[Path, np.ndarray]:
    for path in sorted(folder.glob("*.jpg")):
        face = np.asarray(Image.open(path).convert("L"))
        canvas = background()
        paste(canvas, face, side, x, y)
        boxes = detector.detect(canvas)
        if len(boxes) == 1 and iou(boxes[0], (x, y, side, side)) > 0.6:
            return path, face
    raise RuntimeError(f"no face in {folder} that Haar detects at {side} px")


def make_canvas(fer2013: Path) -> None:
    detector = HaarDetector()
    canvas, meta = background(), {"boxes": [], "sources": [], "classes": []}
    for cls, side, x, y in SLOTS:
        path, face = pick_face(fer2013 / "test" / cls, side, x, y, detector)
        paste(canvas, face, side, x, y)
        meta["boxes"].append([x, y, side, side])
        meta["sources"].append(f"fer2013/test/{cls}/{path.name}")
        meta["classes"].append(cls)
    out = HERE / "faces_canvas.jpg"
    Image.fromarray(canvas).save(out, quality=90)
    found = detector.detect(np.asarray(Image.open(out).convert("RGB")))
    assert len(found) == len(SLOTS), found
    for box, placed in zip(found, meta["boxes"], strict=True):
        assert iou(box, placed) > 0.6, (box, placed)
    (HERE / "faces_canvas.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB): Haar boxes {found}")


def make_astronaut() -> None:
    from skimage import data

    out = HERE / "astronaut.jpg"
    Image.fromarray(data.astronaut()).save(out, quality=85)
    found = HaarDetector().detect(np.asarray(Image.open(out).convert("RGB")))
    assert len(found) == 1 and iou(found[0], ASTRONAUT_FACE) > 0.6, found
    meta = {"boxes": [list(ASTRONAUT_FACE)], "source": "skimage.data.astronaut() (NASA, public domain)"}
    (HERE / "astronaut.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB): Haar boxes {found}")


def make_video(name: str, shown_ms: list[int], last_ms: int | None = None) -> None:
    """Grey 64x48 MPEG-4 frames shown at ``shown_ms``; the last one for ``last_ms`` (default: the container's)."""
    from fractions import Fraction

    import av

    out, ms = HERE / name, Fraction(1, 1000)
    with av.open(str(out), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt, stream.time_base = 64, 48, "yuv420p", ms
        packets = []
        for i, pts in enumerate(shown_ms):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts, ms
            packets += stream.encode(frame)
        packets += stream.encode()
        if last_ms is not None:
            packets[-1].duration = int(Fraction(last_ms, 1000) / packets[-1].time_base)
        container.mux(packets)
    cap = cv2.VideoCapture(str(out))
    shown = []
    while cap.grab():
        shown.append(round(cap.get(cv2.CAP_PROP_POS_MSEC)))
    assert shown == shown_ms, shown
    print(f"wrote {out} ({out.stat().st_size} bytes): frames at {shown} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fer2013", type=Path, default=Path("/work/shared/datasets/fer2013"))
    parser.add_argument("--only", nargs="+", choices=["canvas", "astronaut", "vfr", "held"], help="only these")
    args = parser.parse_args()
    makers = {
        "canvas": lambda: make_canvas(args.fer2013),
        "astronaut": make_astronaut,
        "vfr": lambda: (make_video("vfr.mp4", VFR_MS), make_video("vfr.mkv", VFR_MS)),
        "held": lambda: make_video("held.mp4", [0, 100, 200, 300, 400, 500], last_ms=4000),
    }
    for name in args.only or makers:
        makers[name]()
