"""ferkit: facial expression recognition on FER-2013 — train, evaluate, detect emotions in photos and video."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# ONNX Runtime writes a device id and usage events under ~/.cache/Microsoft and, in a process that lives a while
# (serve, a video), looks up Microsoft's telemetry server: ferkit uses no network. Set before any ferkit module
# imports onnxruntime; a user's own ORT_DISABLE_TELEMETRY is kept.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

if TYPE_CHECKING:
    from .inference import (
        EmotionRecognizer,
        FaceResult,
        ImageError,
        ImageInput,
        ImageTooLargeError,
        NotAnImageError,
        annotate,
        load_image,
    )
    from .media import Record, predict_paths

__version__ = "0.1.0"
__all__ = [
    "EmotionRecognizer",
    "FaceResult",
    "ImageError",
    "ImageInput",
    "ImageTooLargeError",
    "NotAnImageError",
    "annotate",
    "load_image",
    "predict_paths",
    "Record",
]
_MEDIA = ("predict_paths", "Record")  # images, folders and videos; the rest is ferkit.inference's


def __getattr__(name: str) -> Any:
    """The inference API (``from ferkit import EmotionRecognizer``), imported on first use so that
    ``import ferkit`` and the command line stay fast."""
    if name in __all__:
        from importlib import import_module

        return getattr(import_module(f".{'media' if name in _MEDIA else 'inference'}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
