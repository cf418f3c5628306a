"""Face detection and cropping: image -> face boxes -> 48x48 grayscale crops, fully offline.

The default detector is CenterFace, a small CNN shipped inside the package (``weights/centerface.onnx``, run
by ONNX Runtime); OpenCV's Haar cascade (inside ``opencv-python-headless<5``) and YuNet (OpenCV's
``FaceDetectorYN`` with a model file the user passes) are the alternatives. All downscale large images for
detection (no further than keeps a ``min_size`` face detectable), return boxes in the original image's
pixels, and skip faces smaller than ``min_size`` pixels: by default the model's 48 px input (the ``fer``
package uses 50), since smaller faces are mostly noise once upscaled and they cost detection most of its
time; pass 24 or 32 for crowds.
"""

from __future__ import annotations

import numbers
import threading
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from .config import CENTERFACE, IMAGE_SIZE, MARGIN, MIN_FACE
from .fileio import not_a_file
from .runtime import check_count, cpu_session

Box = tuple[int, int, int, int]  # x, y, width, height in original-image pixels


class FaceDetector(Protocol):
    """Anything that finds faces: ``detect(rgb) -> [(x, y, w, h), ...]``."""

    def detect(self, rgb: np.ndarray) -> list[Box]: ...


def _downscale(img: np.ndarray, max_side: int, min_scale: float = 0.0) -> tuple[np.ndarray, float]:
    """Shrink ``img`` to ``max_side`` on its long side, but by no less than ``min_scale``; never enlarge; no
    side below 1 pixel."""
    scale = min(1.0, max(min_scale, max_side / max(img.shape[:2])))
    if scale < 1.0:
        size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    return img, scale


def _to_gray(img: np.ndarray) -> np.ndarray:
    """8-bit grayscale (ITU-R 601) from any image :func:`_to_rgb` takes."""
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    return img if img.ndim == 2 and img.dtype == np.uint8 else cv2.cvtColor(_to_rgb(img), cv2.COLOR_RGB2GRAY)


def _to_rgb(img: np.ndarray) -> np.ndarray:
    """An 8-bit RGB image from 8-bit RGB, RGBA (alpha dropped) or grayscale (2-D or one channel)."""
    if img.dtype != np.uint8:
        raise ValueError(f"expected an 8-bit image (uint8), got {img.dtype}: load files with ferkit.load_image")
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3, 4)):
        raise ValueError(f"expected an RGB, RGBA or grayscale image, got an array of shape {img.shape}")
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_RGBA2RGB)
    return img if img.ndim == 3 and img.shape[2] == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)


def fit_boxes(boxes: Any, shape: tuple[int, ...], scale: float = 1.0) -> list[Box]:
    """Boxes (a list of (x, y, w, h) or an (N, 4) array, as any detector may give) divided by ``scale`` and
    clipped to an image of ``shape``, those left without area dropped; sorted left to right. Anything else
    (boxes of 5 numbers with a score, None) is a ValueError: reshaped, it became other boxes."""
    try:
        a = np.asarray(boxes if boxes is not None else (), dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"face detector: expected (x, y, w, h) boxes, got {str(boxes)[:80]} ({e})") from None
    if a.size == 0:
        return []
    if a.shape == (4,):  # one box, not in a list
        a = a[None]
    if a.ndim != 2 or a.shape[1] != 4:
        raise ValueError(f"face detector: expected (x, y, w, h) boxes, an (N, 4) array; got shape {a.shape}")
    out = []
    h, w = shape[:2]
    for x, y, bw, bh in a / scale:
        x0, y0 = max(0, round(x)), max(0, round(y))
        x1, y1 = min(w, round(x + bw)), min(h, round(y + bh))
        if x1 > x0 and y1 > y0:
            out.append((x0, y0, x1 - x0, y1 - y0))
    return sorted(out)  # left to right, a stable order for tables and tests


def _cv_message(e: BaseException) -> str:
    """The one-line gist of an error OpenCV raised (directly or as the cause)."""
    e = e.__cause__ or e
    return " ".join((getattr(e, "err", None) or str(e)).split())


class HaarDetector:
    """OpenCV's frontal-face Haar cascade (bundled with OpenCV 4.x)."""

    def __init__(
        self,
        cascade: str | Path | None = None,
        scale_factor: float = 1.15,
        min_neighbors: int = 5,
        min_size: int = MIN_FACE,
        max_side: int = 1024,
    ) -> None:
        if cascade is None:
            data = getattr(cv2, "data", None)
            if data is None:
                raise RuntimeError(
                    "this OpenCV has no bundled Haar cascades (OpenCV 5 removed them): "
                    "install opencv-python-headless<5 or pass a cascade/YuNet model file"
                )
            cascade = Path(data.haarcascades) / "haarcascade_frontalface_default.xml"
        if problem := not_a_file(cascade, "Haar cascade file"):
            raise FileNotFoundError(f"{cascade}: {problem}")
        try:
            self.classifier = cv2.CascadeClassifier(str(cascade))
        except (cv2.error, SystemError) as e:  # a malformed XML file: OpenCV raises SystemError
            raise RuntimeError(f"{cascade}: not a loadable Haar cascade file ({_cv_message(e)})") from e
        if self.classifier.empty():
            raise RuntimeError(f"{cascade}: not a loadable Haar cascade file")
        self.scale_factor, self.min_neighbors, self.min_size, self.max_side = (
            scale_factor,
            min_neighbors,
            min_size,
            max_side,
        )
        self._lock = threading.Lock()  # one OpenCV detector is not safe to run from two threads at once

    def detect(self, rgb: np.ndarray) -> list[Box]:
        # Haar finds faces reliably from about 1.7 times its window (24 px): shrink no further than
        # keeps a min_size face that large (40 px), or faces over min_size are missed in large photos
        reliable = 1.7 * min(self.classifier.getOriginalWindowSize())
        gray, scale = _downscale(_to_gray(rgb), self.max_side, reliable / self.min_size)
        gray = cv2.equalizeHist(gray)
        min_size = round(self.min_size * scale)
        with self._lock:
            boxes = self.classifier.detectMultiScale(
                gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(min_size, min_size)
            )
        return fit_boxes(boxes, rgb.shape, scale)


class CenterFaceDetector:
    """CenterFace (a MobileNetV2 CNN trained on WIDER FACE; MIT licence) on ONNX Runtime, shipped in
    ``weights/centerface.onnx``; thread-safe.

    The network boxes faces from about 16 px to ``largest`` px (larger ones it misjudges or splits in two), so
    it looks at a photo on a short pyramid. The first level is the photo shrunk towards ``max_side`` on its
    long side, but no further than keeps a ``min_size`` face ``reliable`` pixels wide, and to ``max_input``
    pixels at most (the memory of the network grows with it: photos larger than ``max_input / reliable *
    min_size`` lose their smallest faces). While a level is over 1.5 times ``largest`` (so that a face too
    large for it could fit in it), the next is shrunk by up to 4 times; each level but the last keeps only the
    faces it judges right, each level but the first only faces of ``coarse_min`` pixels or more on it, and NMS
    merges the levels. Boxes are the network's: taller than wide, from the hairline to the chin. The defaults
    are measured (benchmarks/face_detection.py, README)."""

    stride = 4  # input pixels per output cell: the network predicts its face-centre heatmap at 1/4 scale
    # the largest face box in network pixels that it judges right: on the astronaut's face upscaled, its boxes
    # follow the face up to about 500 px, then fall behind it, and a face of about 900 px splits in two
    largest = 384
    # the smallest box a coarser level keeps: under it, a small face of a large photo, shrunk again, was boxed
    # with its head and shoulders too (IoU 0.26 with its own box, under NMS's threshold): a second face
    coarse_min = 32

    def __init__(
        self,
        model_path: str | Path = CENTERFACE,
        score_threshold: float = 0.3,
        nms_threshold: float = 0.3,
        min_size: int = MIN_FACE,
        max_side: int = 320,
        reliable: int = 32,
        max_input: int = 2048,
        threads: int | None = None,
    ) -> None:
        if problem := not_a_file(model_path, "CenterFace model file"):
            raise FileNotFoundError(f"{model_path}: {problem}")
        # arena off: a large photo's gigabytes are freed. A pool of threads (threads != 1) does not spin after a
        # photo: the emotion model runs next on the same cores (benchmarks/inference_speed.py --threads 2, end to
        # end: 24.4 / 40.0 ms for 1 / 5 faces with spinning, 23.3 / 35.9 without); one thread keeps the default
        spin = threads == 1
        self.session = cpu_session(model_path, threads, "CenterFace model", arena=False, spin=spin)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if [i.name for i in inputs] != ["input.1"] or len(outputs) != 4:
            raise ValueError(f"{model_path}: not a CenterFace model (one input 'input.1' and four outputs expected)")
        self.score_threshold, self.nms_threshold = score_threshold, nms_threshold
        self.min_size, self.max_side, self.reliable, self.max_input = min_size, max_side, reliable, max_input

    def _run(self, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (x, y, w, h) in ``img``'s pixels and their scores, before NMS."""
        h, w = img.shape[:2]
        img = cv2.copyMakeBorder(img, 0, -h % 32, 0, -w % 32, cv2.BORDER_CONSTANT)  # sides: multiples of 32
        blob = np.ascontiguousarray(img.transpose(2, 0, 1)[None], dtype=np.float32)
        heat, size, offset, _ = self.session.run(None, {"input.1": blob})
        ys, xs = np.nonzero(heat[0, 0] > self.score_threshold)
        bh, bw = np.exp(size[0, :, ys, xs].T.reshape(2, -1)) * self.stride
        cy = (ys + offset[0, 0, ys, xs] + 0.5) * self.stride
        cx = (xs + offset[0, 1, ys, xs] + 0.5) * self.stride
        return np.stack([cx - bw / 2, cy - bh / 2, bw, bh], axis=1), heat[0, 0, ys, xs]

    def detect(self, rgb: np.ndarray) -> list[Box]:
        rgb = _to_rgb(rgb)
        long = max(rgb.shape[:2])
        scale = min(1.0, max(self.reliable / self.min_size, self.max_side / long), self.max_input / long)
        boxes, scores, scales = [], [], []
        while True:
            level, scale = _downscale(rgb, round(long * scale))
            found, score = self._run(level)
            last = max(level.shape[:2]) <= 1.5 * self.largest
            side = found[:, 2:].max(axis=1)
            fits = (side <= self.largest) | last
            if boxes:  # a coarser level
                fits &= side >= self.coarse_min
            found, score = found[fits], score[fits]
            boxes.append(found / scale)
            scores.append(score)
            scales.append(np.full(len(score), scale))
            if last:
                break
            scale *= max(0.25, self.largest / max(level.shape[:2]))
        boxes, scores, scales = np.concatenate(boxes), np.concatenate(scores), np.concatenate(scales)
        keep = cv2.dnn.NMSBoxes(boxes.tolist(), scores.tolist(), self.score_threshold, self.nms_threshold)
        keep = np.asarray(keep, dtype=int).reshape(-1)
        boxes = boxes[keep][~_parts_of_larger_faces(boxes[keep], scales[keep], self.largest)]
        found = fit_boxes(boxes, rgb.shape)
        return [b for b in found if max(b[2], b[3]) >= self.min_size]


def _parts_of_larger_faces(boxes: np.ndarray, scales: np.ndarray, largest: int, share: float = 0.6) -> np.ndarray:
    """Which boxes (x, y, w, h; found on pyramid levels of ``scales``) are parts of a larger face: ``share`` of
    their area inside a box that was too large (over ``largest`` pixels) for the level they were found on,
    where the network fires on parts of such a face. NMS keeps them, their overlap being small against the
    large box's area; a face partly in front of another one that the level boxes whole is kept."""
    x0, y0 = boxes[:, 0], boxes[:, 1]
    x1, y1 = x0 + boxes[:, 2], y0 + boxes[:, 3]
    area = boxes[:, 2] * boxes[:, 3]
    iw = np.clip(np.minimum(x1[:, None], x1) - np.maximum(x0[:, None], x0), 0, None)
    ih = np.clip(np.minimum(y1[:, None], y1) - np.maximum(y0[:, None], y0), 0, None)
    too_large = boxes[:, 2:].max(axis=1)[None, :] * scales[:, None] > largest  # [i, j]: j on i's level
    return ((iw * ih >= share * area[:, None]) & (area[:, None] < area) & too_large).any(axis=1)


class YuNetDetector:
    """OpenCV's YuNet CNN face detector (``cv2.FaceDetectorYN``) from a local ``.onnx`` model file."""

    def __init__(
        self, model_path: str | Path, score_threshold: float = 0.7, min_size: int = MIN_FACE, max_side: int = 1024
    ) -> None:
        if problem := not_a_file(model_path, "YuNet model file"):
            raise FileNotFoundError(f"{model_path}: {problem}")
        self.min_size, self.max_side = min_size, max_side
        self._lock = threading.Lock()  # as HaarDetector's
        level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # OpenCV logs what it raises
        try:  # a wrong network often loads, and fails only on its first image: try one
            self.net = cv2.FaceDetectorYN.create(str(model_path), "", (320, 320), score_threshold)
            self.detect(np.zeros((64, 64, 3), np.uint8))
        except cv2.error as e:
            raise ValueError(f"{model_path}: not a loadable YuNet face detector model ({_cv_message(e)})") from e
        finally:
            cv2.utils.logging.setLogLevel(level)

    def detect(self, rgb: np.ndarray) -> list[Box]:
        img, scale = _downscale(_to_rgb(rgb), self.max_side)
        with self._lock:
            self.net.setInputSize((img.shape[1], img.shape[0]))
            _, faces = self.net.detect(cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        boxes = [] if faces is None else fit_boxes(faces[:, :4], rgb.shape, scale)
        return [b for b in boxes if max(b[2], b[3]) >= self.min_size]


def onnx_detector(path: str | Path, threads: int | None = None, **kwargs: Any) -> FaceDetector:
    """The CenterFace or YuNet network of an ``.onnx`` file (told apart by its inputs and outputs), made with
    ``kwargs``; ``threads``: CenterFace's ONNX Runtime threads."""
    path = Path(path)
    if problem := not_a_file(path, "face detector model file"):
        raise FileNotFoundError(f"{path}: {problem}")
    try:
        return CenterFaceDetector(path, threads=threads, **kwargs)
    except ValueError:  # not CenterFace's one input and four outputs: YuNet's?
        pass
    try:
        return YuNetDetector(path, **kwargs)
    except ValueError as e:
        raise ValueError(f"{path}: neither a CenterFace nor a YuNet face detector model") from e


def make_detector(
    spec: str | Path | FaceDetector | None = None, min_size: int = MIN_FACE, threads: int | None = None, **options: Any
) -> FaceDetector:
    """``None``/``"centerface"``: the shipped CenterFace; ``"haar"``: OpenCV's bundled Haar cascade; a
    ``.onnx`` path: a CenterFace or YuNet network (told by its inputs and outputs); an ``.xml`` path: that
    cascade; an object with ``detect``: used as is.
    ``min_size``: smallest face side in pixels; ``threads``: CenterFace's ONNX Runtime threads; ``options``:
    other arguments of the detector's class (e.g. ``score_threshold``)."""
    check_count("min_size", min_size)
    if hasattr(spec, "detect"):
        return spec  # type: ignore[return-value]
    if spec is None or spec == "centerface":
        return CenterFaceDetector(min_size=min_size, threads=threads, **options)
    if spec == "haar":
        return HaarDetector(min_size=min_size, **options)
    path = Path(str(spec))
    if path.suffix.lower() == ".onnx":
        return onnx_detector(path, threads, min_size=min_size, **options)
    if path.suffix.lower() == ".xml":
        return HaarDetector(path, min_size=min_size, **options)
    raise ValueError(
        f"unknown face detector {spec!r}: use 'centerface', 'haar', a CenterFace or YuNet .onnx file "
        "or a cascade .xml file"
    )


def check_margin(margin: float) -> None:
    """Refuse a crop margin outside [0, 1]: a negative one can shrink a crop to nothing, a large one
    pads the image by many face sizes (1 already makes the crop three times the face box)."""
    if not isinstance(margin, numbers.Real) or isinstance(margin, bool) or not 0 <= margin <= 1:
        raise ValueError(f"margin must be between 0 and 1 (a fraction of the face box), got {margin!r}")


MAX_WINDOW = 4096  # a crop window wider than this (pixels) is shrunk before its border is padded


def crop_faces(rgb: np.ndarray, boxes: list[Box], size: int = IMAGE_SIZE, margin: float = MARGIN) -> np.ndarray:
    """Square grayscale crops (N, size, size) uint8 around each box, widened by ``margin`` of the box size
    on every side (FER-2013 faces include forehead and chin); borders are replicated past the image edge."""
    check_margin(margin)
    gray = _to_gray(rgb)
    crops = np.empty((len(boxes), size, size), dtype=np.uint8)
    height, width = gray.shape
    for i, (x, y, w, h) in enumerate(boxes):
        if w <= 0 or h <= 0 or x >= width or y >= height or x + w <= 0 or y + h <= 0:
            raise ValueError(f"face box {(x, y, w, h)} has no area inside the {width}x{height} image")
        side = max(w, h) * (1 + 2 * margin)
        cx, cy = x + w / 2, y + h / 2
        x0, y0 = round(cx - side / 2), round(cy - side / 2)
        x1, y1 = x0 + round(side), y0 + round(side)
        inside = gray[max(y0, 0) : min(y1, height), max(x0, 0) : min(x1, width)]
        pads = np.array([max(0, -y0), max(0, y1 - height), max(0, -x0), max(0, x1 - width)])  # top bottom left right
        if x1 - x0 > MAX_WINDOW:  # e.g. the whole of a 100000x10 image: shrink first, never pad it to 100000^2
            scale = MAX_WINDOW / (x1 - x0)
            shape = (max(1, round(inside.shape[1] * scale)), max(1, round(inside.shape[0] * scale)))
            inside, pads = cv2.resize(inside, shape, interpolation=cv2.INTER_AREA), np.round(pads * scale)
        face = cv2.copyMakeBorder(inside, *map(int, pads), cv2.BORDER_REPLICATE) if pads.any() else inside
        interp = cv2.INTER_AREA if face.shape[0] > size else cv2.INTER_LINEAR
        crops[i] = cv2.resize(face, (size, size), interpolation=interp)
    return crops
