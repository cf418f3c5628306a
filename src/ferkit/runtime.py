"""Where models run: ONNX Runtime sessions on the CPU, shared by the emotion models and the CenterFace face
detector, and the torch device of training and evaluation."""

from __future__ import annotations

import contextlib
import numbers
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import MAX_THREADS, PROGRESS_LOG_INTERVAL_S

if TYPE_CHECKING:
    import torch
    from tqdm import tqdm


def check_count(name: str, value: object, none_means: str = "", maximum: int | None = None) -> None:
    """Refuse anything but a whole number of at least 1 (and at most ``maximum``; a bool or a float: refused) as
    ``name``; ``none_means``: what None stands for, where None is allowed."""
    if none_means and value is None:
        return
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        allowed = f" (None: {none_means})" if none_means else ""
        raise ValueError(f"{name} must be a whole number of at least 1{allowed}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value!r}")


def warn_caller(message: str) -> None:
    """Warn (a UserWarning) at the first caller outside ferkit, the user's line that led to it, wherever in
    ferkit it arose (Python 3.11's warnings.warn has no ``skip_file_prefixes``)."""
    package, frame, level = os.path.dirname(__file__) + os.sep, sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level + 1)


def progress_bar(iterable: Any = None, *, enabled: bool = True, **options: Any) -> tqdm:
    """A tqdm bar on stderr (``enabled=False``: nothing drawn, its methods do nothing) with ``options``
    (desc, total, unit, ...). Into a file or pipe (a nohup log, CI) it redraws every PROGRESS_LOG_INTERVAL_S
    seconds, not ten times a second: an epoch wrote thousands of lines to the log."""
    from tqdm import tqdm

    if not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):  # tqdm's monitor draws every maxinterval too
        options = {"mininterval": PROGRESS_LOG_INTERVAL_S, "maxinterval": PROGRESS_LOG_INTERVAL_S, **options}
    return tqdm(iterable, disable=not enabled, dynamic_ncols=True, **options)


def cpu_session(path: str | Path, threads: int | None, what: str, arena: bool = True, spin: bool = True) -> Any:
    """An ``onnxruntime.InferenceSession`` of ``path`` on the CPU with ``threads`` intra-op threads (None: all
    cores); a file ONNX Runtime cannot load is a ValueError naming it as ``what``. ``arena=False`` returns
    each run's memory to the system (else a large input's gigabytes stay with the process). ``spin=False``:
    its threads sleep as soon as a run ends, instead of spinning a while for the next one, on cores that
    another session (the one that runs next) needs."""
    import onnxruntime as ort

    check_count("threads", threads, none_means="all cores", maximum=MAX_THREADS)
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = arena
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if threads is not None:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        why = str(e)
        with contextlib.suppress(OSError), open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":  # ONNX Runtime says 'Wire format was corrupt'
                why = "a zip file: a torch checkpoint renamed .onnx?"
        raise ValueError(f"{path}: not a loadable {what} ({why})") from e


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; ``auto`` and ``cuda`` take this process's local GPU
    under torchrun (``local_rank``)."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":  # where each process sees one GPU (CUDA_VISIBLE_DEVICES set per process), that one
        name = f"cuda:{local_rank % max(1, torch.cuda.device_count())}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:  # torch's message lists its thirty-odd device types
        raise ValueError(f"device {name!r}: not a device (auto, cpu, cuda or cuda:N)") from None
