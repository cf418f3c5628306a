"""Runs the `fer` PyPI package's emotion classifier on face crops; used by compare_fer_package.py.

Runs in the separate virtualenv that has `fer` and TensorFlow (.venv-fer, see setup_fer_venv.sh), never in
ferkit's. Reads uint8 crops (N, 48, 48) from a .npy file, preprocesses them exactly as
``fer.FER.detect_emotions`` does (``cv2.resize`` to the model's input size with the default bilinear
interpolation, ``/ 255``, ``(x - 0.5) * 2``) and classifies them with ``FER._classify_emotions``, their own
code path, for each variant:

- ``keras``: ``FER(use_tflite=False)``, the mini-Xception Keras model ``fer/data/emotion_model.hdf5``;
- ``tflite``: ``FER()`` (their default since 25.x), ``fer/data/emotion_model_quantized.tflite``, one face
  per interpreter call.

Writes ``probs_<variant>.npy`` (columns in their label order) and ``meta.json`` (label names, versions,
faces/s of the classifier on preprocessed batches) into --out-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
from _common import machine_info, predict_batched, throughput  # noqa: E402


def preprocess(crops: np.ndarray, target_size: tuple[int, int]) -> np.ndarray:
    """fer.FER.detect_emotions' preprocessing of grayscale face crops (their lines, vectorised alike)."""
    import cv2

    faces = np.array([cv2.resize(c, tuple(int(s) for s in target_size)) for c in crops], dtype="float32")
    faces = faces / 255.0
    return (faces - 0.5) * 2.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--crops", type=Path, required=True)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--variants", default="keras,tflite")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--min-time", type=float, default=5.0)
    args = p.parse_args()

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import fer
    from fer.fer import FER

    crops = np.load(args.crops)
    meta: dict = {"labels": [FER._get_labels()[i] for i in range(len(FER._get_labels()))], "variants": {}}
    for variant in [v for v in args.variants.split(",") if v]:
        if variant not in ("keras", "tflite"):
            sys.exit(f"unknown variant {variant!r}: use keras and/or tflite")
        det = FER(use_tflite=variant == "tflite")
        target = det._FER__emotion_target_size  # (64, 64) for both shipped models
        x = preprocess(crops, target)
        probs = predict_batched(det._classify_emotions, x, args.batch_size).astype(np.float32)
        np.save(args.out_dir / f"probs_{variant}.npy", probs)
        b = min(args.batch_size, len(x))
        batch = x[:b]
        rate = throughput(lambda batch=batch, det=det: np.asarray(det._classify_emotions(batch)), b, args.min_time)
        pre = throughput(lambda c=crops[:b], t=target: preprocess(c, t), b, min(1.0, args.min_time))
        if variant == "keras":
            model = det._FER__emotion_classifier
            params, file = model.count_params(), "emotion_model.hdf5"
        else:
            params, file = None, "emotion_model_quantized.tflite"
        meta["variants"][variant] = {
            "file": str(Path(fer.__file__).parent / "data" / file),
            "input_size": list(target),
            "params": params,
            "faces_per_s": rate["items_per_s"],
            "timing": rate,
            "preprocess_faces_per_s": pre["items_per_s"],
            "batch_size": b,
        }
        print(f"fer {variant}: {rate['items_per_s']:.0f} faces/s", flush=True)
    meta["environment"] = {**machine_info(args.threads), "python_executable": sys.executable}
    (args.out_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
