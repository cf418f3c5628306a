"""Shared helpers of the benchmark scripts: timing, scores, tables, machine info and JSON reports.

Imports only the standard library and numpy at module level, so that helper scripts running in other
virtualenvs (``_fer_helper.py`` in ``.venv-fer``) can use the same timing code.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT / "data" / "fer2013.npz"
REPORTS = ROOT / "reports"


# ---------------------------------------------------------------------------------------------- options


def base_parser(description: str, data: bool = True) -> argparse.ArgumentParser:
    """An argparse parser with the options every benchmark has: --threads, --out-dir, --quick, and --data (the
    FER-2013 cache, read by :func:`load_fer`) unless not ``data``."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if data:
        p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="FER-2013 cache")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch / ONNX Runtime (0 = all cores)")
    p.add_argument("--out-dir", type=Path, default=REPORTS, help="folder of the JSON report")
    p.add_argument("--quick", action="store_true", help="tiny settings to check that the script runs (no real numbers)")
    return p


def load_fer(path: Path) -> Any:
    """The FER-2013 cache at ``path`` (ferkit.data.load_dataset); exits with how to make it when there is none."""
    from ferkit.data import load_dataset

    if not Path(path).exists():
        sys.exit(f"{path}: no FER-2013 cache; make it first: ferkit prepare <fer2013.csv or image folder> -o {path}")
    return load_dataset(path, progress=False)


def threads_or_cores(n: int) -> int:
    return n if n > 0 else (os.cpu_count() or 1)


def opencv_threads(n: int) -> int:
    """``--threads`` (0 = all cores) for OpenCV too, with a warning when the machine is busy; returns it."""
    import cv2  # here, not at the top: the fer virtualenv's helper imports this module without OpenCV

    threads = threads_or_cores(n)
    cv2.setNumThreads(threads)
    warn_if_busy(threads)
    return threads


# ---------------------------------------------------------------------------------------------- timing


def throughput(fn: Callable[[], Any], items_per_call: int, min_time: float = 3.0, min_calls: int = 3, warmup: int = 2):
    """Items per second of ``fn`` (which processes ``items_per_call`` items a call): ``warmup`` untimed calls,
    then calls until both ``min_calls`` and ``min_time`` seconds are reached. Returns a dict with the rate."""
    for _ in range(warmup):
        fn()
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - t0
        if calls >= min_calls and elapsed >= min_time:
            break
    return {"items_per_s": calls * items_per_call / elapsed, "calls": calls, "seconds": elapsed}


def latencies_ms(fn: Callable[[int], Any], runs: int, warmup: int = 5) -> list[float]:
    """Wall-clock milliseconds of ``runs`` calls ``fn(i)`` (after ``warmup`` untimed calls)."""
    for i in range(warmup):
        fn(i)
    out = []
    for i in range(runs):
        t0 = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def summarize_ms(samples: Sequence[float]) -> dict[str, float]:
    """p50, p95, mean, min and max of latency samples in ms."""
    a = np.asarray(samples, dtype=np.float64)
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p95_ms": float(np.percentile(a, 95)),
        "mean_ms": float(a.mean()),
        "min_ms": float(a.min()),
        "max_ms": float(a.max()),
        "runs": len(a),
    }


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


# ---------------------------------------------------------------------------------------------- scores


def predict_batched(fn: Callable[[np.ndarray], Any], x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Concatenated ``np.asarray(fn(batch))`` over ``x`` in batches (x: preprocessed model inputs)."""
    return np.concatenate([np.asarray(fn(x[i : i + batch_size])) for i in range(0, len(x), batch_size)])


def scores(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy and macro F1 (``ferkit evaluate``'s) of class probabilities (N, C) against integer labels (N,)."""
    from ferkit.evaluate import macro_f1

    pred, y_true = np.asarray(probs).argmax(1), np.asarray(y_true)
    return {"accuracy": float((pred == y_true).mean()), "macro_f1": macro_f1(y_true, pred), "n": int(len(y_true))}


# ---------------------------------------------------------------------------------------------- output


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:  # nan
            return "-"
        if abs(v) <= 1:
            return f"{v:.4f}"
        return f"{v:.2f}" if abs(v) < 100 else f"{v:,.1f}"
    return str(v)


def print_table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None, title: str | None = None) -> str:
    """Print ``rows`` (dicts) as an aligned text table and return it; numbers right-aligned."""
    columns = list(columns or (rows[0] if rows else []))
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True))

    out = [line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells]
    if title:
        out.insert(0, title)
    text = "\n".join(s.rstrip() for s in out)
    print(text, flush=True)
    return text


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """CPU model, cores, OS, Python and the versions of the numeric libraries that are importable."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    for mod in ("torch", "onnxruntime", "cv2", "tensorflow", "keras", "fer"):
        if mod in sys.modules or mod in ("torch", "onnxruntime"):
            try:
                info[mod] = __import__(mod).__version__
            except Exception:  # not installed here
                info[mod] = None
    return info


def write_report(name: str, payload: dict[str, Any], out_dir: Path = REPORTS) -> Path:
    """Write ``out_dir/<name>.json`` atomically, with the time (UTC) and the command line added.

    A ``--quick`` run (``payload["quick"]``) writes ``<name>_quick.json`` so it never replaces real numbers."""
    from ferkit.fileio import atomic_write

    if payload.get("quick"):
        name += "_quick"

    doc = {
        "benchmark": name,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "revision": git_revision(),
        **payload,
    }
    data = json.dumps(doc, indent=1, default=_json_default).encode() + b"\n"
    path = atomic_write(Path(out_dir) / f"{name}.json", lambda f: f.write(data))
    print(f"wrote {path}", flush=True)
    return path


def git_revision() -> str | None:
    """The project's commit (``+`` when its code has changes since), None outside a git checkout."""
    import subprocess

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        if head.returncode != 0:
            return None
        code = ("src", "benchmarks", "configs", "scripts", "pyproject.toml")  # not reports/: benchmarks write there
        return head.stdout.strip() + ("+" if git("diff", "HEAD", "--quiet", "--", *code).returncode else "")
    except OSError:  # no git
        return None


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def warn_if_busy(threads: int) -> None:
    """Print a warning when the 1-minute load average says other processes compete for the CPU."""
    if not hasattr(os, "getloadavg"):
        return
    load = os.getloadavg()[0]
    if load > 0.5:
        print(
            f"warning: 1-minute load average is {load:.1f} before starting; timings are only meaningful "
            f"on an otherwise idle machine ({os.cpu_count()} cores, {threads} threads used)",
            file=sys.stderr,
            flush=True,
        )


def float_and_int8(model: Path, int8: Path | None) -> tuple[Path | None, Path | None]:
    """The (float, int8) ONNX files that ``--model`` and ``--int8`` name; exits with a clear message on a
    missing file. ``model`` may be a float export (its int8 form is ``int8``, or None: quantize it) or an int8
    file such as the shipped model (any graph with quantized operators), which is then benchmarked alone (no
    float rows: none is shipped)."""
    import onnx

    for path in (model, int8):
        if path is not None and not path.is_file():
            sys.exit(f"{path}: ONNX model not found")
    quantized_ops = {
        "QuantizeLinear",
        "DequantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "ConvInteger",
        "MatMulInteger",
    }

    def quantized(path: Path) -> bool:
        return any(n.op_type in quantized_ops for n in onnx.load(str(path), load_external_data=False).graph.node)

    if int8 is not None and not quantized(int8):
        sys.exit(f"{int8} has no quantized operators: --int8 takes an int8 export")
    if not quantized(model):
        return model, int8
    if int8 is not None:
        sys.exit(f"{model} is already int8: pass its float32 export (ferkit export CHECKPOINT -o FILE) as --model")
    return None, model
