"""Face detection: recall by face size, false boxes and time of face detector settings, on 640x480 photos
composed from FER-2013 PublicTest faces.

Each photo holds three faces, their sides drawn log-uniformly from ``--sizes`` (48-240 px by default), pasted
as upscaled crops where they do not overlap, on a plain gradient (half the photos) or on a cluttered scene
with no face in it (the astronaut portrait below her chin, the other half); JPEG q90. A face counts as found
when a box's centre lies inside its square and the box side is 0.35-1.25 times the square's (crops are
tight, so detectors box them at about their size); every other box is a false box. Milliseconds are per
photo with ``--threads`` OpenCV (and CenterFace's ONNX Runtime) threads (1: what each request gets when the
web app is busy).

Upscaled 48x48 crops are harder than real photos (small ones most: blurred, and cut at the forehead), so
the recall here ranks settings; it is not the recall on your photos. Settings are ``--detectors`` specs:
``centerface``, ``haar``, a CenterFace or YuNet ``.onnx`` or a Haar ``.xml`` file, each with optional ``:key=value,...``
arguments of its class (:class:`~ferkit.faces.CenterFaceDetector`, :class:`~ferkit.faces.HaarDetector`,
:class:`~ferkit.faces.YuNetDetector`); CenterFace runs on ``--threads`` ONNX Runtime threads unless its spec
sets ``threads``.

    .venv/bin/python benchmarks/face_detection.py --threads 1
    .venv/bin/python benchmarks/face_detection.py --detectors centerface haar haar:min_size=32 path/to/yunet.onnx
"""

from __future__ import annotations

import sys
import time

import numpy as np
from _common import base_parser, load_fer, machine_info, opencv_threads, print_table, write_report
from _photos import PHOTO_SIZE, cluttered_canvas, encode_jpeg, paste, plain_canvas

from ferkit.config import MIN_FACE
from ferkit.faces import Box, FaceDetector, make_detector
from ferkit.inference import load_image

DETECTORS = [
    "centerface",
    "centerface:score_threshold=0.5",
    "centerface:score_threshold=0.2",
    "centerface:reliable=24",
    "centerface:min_size=32",
    "centerface:max_side=640,reliable=48",
    "haar",
    "haar:min_neighbors=4",
    "haar:min_neighbors=3",
    "haar:scale_factor=1.2",
    "haar:scale_factor=1.2,min_neighbors=3",
    "haar:min_size=32",
    "haar:min_size=64",
]
FACES_PER_PHOTO = 3
BINS = (48, 64, 96, 160)  # recall is reported for sides in [48, 64), [64, 96), [96, 160) and [160, max]


def parse_args(argv: list[str] | None = None):
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument(
        "--detectors", nargs="+", default=DETECTORS, help="specs: centerface, haar, FILE.onnx, FILE.xml[:k=v,..]"
    )
    p.add_argument("--photos", type=int, default=160, help="photos, half plain and half cluttered")
    p.add_argument("--sizes", type=int, nargs=2, default=(48, 240), metavar=("MIN", "MAX"), help="face sides in px")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 24 <= args.sizes[0] <= args.sizes[1] <= 240:  # three faces of up to 240 px always fit on 640x480
        p.error(f"--sizes must satisfy 24 <= MIN <= MAX <= 240, got {args.sizes[0]} {args.sizes[1]}")
    if args.quick:  # 8 photos, and the two detectors' defaults
        args.photos = 8
        if args.detectors == DETECTORS:
            args.detectors = ["centerface", "haar"]
    return args


def detector_from_spec(spec: str, threads: int) -> FaceDetector:
    """``centerface``, ``haar``, ``FILE.onnx`` (YuNet) or ``FILE.xml`` (a Haar cascade), then optional
    ``:key=value,...`` (numbers) for its class's constructor; CenterFace gets ``threads`` unless set there."""
    name, _, options = spec.partition(":")
    kwargs: dict[str, float] = {}
    for item in filter(None, options.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"{spec}: expected key=value after ':', got {item!r}")
        try:
            kwargs[key] = float(value) if "." in value or "e" in value.lower() else int(value)
        except ValueError:
            raise SystemExit(f"{spec}: {key} takes a number, got {value!r}") from None
    try:
        return make_detector(name, kwargs.pop("min_size", MIN_FACE), kwargs.pop("threads", threads), **kwargs)
    except (TypeError, ValueError, FileNotFoundError) as e:  # ferkit's errors name the file already
        raise SystemExit(str(e) if str(e).startswith(name) else f"{spec}: {e}") from None


def compose(crops: np.ndarray, n_photos: int, sizes: tuple[int, int], seed: int) -> list[tuple[np.ndarray, list]]:
    """``n_photos`` decoded JPEG photos (RGB) with the squares (x, y, side) where faces were pasted."""
    rng = np.random.default_rng(seed)
    order = iter(rng.permutation(len(crops)))
    w, h = PHOTO_SIZE
    photos = []
    for i in range(n_photos):
        canvas = plain_canvas(seed + i) if i % 2 == 0 else cluttered_canvas(mirror=i % 4 == 3)
        slots: list[tuple[int, int, int]] = []
        while len(slots) < FACES_PER_PHOTO:
            side = int(np.exp(rng.uniform(np.log(sizes[0]), np.log(sizes[1] + 1))))
            x, y = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
            if all(x + side <= sx or sx + ss <= x or y + side <= sy or sy + ss <= y for sx, sy, ss in slots):
                paste(canvas, crops[next(order)], (x, y, side))
                slots.append((x, y, side))
        photos.append((load_image(encode_jpeg(canvas, quality=90)), slots))
    return photos


def matches(boxes: list[Box], slots: list[tuple[int, int, int]]) -> list[bool]:
    """For each slot, whether a box not used by an earlier slot has its centre inside it and a fitting size."""
    used: set[int] = set()
    found = []
    for x, y, side in slots:
        hit = next(
            (
                j
                for j, (bx, by, bw, bh) in enumerate(boxes)
                if j not in used
                and x <= bx + bw / 2 < x + side
                and y <= by + bh / 2 < y + side
                and 0.35 <= max(bw, bh) / side <= 1.25
            ),
            None,
        )
        if hit is not None:
            used.add(hit)
        found.append(hit is not None)
    return found


def bench(spec: str, photos: list[tuple[np.ndarray, list]], threads: int) -> dict:
    detector = detector_from_spec(spec, threads)
    detector.detect(photos[0][0])  # warm-up
    sides, found, false_boxes, ms = [], [], 0, []
    for rgb, slots in photos:
        t0 = time.perf_counter()
        boxes = detector.detect(rgb)
        ms.append((time.perf_counter() - t0) * 1000)
        hits = matches(boxes, slots)
        sides += [s for _, _, s in slots]
        found += hits
        false_boxes += len(boxes) - sum(hits)
    sides_a, found_a = np.asarray(sides), np.asarray(found)
    row: dict = {"detector": spec, "recall": float(found_a.mean())}
    edges = [*BINS, np.inf]
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (sides_a >= lo) & (sides_a < hi)
        row[f"recall_{lo}+" if hi == np.inf else f"recall_{lo}-{int(hi) - 1}"] = (
            float(found_a[sel].mean()) if sel.any() else None
        )
    ms_a = np.asarray(ms)
    plain, cluttered = ms_a[0::2], ms_a[1::2]
    row.update(
        false_boxes=false_boxes,
        ms_mean=float(ms_a.mean()),
        ms_plain=float(plain.mean()),
        ms_cluttered=float(cluttered.mean()) if len(cluttered) else None,
    )
    print(f"{spec}: recall {row['recall']:.3f}, {false_boxes} false boxes, {row['ms_mean']:.1f} ms/photo", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = opencv_threads(args.threads)
    data = load_fer(args.data)
    crops, _ = data.split("PublicTest")
    photos = compose(crops, args.photos, tuple(args.sizes), args.seed)
    n_faces = sum(len(s) for _, s in photos)
    rows = [bench(spec, photos, threads) for spec in args.detectors]
    print()
    bins = [c for c in rows[0] if c.startswith("recall_")]
    print_table(
        rows,
        ["detector", "recall", *bins, "false_boxes", "ms_mean", "ms_plain", "ms_cluttered"],
        title=f"{len(photos)} photos 640x480, {n_faces} PublicTest faces of {args.sizes[0]}-{args.sizes[1]} px, "
        f"{threads} OpenCV / ONNX Runtime thread(s)",
    )
    if args.quick:
        print("(--quick: tiny settings, the numbers mean nothing)")
    write_report(
        "face_detection",
        {
            "quick": args.quick,
            "settings": {
                "photos": len(photos),
                "faces": n_faces,
                "face_sides_px": list(args.sizes),
                "seed": args.seed,
                "threads": threads,
                "match": "box centre inside the pasted square, box side 0.35-1.25 x the square's",
            },
            "rows": rows,
            "machine": machine_info(threads),
        },
        args.out_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
