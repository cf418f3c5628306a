"""The public inference API: image -> faces -> crops -> model -> per-face emotion scores.

``EmotionRecognizer`` serves the CLI, the web app and the tests. It runs an ONNX model on ONNX Runtime
(no torch needed: the core install) or a training checkpoint on torch; by default the model shipped
inside the package, so a fresh install predicts with no download.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import (  # noqa: F401 - re-exported
    DEFAULT_MODEL,
    DETECTOR,
    IMAGE_SIZE,
    MARGIN,
    MAX_THREADS,
    MIN_FACE,
    TTA,
    TTA_MODES,
)
from .data import CLASSES, model_input, scores_shape_problem, tta_views
from .faces import Box, FaceDetector, check_margin, crop_faces, fit_boxes, make_detector
from .fileio import model_files, model_name, not_a_file, parse_model_metadata, refuse_repeats, refuse_same_weights
from .images import (  # noqa: F401 - re-exported: decoding images is part of the inference API
    MAX_PIXELS,
    VIDEO_EXTENSIONS,
    ImageError,
    ImageInput,
    ImageTooLargeError,
    NotAnImageError,
    load_image,
)
from .runtime import check_count, cpu_session, warn_caller


@dataclass
class FaceResult:
    """One detected face: its box (x, y, w, h) in the original image, the top emotion and all 7 scores;
    ``whole_image`` when no face was found and the whole image was classified as one (``whole_image_fallback``)."""

    box: Box
    emotion: str
    confidence: float
    scores: dict[str, float] = field(default_factory=dict)
    whole_image: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "box": list(self.box),
            "emotion": self.emotion,
            "confidence": round(self.confidence, 5),
            "scores": {k: round(v, 5) for k, v in self.scores.items()},
            "whole_image": self.whole_image,
        }


class OnnxBackend:
    """An exported model on ONNX Runtime (CPU)."""

    kind = "onnx"

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self.session = cpu_session(path, threads, "ONNX model")
        meta = self.session.get_modelmeta().custom_metadata_map
        self.info: dict[str, Any] = parse_model_metadata(meta.get("ferkit"), path)
        self.input = self.session.get_inputs()[0].name
        self._check(path, len(self.info.get("classes", CLASSES)))
        if "classes" not in self.info:  # a model trained on the Kaggle folders in another order would be misread
            warn_caller(f"{path}: no class names in its metadata; read in FER-2013's order ({', '.join(CLASSES)})")

    def _check(self, path: str | Path, n_classes: int) -> None:
        """Refuse a model that does not map float (N, 1, 48, 48) images to ``n_classes`` probabilities."""
        bad = f"{path}: not a ferkit emotion model"
        inputs = self.session.get_inputs()
        shape = inputs[0].shape  # named or None dimensions are dynamic; the batch's must be
        fits = len(inputs) == 1 and len(shape) == 4 and not isinstance(shape[0], int)
        expected = (1, IMAGE_SIZE, IMAGE_SIZE)
        if not fits or any(isinstance(d, int) and d != e for d, e in zip(shape[1:], expected, strict=True)):
            raise ValueError(f"{bad} (input {', '.join(_dims(i.shape) for i in inputs)}, expected (N, 1, 48, 48))")
        if inputs[0].type != "tensor(float)":
            raise ValueError(f"{bad} (input type {inputs[0].type}, expected tensor(float))")
        try:
            probs = self(np.full((2, 1, IMAGE_SIZE, IMAGE_SIZE), 0.5, np.float32))
        except Exception as e:  # onnxruntime raises its own exception types
            raise ValueError(f"{bad} (fails on a (N, 1, 48, 48) input: {' '.join(str(e).split())})") from e
        if problem := scores_shape_problem(probs.shape, 2, n_classes):
            raise ValueError(f"{bad} ({problem})")
        if not np.isfinite(probs).all():
            raise ValueError(f"{bad} (its outputs are NaN or infinite: weights of a run that diverged?)")
        if not np.allclose(probs.sum(1), 1, atol=1e-3) or (probs < 0).any():
            raise ValueError(f"{bad} (its outputs are not probabilities: they do not sum to 1)")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: x})[0]

    def trained_weights(self) -> str | None:
        """The digest of the weights it was exported from, as its metadata records (checkpoint.weights_digest)."""
        return self.info.get("weights_digest")


def _dims(shape: list[Any]) -> str:
    """An ONNX shape as text, a named or unknown batch dimension as N: ``(N, 3, 224, 224)``."""
    return "(" + ", ".join(str(d) if i or isinstance(d, int) else "N" for i, d in enumerate(shape)) + ")"


class TorchBackend:
    """A training checkpoint (``.pt``) on torch."""

    kind = "torch"

    def __init__(self, path: str | Path) -> None:
        try:
            import torch
        except ImportError as e:  # a bare install: ONNX Runtime only
            raise ImportError(f"{path}: a .pt checkpoint needs torch (pip install 'ferkit[train]'; in a clone, for CPU "
                              f"torch: pip install torch==2.13.0 -e '.[train]'), or export it "
                              f"to ONNX where torch is ({e})", name=e.name) from e  # fmt: skip

        from .checkpoint import model_from_checkpoint, run_name

        self.torch = torch
        self.model, state = model_from_checkpoint(path)  # on the CPU
        self.info = {"name": run_name(path, state), "architecture": state["model"], "classes": state["classes"]}
        self.info |= state.get("metrics") or {}

    def trained_weights(self) -> str:
        """The digest of its weights (checkpoint.weights_digest)."""
        from .checkpoint import weights_digest

        return weights_digest(self.model)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.torch.softmax(self.model(self.torch.from_numpy(x)).float(), 1).numpy()


def _load_backend(path: Path, backend: str, threads: int | None) -> OnnxBackend | TorchBackend:
    """``backend``: ``onnx``, ``torch`` or ``auto`` (torch for .pt/.pth files, else ONNX Runtime)."""
    if problem := not_a_file(path, "model file"):
        raise FileNotFoundError(f"{path}: {problem}")
    checkpoint = path.suffix.lower() in (".pt", ".pth")
    if backend == "auto":
        backend = "torch" if checkpoint else "onnx"
    if {"torch": path.suffix.lower() == ".onnx", "onnx": checkpoint}.get(backend):
        needs = "a .pt checkpoint" if backend == "torch" else "an exported .onnx model (`ferkit export`)"
        raise ValueError(f"{path}: backend {backend} takes {needs}; backend auto picks the backend by file type")
    if backend == "onnx":
        return OnnxBackend(path, threads)
    if backend == "torch":
        return TorchBackend(path)
    raise ValueError(f"unknown backend {backend!r}: use auto, onnx or torch")


class EmotionRecognizer:
    """Find every face in an image and score the 7 emotions of each.

    ``model``: an ``.onnx`` export or a ``.pt`` checkpoint (default: the shipped model), or a list of them
    to average as an ensemble; a folder stands for the ``.onnx`` files in it (``models/``: the kept ensemble).
    ``backend``: ``auto`` (by file type), ``onnx`` or ``torch``. ``detector``: ``centerface``
    (default, the shipped CNN), ``haar`` (OpenCV's cascade), a CenterFace or YuNet ``.onnx`` path, a Haar
    ``.xml`` path or any object with ``detect(rgb)``. ``min_face``: smallest face side found, in pixels (48,
    the model's input, by default; smaller ones cost detection time). ``margin``: crop margin.
    ``tta``: ``flip`` averages each face and its mirror image (the default), ``none`` is faster, ``crops``
    (ten-crop) runs the model on ten views, five times flip's work.
    ``threads``: ONNX Runtime's threads, for each ONNX model and for CenterFace (default: all cores); a torch
    checkpoint runs on torch's own setting (``torch.set_num_threads``).
    One instance may be shared between threads; with OpenCV's detectors (Haar, YuNet), which are not
    thread-safe, its face detection then runs one image at a time: for parallel work give each thread its own,
    as the web app does."""

    def __init__(
        self,
        model: str | Path | list[str | Path] | None = None,
        backend: str = "auto",
        detector: str | Path | FaceDetector | None = DETECTOR,
        margin: float = MARGIN,
        threads: int | None = None,
        max_pixels: int = MAX_PIXELS,
        tta: str = TTA,
        min_face: int = MIN_FACE,
    ) -> None:
        if tta not in TTA_MODES:
            raise ValueError(f"unknown tta {tta!r}: use {', '.join(TTA_MODES)}")
        check_margin(margin)
        check_count("min_face", min_face)
        check_count("max_pixels", max_pixels)
        check_count("threads", threads, none_means="all cores", maximum=MAX_THREADS)  # a torch model with Haar: no ONNX
        members = model if isinstance(model, (list, tuple)) else [DEFAULT_MODEL if model is None else model]
        if not members:
            raise ValueError("no model given")
        if not all(isinstance(m, (str, os.PathLike)) and str(m) for m in members):
            raise ValueError(f"model must be a file path or a list of them, got {model!r}")
        paths = model_files(*members)
        refuse_repeats(paths, "ensemble member")
        self.tta = tta
        self.backends = [_load_backend(p, backend, threads) for p in paths]
        infos = [b.info for b in self.backends]
        if len(infos) > 1:
            refuse_same_weights(paths, [b.trained_weights() for b in self.backends], "ensemble member")
        self.classes: tuple[str, ...] = tuple(infos[0].get("classes", CLASSES))
        if any(tuple(i.get("classes", CLASSES)) != self.classes for i in infos):
            raise ValueError("ensemble members disagree on the class names or their order")
        self.detector = make_detector(detector, min_face, threads)
        self.margin, self.max_pixels, self.min_face = margin, max_pixels, min_face
        # how the detector was given: a name or file, or the class of a detector object (what the web app shows)
        self.detector_name = str(detector or DETECTOR) if not hasattr(detector, "detect") else type(detector).__name__
        names = [i.get("name", p.stem) for i, p in zip(infos, paths, strict=True)]
        self.model_info = {
            "name": model_name(names),
            "classes": list(self.classes),
            "accuracy": infos[0].get("accuracy") if len(infos) == 1 else None,
            "accuracy_tta": infos[0].get("tta") if len(infos) == 1 and "accuracy" in infos[0] else None,
            "path": ", ".join(map(str, paths)),
            "backend": ", ".join(sorted({b.kind for b in self.backends})),
        }

    def classify_crops(self, crops: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Probabilities (N, 7) for grayscale uint8 crops (N, 48, 48)."""
        size = (IMAGE_SIZE, IMAGE_SIZE)
        if not isinstance(crops, np.ndarray) or crops.ndim != 3 or crops.shape[1:] != size or crops.dtype != np.uint8:
            got = f"{crops.dtype} {crops.shape}" if isinstance(crops, np.ndarray) else type(crops).__name__
            raise ValueError(f"crops must be a uint8 array (N, 48, 48) as crop_faces gives, got {got}")
        check_count("batch_size", batch_size)
        out = []
        for i in range(0, len(crops), batch_size):
            x = model_input(crops[i : i + batch_size])
            views = tta_views(x, self.tta)
            out.append(sum(b(v) for b in self.backends for v in views) / (len(self.backends) * len(views)))
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def _results(self, boxes: list[Box], probs: np.ndarray, whole_image: bool = False) -> list[FaceResult]:
        results = []
        for (x, y, w, h), p in zip(boxes, probs, strict=True):
            k = int(p.argmax())
            scores = {c: float(v) for c, v in zip(self.classes, p, strict=True)}
            box = (int(x), int(y), int(w), int(h))
            results.append(FaceResult(box, self.classes[k], float(p[k]), scores, whole_image))
        return results

    def predict(self, image: ImageInput, whole_image_fallback: bool = False) -> list[FaceResult]:
        """Every face in ``image`` (a path, bytes, file object, PIL image, or an RGB or gray array: convert
        OpenCV's BGR first) with its scores; ``[]`` when no face is found, unless ``whole_image_fallback``
        classifies the whole image as one face. Folders and videos: :func:`ferkit.predict_paths`."""
        try:
            rgb = load_image(image, self.max_pixels)
        except ImageError as e:
            path = os.fspath(image) if isinstance(image, (str, os.PathLike)) else None  # os.path's never raise
            video = path is not None and os.path.isfile(path) and Path(path).suffix.lower() in VIDEO_EXTENSIONS
            if path is not None and (os.path.isdir(path) or video):
                raise type(e)(f"{e}; for folders and videos: ferkit.predict_paths, or `ferkit predict`") from None
            raise
        boxes = fit_boxes(self.detector.detect(rgb), rgb.shape)  # a custom detector's too: an array, or past the edge
        if not boxes and whole_image_fallback:
            boxes = [(0, 0, rgb.shape[1], rgb.shape[0])]
            return self._results(boxes, self.classify_crops(crop_faces(rgb, boxes, margin=0.0)), whole_image=True)
        return self._results(boxes, self.classify_crops(crop_faces(rgb, boxes, margin=self.margin)))


def annotate(
    image: ImageInput, faces: list[FaceResult], max_pixels: int = MAX_PIXELS, numbered: bool = False
) -> np.ndarray:
    """An RGB copy of ``image`` (anything :meth:`EmotionRecognizer.predict` takes, read as it reads it; a stream
    that cannot be read twice: ``rgb = load_image(stream)``, then ``predict(rgb)`` and ``annotate(rgb, faces)``)
    with every face boxed and labelled with its top emotion and confidence (``numbered``: led by its number
    from 1, ``2: happy 90%``, as the web app lists the faces); ``max_pixels`` limits what is decoded (an array
    is decoded already)."""
    import cv2

    limit = math.inf if isinstance(image, np.ndarray) else max_pixels  # predict's own limit may be higher
    out = np.array(load_image(image, limit), dtype=np.uint8, order="C")  # a copy: load_image may return its input
    thickness = max(1, round(max(out.shape[:2]) / 400))
    font_scale = max(0.4, max(out.shape[:2]) / 1200)
    for i, f in enumerate(faces, 1):
        x, y, w, h = f.box
        cv2.rectangle(out, (x, y), (x + w, y + h), (0, 200, 0), thickness)
        label = f"{i}: " * numbered + f"{f.emotion} {f.confidence:.0%}"
        scale = font_scale
        while (size := cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness))[0][0] + 4 > out.shape[1]:
            if scale < 0.2:  # an image too narrow to write on: the label cut off
                break
            scale *= 0.8
        (tw, th), base = size
        if y - th - base - 4 >= 0:  # above the box
            ty = y - 4
        elif y + h + th + base + 4 <= out.shape[0]:  # below it
            ty = y + h + th + 4
        else:  # inside its top (a box of the whole image: the label was drawn off the image)
            ty = y + th + 4
        tx = max(0, min(x, out.shape[1] - tw - 4))  # a box at the right edge: its label moved left, not cut off
        cv2.rectangle(out, (tx, ty - th - base), (tx + tw + 4, ty + base), (0, 200, 0), -1)
        cv2.putText(out, label, (tx + 2, ty), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness, cv2.LINE_AA)
    return out
