"""Inference speed and accuracy of the shipped model (int8 ONNX); given its float32 export, also torch eager
and ONNX Runtime fp32, fp16 and int8 side by side.

Model only: faces/s at batch sizes 64 and 256, batch-1 latency (p50/p95) and accuracy / macro F1 on all of
FER-2013 PrivateTest. With a float32 export in ``--model``, the cost of int8 is measured next to its
speed-up: the int8 model is ``--int8`` or made with ``ferkit.export.quantize_int8`` in a temp folder,
calibrated on 512 Training crops; the fp16 one with ``ferkit.export.convert_fp16``. torch runs only
when ``--checkpoint`` gives the training checkpoint (.pt) of the model.

End to end: latency of ``EmotionRecognizer.predict`` (JPEG decode, face detection, crops, model) on a
640x480 photo with one face and one with five, composed from real PrivateTest crops upscaled onto a
canvas; crops are picked so that the default detector finds exactly the intended faces (checked on the
decoded JPEG).

    .venv/bin/python benchmarks/inference_speed.py --threads 2       # the shipped int8 model
    .venv/bin/python benchmarks/inference_speed.py --model runs/export/m.onnx --int8 m_int8.onnx \
        --checkpoint runs/m/best.pt                                      # + torch, fp32, fp16 rows
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import (
    base_parser,
    float_and_int8,
    latencies_ms,
    load_fer,
    machine_info,
    opencv_threads,
    predict_batched,
    print_table,
    scores,
    summarize_ms,
    throughput,
    write_report,
)
from _photos import encode_jpeg, paste, plain_canvas

from ferkit.config import TTA_MODES
from ferkit.data import CLASSES, SPLITS, model_input
from ferkit.export import calibration_sample, convert_fp16, quantize_int8
from ferkit.faces import crop_faces, make_detector
from ferkit.inference import DEFAULT_MODEL, EmotionRecognizer, OnnxBackend, TorchBackend, load_image

# (x, y, side) of each face on the canvas
LAYOUTS = {
    1: [(220, 120, 200)],
    5: [(40, 40, 130), (255, 40, 130), (470, 40, 130), (147, 290, 130), (362, 290, 130)],
}


def parse_args(argv: list[str] | None = None):
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", type=Path, default=DEFAULT_MODEL, help="ONNX model, int8 or float32 (default: the shipped one)"
    )
    p.add_argument("--checkpoint", type=Path, help="training checkpoint of the same model, for the torch row")
    p.add_argument("--batch-sizes", default="64,256", help="comma-separated batch sizes for faces/s")
    p.add_argument("--min-time", type=float, default=5.0, help="seconds of timed calls per throughput number")
    p.add_argument("--latency-runs", type=int, default=300, help="batch-1 calls per latency number")
    p.add_argument("--e2e-runs", type=int, default=100, help="EmotionRecognizer.predict calls per photo")
    p.add_argument("--calibration", type=int, default=512, help="Training crops for int8 calibration")
    p.add_argument("--int8", type=Path, help="an int8 export of a float32 --model, instead of quantizing it")
    p.add_argument("--limit", type=int, default=0, help="PrivateTest images for accuracy (0 = all 3,589)")
    p.add_argument("--no-int8-e2e", action="store_true", help="end to end with the fp32 model only")
    p.add_argument("--tta", default="flip,crops", help="TTA modes timed end to end, comma-separated")
    args = p.parse_args(argv)
    if args.quick:
        args.min_time, args.latency_runs, args.e2e_runs = 0.2, 10, 5
        args.calibration, args.limit = 64, args.limit or 256
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b]
    args.tta = [t for t in str(args.tta).split(",") if t]
    if not args.tta or not set(args.tta) <= set(TTA_MODES):
        p.error(f"--tta: comma-separated modes of {', '.join(TTA_MODES)}")
    return args


# ---------------------------------------------------------------------------------------------- model only


def bench_backend(name: str, backend, crops: np.ndarray, labels: np.ndarray, args) -> tuple[dict, np.ndarray]:
    print(f"{name}: accuracy on {len(crops)} PrivateTest crops ...", flush=True)
    inputs = model_input(crops)
    probs = predict_batched(backend, inputs)
    row: dict = {"backend": name, **scores(labels, probs)}
    for b in args.batch_sizes:
        x = inputs[np.arange(b) % len(inputs)]
        r = throughput(lambda x=x: backend(x), b, min_time=args.min_time)
        row[f"faces_per_s_b{b}"] = r["items_per_s"]
        print(f"{name}: batch {b}: {r['items_per_s']:.0f} faces/s", flush=True)
    lat = summarize_ms(latencies_ms(lambda i: backend(inputs[i % len(inputs)][None]), args.latency_runs))
    row["b1_p50_ms"], row["b1_p95_ms"] = lat["p50_ms"], lat["p95_ms"]
    row["b1_latency"] = lat
    return row, probs


# ---------------------------------------------------------------------------------------------- photos


def _detected_slots(detector, jpeg: bytes, slots: list[tuple[int, int, int]]) -> bool:
    """True when ``detector`` finds exactly one box per slot (box centre inside the slot) and nothing else."""
    boxes = detector.detect(load_image(jpeg))
    if len(boxes) != len(slots):
        return False
    hits = [0] * len(slots)
    for bx, by, bw, bh in boxes:
        cx, cy = bx + bw / 2, by + bh / 2
        for k, (x, y, side) in enumerate(slots):
            if x <= cx < x + side and y <= cy < y + side:
                hits[k] += 1
    return all(h == 1 for h in hits)


def compose_photo(n_faces: int, detector, crops: np.ndarray, labels: np.ndarray, max_tries: int = 2000):
    """A JPEG photo with ``n_faces`` PrivateTest faces that ``detector`` finds exactly; returns the
    JPEG bytes, the RGB array and the chosen PrivateTest indices. Candidates alternate between classes."""
    slots = LAYOUTS[n_faces]
    rng = np.random.default_rng(n_faces)
    per_class = [list(rng.permutation(np.flatnonzero(labels == c))) for c in range(len(CLASSES))]
    order = [per_class[c][i] for i in range(max(map(len, per_class))) for c in range(7) if i < len(per_class[c])]
    canvas, chosen, tries = plain_canvas(n_faces), [], 0
    candidates = iter(order)
    for k in range(len(slots)):
        for idx in candidates:
            tries += 1
            if tries > max_tries:
                raise RuntimeError(f"no {n_faces}-face photo that the detector finds exactly within {max_tries} crops")
            trial = canvas.copy()
            paste(trial, crops[idx], slots[k])
            if _detected_slots(detector, encode_jpeg(trial), slots[: k + 1]):
                canvas, chosen = trial, [*chosen, int(idx)]
                break
        else:
            raise RuntimeError(f"ran out of PrivateTest crops for face {k + 1} of the {n_faces}-face photo")
    jpeg = encode_jpeg(canvas)
    assert _detected_slots(detector, jpeg, slots)
    return jpeg, canvas, chosen, tries


def bench_end_to_end(recognizer: EmotionRecognizer, photos: dict, runs: int) -> list[dict]:
    rows = []
    for n, photo in photos.items():
        faces = recognizer.predict(photo["jpeg"])
        if len(faces) != n:
            raise RuntimeError(f"expected {n} faces, EmotionRecognizer.predict found {len(faces)}")
        total = summarize_ms(latencies_ms(lambda i, j=photo["jpeg"]: recognizer.predict(j), runs))
        rgb = load_image(photo["jpeg"])
        boxes = recognizer.detector.detect(rgb)
        crops = crop_faces(rgb, boxes, margin=recognizer.margin)
        decode = summarize_ms(latencies_ms(lambda i, j=photo["jpeg"]: load_image(j), runs))
        detect = summarize_ms(latencies_ms(lambda i, rgb=rgb: recognizer.detector.detect(rgb), runs))
        model = summarize_ms(latencies_ms(lambda i, c=crops: recognizer.classify_crops(c), runs))
        rows.append(
            {
                "model": Path(recognizer.model_info["path"]).name,
                "tta": recognizer.tta,
                "faces": n,
                "p50_ms": total["p50_ms"],
                "p95_ms": total["p95_ms"],
                "decode_alone_p50_ms": decode["p50_ms"],  # each stage timed on its own, in a loop of its own
                "detect_alone_p50_ms": detect["p50_ms"],
                "model_alone_p50_ms": model["p50_ms"],
                "latency": total,
                "predicted": [f.emotion for f in faces],
            }
        )
        p50, p95 = total["p50_ms"], total["p95_ms"]
        print(f"end to end, TTA {recognizer.tta}, {n} face(s): p50 {p50:.1f} ms, p95 {p95:.1f} ms", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = opencv_threads(args.threads)
    float_model, int8_model = float_and_int8(args.model, args.int8)

    data = load_fer(args.data)
    test_x, test_y = data.split("PrivateTest")
    test_sources = data.sources[data.splits == SPLITS.index("PrivateTest")]
    test_idx = np.arange(len(test_y))
    if args.limit:
        test_idx = np.sort(np.random.default_rng(0).permutation(len(test_y))[: args.limit])
    crops, labels = test_x[test_idx], test_y[test_idx]

    rows, probs = [], {}
    with tempfile.TemporaryDirectory(prefix="ferkit-int8-") as tmp:
        backends = {}
        if args.checkpoint:
            import torch

            torch.set_num_threads(threads)
            backends["torch eager fp32"] = TorchBackend(args.checkpoint)
        if float_model is not None:
            backends["onnxruntime fp32"] = OnnxBackend(float_model, threads)
        if quantized := int8_model is None:
            calib = calibration_sample(data.split("Training")[0], args.calibration)  # as `ferkit export --int8`
            print(f"quantizing to int8 (calibration: {len(calib)} Training crops) ...", flush=True)
            int8_model = quantize_int8(float_model, Path(tmp) / (float_model.stem + "_int8.onnx"), calib)
        backends["onnxruntime int8"] = OnnxBackend(int8_model, threads)
        if float_model is not None:
            fp16_path = convert_fp16(float_model, Path(tmp) / (float_model.stem + "_fp16.onnx"))
            backends["onnxruntime fp16"] = OnnxBackend(fp16_path, threads)
        for name, backend in backends.items():
            row, probs[name] = bench_backend(name, backend, crops, labels, args)
            rows.append(row)
        if (ref := probs.get("onnxruntime fp32")) is not None:
            for row in rows:
                p = probs[row["backend"]]
                row["top1_agree_fp32"] = float((p.argmax(1) == ref.argmax(1)).mean())
                row["max_abs_diff_fp32"] = float(np.abs(p - ref).max())

        print("composing the test photos (the detector must find exactly the intended faces) ...", flush=True)
        detector = make_detector(threads=threads)
        photos = {}
        for n in LAYOUTS:
            jpeg, rgb, chosen, tries = compose_photo(n, detector, crops, labels)
            photos[n] = {"jpeg": jpeg, "privatetest_index": [int(test_idx[i]) for i in chosen], "tries": tries}
            photos[n]["sources"] = [str(test_sources[test_idx[i]]) for i in chosen]
            out = args.out_dir / f"inference_speed_photos{'_quick' if args.quick else ''}" / f"{n}face.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(jpeg)
            photos[n]["file"] = str(out)
        e2e_models = [float_model] if float_model is not None else []
        if float_model is None or not args.no_int8_e2e:
            e2e_models.append(int8_model)
        e2e = []
        for path in e2e_models:
            for tta in args.tta:
                rec = EmotionRecognizer(path, detector=detector, threads=threads, tta=tta)
                e2e += bench_end_to_end(rec, photos, args.e2e_runs)

    print()
    cols = ["backend", "accuracy", "macro_f1", *[f"faces_per_s_b{b}" for b in args.batch_sizes]]
    print_table(
        rows,
        [*cols, "b1_p50_ms", "b1_p95_ms", *(["top1_agree_fp32"] if float_model is not None else [])],
        title=f"model only: {args.model.name}, {threads} threads, PrivateTest n={len(labels)}",
    )
    print()
    print_table(
        e2e,
        ["model", "tta", "faces", "p50_ms", "p95_ms"] + [f"{s}_alone_p50_ms" for s in ("decode", "detect", "model")],
        title=f"EmotionRecognizer.predict on a 640x480 JPEG, default detector, {args.e2e_runs} runs",
    )
    if args.quick:
        print("(--quick: tiny settings, the numbers mean nothing)")

    write_report(
        "inference_speed",
        {
            "quick": args.quick,
            "settings": {
                "model": str(args.model),
                "checkpoint": str(args.checkpoint) if args.checkpoint else None,
                "int8_model": str(args.int8 or (args.model if float_model is None else "quantized on the fly")),
                "threads": threads,
                "batch_sizes": args.batch_sizes,
                "min_time_s": args.min_time,
                "latency_runs": args.latency_runs,
                "e2e_runs": args.e2e_runs,
                "e2e_tta": args.tta,
                "calibration_images": args.calibration if quantized else None,
                "privatetest_images": len(labels),
            },
            "model_only": rows,
            "end_to_end": e2e,
            "photos": {str(n): {k: v for k, v in p.items() if k != "jpeg"} for n, p in photos.items()},
            "machine": machine_info(threads),
        },
        args.out_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
