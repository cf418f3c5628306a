"""ferkit vs the `fer` PyPI package, side by side on the same FER-2013 PrivateTest crops and machine.

Classifiers only: every model gets the same 48x48 PrivateTest crops, each with its own preprocessing
(ferkit: /255 at 48x48; fer: bilinear resize to 64x64, /255, (x - 0.5) * 2, as ``FER.detect_emotions``
does). `fer` runs in its own virtualenv (``.venv-fer``, made by ``benchmarks/setup_fer_venv.sh``; never a
dependency of ferkit) through ``_fer_helper.py`` in a subprocess; ferkit runs in this process. Their
columns are mapped to ferkit's classes by name. faces/s is the classifier on preprocessed batches of
``--batch-size`` with ``--threads`` threads on both sides (fer's TFLite path classifies one face a call).

    .venv/bin/python benchmarks/compare_fer_package.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import (
    ROOT,
    base_parser,
    float_and_int8,
    load_fer,
    machine_info,
    predict_batched,
    print_table,
    scores,
    threads_or_cores,
    throughput,
    warn_if_busy,
    write_report,
)

from ferkit.data import CLASSES, model_input, stratified_subset
from ferkit.inference import DEFAULT_MODEL, OnnxBackend

FER_VENV = ROOT / ".venv-fer"
HELPER = Path(__file__).resolve().parent / "_fer_helper.py"
SETUP = "bash benchmarks/setup_fer_venv.sh"


def parse_args(argv: list[str] | None = None):
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_MODEL,
        help="ferkit ONNX model, int8 or float32 (default: the shipped one)",
    )
    p.add_argument("--limit", type=int, default=0, help="PrivateTest images (0 = all 3,589)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size of the faces/s numbers")
    p.add_argument("--min-time", type=float, default=5.0, help="seconds of timed calls per faces/s number")
    p.add_argument("--fer-python", type=Path, default=FER_VENV / "bin" / "python", help="python of the fer venv")
    p.add_argument("--fer-variants", default="keras,tflite", help="keras (mini-Xception .hdf5) and/or tflite")
    p.add_argument("--no-int8", action="store_true", help="skip ferkit's int8 ONNX row (with a float32 --model)")
    p.add_argument("--calibration", type=int, default=512, help="Training crops for ferkit's int8 calibration")
    p.add_argument("--int8", type=Path, help="an int8 export of a float32 --model, instead of quantizing it")
    args = p.parse_args(argv)
    if args.quick:
        args.limit, args.min_time, args.calibration = args.limit or 300, 0.3, 64
    return args


def check_fer_env(python: Path) -> str:
    """The `fer` version in the fer venv; exits with instructions when that venv or package is missing."""
    if not python.exists():
        sys.exit(
            f"error: {python} not found. The `fer` package lives in its own virtualenv (it needs TensorFlow and "
            f"must never be a ferkit dependency); create it with:\n    {SETUP}"
        )
    probe = "import os; os.environ['TF_CPP_MIN_LOG_LEVEL']='3'; import fer, tensorflow, cv2; print(fer.__version__)"
    r = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(
            f"error: {python} cannot import fer, tensorflow and cv2:\n{r.stderr.strip()[-2000:]}\n"
            f"(re)create the fer virtualenv with:\n    {SETUP}"
        )
    return r.stdout.strip().splitlines()[-1]


def run_fer(args, crops: np.ndarray, threads: int, tmp: Path) -> tuple[dict[str, np.ndarray], dict]:
    np.save(tmp / "crops.npy", crops)
    cmd = [
        str(args.fer_python),
        str(HELPER),
        "--crops",
        str(tmp / "crops.npy"),
        "--out-dir",
        str(tmp),
        "--variants",
        args.fer_variants,
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(threads),
        "--min-time",
        str(args.min_time),
    ]
    print("running fer:", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"error: the fer helper failed (exit {r.returncode}):\n{r.stderr.strip()[-4000:]}")
    print(r.stdout.strip(), flush=True)
    meta = json.loads((tmp / "meta.json").read_text())
    theirs = [name.lower() for name in meta["labels"]]
    if sorted(theirs) != sorted(CLASSES):
        sys.exit(f"error: fer's labels {theirs} are not ferkit's classes {list(CLASSES)}")
    order = [theirs.index(c) for c in CLASSES]  # their column of each ferkit class
    probs = {v: np.load(tmp / f"probs_{v}.npy")[:, order] for v in meta["variants"]}
    return probs, meta


def run_ferkit(name: str, path: Path, crops: np.ndarray, threads: int, args) -> tuple[np.ndarray, dict]:
    backend = OnnxBackend(path, threads)
    x = model_input(crops)
    probs = predict_batched(backend, x, args.batch_size)
    b = min(args.batch_size, len(x))
    rate = throughput(lambda: backend(x[:b]), b, args.min_time)
    print(f"{name}: {rate['items_per_s']:.0f} faces/s", flush=True)
    return probs, {"faces_per_s": rate["items_per_s"], "timing": rate}


def _onnx_params(path: Path) -> int | None:
    """Weights and biases in an ONNX graph, float or quantized (not the scales and zero points of its
    QuantizeLinear/DequantizeLinear nodes, nor int64 shape constants)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return None
    graph = onnx.load(str(path)).graph
    qdq = {i for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") for i in n.input[1:]}
    return int(
        sum(
            numpy_helper.to_array(t).size
            for t in graph.initializer
            if t.name not in qdq and t.data_type != onnx.TensorProto.INT64
        )
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = threads_or_cores(args.threads)
    fer_version = check_fer_env(args.fer_python)
    warn_if_busy(threads)
    float_model, int8_model = float_and_int8(args.model, args.int8)
    if float_model is None and args.no_int8:
        sys.exit(f"{args.model} is int8: --no-int8 would leave no ferkit row")

    data = load_fer(args.data)
    crops, labels = stratified_subset(*data.split("PrivateTest"), args.limit)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ferkit-vs-fer-") as tmp:
        tmp = Path(tmp)
        fer_probs, fer_meta = run_fer(args, crops, threads, tmp)

        name = "ferkit " + args.model.stem
        models = [(name, "ONNX Runtime fp32", float_model)] if float_model is not None else []
        if int8_model is None and not args.no_int8:
            from ferkit.export import calibration_sample, quantize_int8

            calib = calibration_sample(data.split("Training")[0], args.calibration)  # as `ferkit export --int8`
            int8_model = quantize_int8(float_model, tmp / f"{float_model.stem}_int8.onnx", calib)
        if int8_model is not None and not args.no_int8:
            models.append((name, "ONNX Runtime int8", int8_model))
        params = _onnx_params(args.model)
        for name, runtime, path in models:
            probs, info = run_ferkit(f"{name} ({runtime})", path, crops, threads, args)
            rows.append(
                {"model": name, "runtime": runtime, "input": "48x48", **scores(labels, probs), **info, "params": params}
            )

    runtimes = {"keras": "TensorFlow/Keras fp32", "tflite": "TFLite int8, 1 face/call"}
    for variant, probs in fer_probs.items():
        v = fer_meta["variants"][variant]
        rows.append(
            {
                "model": f"fer {fer_version} mini-Xception",
                "runtime": runtimes[variant],
                "input": "x".join(map(str, v["input_size"])) + " (from 48x48)",
                **scores(labels, probs),
                "faces_per_s": v["faces_per_s"],
                "timing": v["timing"],
                "params": v["params"],
                "file": v["file"],
            }
        )

    print()
    print_table(
        rows,
        ["model", "runtime", "input", "params", "accuracy", "macro_f1", "faces_per_s"],
        title=f"FER-2013 PrivateTest (n={len(labels)}), classifier only, batch {args.batch_size}, {threads} threads",
    )
    if args.quick:
        print("(--quick: tiny settings, the numbers mean nothing)")

    write_report(
        "compare_fer",
        {
            "quick": args.quick,
            "settings": {
                "ferkit_model": str(args.model),
                "ferkit_int8": "the model itself" if float_model is None else str(args.int8 or "quantized on the fly"),
                "privatetest_images": len(labels),
                "batch_size": args.batch_size,
                "threads": threads,
                "min_time_s": args.min_time,
                "fer_variants": args.fer_variants,
            },
            "notes": [
                "classifiers only, on the same FER-2013 PrivateTest 48x48 crops; no face detection",
                "fer preprocessing as fer.FER.detect_emotions: cv2.resize to 64x64 (bilinear), /255, (x-0.5)*2",
                "fer columns mapped to ferkit classes by name",
                "faces/s: model calls on preprocessed batches; fer's TFLite path runs one face per call",
            ],
            "rows": rows,
            "machine": machine_info(threads),
            "fer_environment": fer_meta["environment"],
        },
        args.out_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
