"""Crop margin: the shipped model's accuracy on faces cut from each detector's boxes with several margins.

Each PublicTest face (the split for choices) is upscaled to 192 px and given 96 px of context on every side by
replicating its border (a 384x384 photo, the face where FER-2013 framed it); each detector looks for it, and
where it finds exactly one face near the centre, the face is cropped from its box with each ``--margins``
value (``crop_faces``, as ``predict`` does) and classified without TTA. The accuracy per margin is over the same
faces, so margins compare pairwise; ``direct`` is the model on FER-2013's own crops of those faces. Writes
reports/crop_margin.json.

    .venv/bin/python benchmarks/crop_margin.py --threads 2
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
from _common import base_parser, load_fer, machine_info, opencv_threads, print_table, write_report

from ferkit.config import DEFAULT_MODEL
from ferkit.faces import crop_faces, make_detector
from ferkit.inference import EmotionRecognizer

FACE, CONTEXT = 192, 96  # the face's side and the replicated border around it, in pixels


def parse_args(argv: list[str] | None = None):
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--detectors", nargs="+", default=["centerface", "haar"], help="detectors (as --detector)")
    p.add_argument("--margins", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.15, 0.2])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the model (default: the shipped one)")
    p.add_argument("--faces", type=int, default=0, help="PublicTest faces, a random sample (0 = all 3,589)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.faces = 24
    return args


def photo(face: np.ndarray) -> np.ndarray:
    """A 48x48 face upscaled to FACE px inside CONTEXT px of its replicated border, as RGB."""
    big = cv2.resize(face, (FACE, FACE), interpolation=cv2.INTER_CUBIC)
    return cv2.cvtColor(cv2.copyMakeBorder(big, *[CONTEXT] * 4, cv2.BORDER_REPLICATE), cv2.COLOR_GRAY2RGB)


def bench(name: str, faces: np.ndarray, labels: np.ndarray, rec: EmotionRecognizer, margins: list[float], threads: int):
    detector, centre = make_detector(name, threads=threads), CONTEXT + FACE / 2

    def near(box: tuple[int, int, int, int]) -> bool:  # the box's centre within a quarter face of the face's
        return max(abs(box[0] + box[2] / 2 - centre), abs(box[1] + box[3] / 2 - centre)) < FACE / 4

    right = {m: [] for m in margins}
    found = []
    for face, label in zip(faces, labels, strict=True):
        rgb = photo(face)
        boxes = [b for b in detector.detect(rgb) if near(b)]
        found.append(len(boxes) == 1)
        if found[-1]:
            for m in margins:
                right[m].append(rec.classify_crops(crop_faces(rgb, boxes, margin=m))[0].argmax() == label)
    found_mask = np.array(found)
    direct = rec.classify_crops(faces[found_mask]).argmax(1) == labels[found_mask]
    row = {"detector": name, "found": float(found_mask.mean()), "direct": float(direct.mean())}
    row.update({f"margin_{m:g}": float(np.mean(right[m])) for m in margins})
    print(f"{name}: {found_mask.sum()} of {len(faces)} faces found", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = opencv_threads(args.threads)
    x, y = load_fer(args.data).split("PublicTest")
    pick = np.random.default_rng(args.seed).permutation(len(x))[: args.faces or len(x)]
    rec = EmotionRecognizer(args.model, tta="none", threads=threads)
    rows = [bench(name, x[pick], y[pick], rec, args.margins, threads) for name in args.detectors]
    print()
    print_table(
        rows,
        ["detector", "found", "direct", *[f"margin_{m:g}" for m in args.margins]],
        title=f"accuracy on the found faces of {len(pick)} PublicTest faces, model {rec.model_info['name']}, no TTA",
    )
    if args.quick:
        print("(--quick: tiny settings, the numbers mean nothing)")
    settings = {"faces": len(pick), "seed": args.seed, "face_px": FACE, "context_px": CONTEXT, "threads": threads}
    payload = {"quick": args.quick, "settings": settings, "model": rec.model_info["name"], "rows": rows}
    write_report("crop_margin", {**payload, "machine": machine_info(threads)}, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
