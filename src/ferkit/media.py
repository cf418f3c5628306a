"""Inputs for batch prediction: files, folders (recursively), videos and webcams -> per-image records.

One bad input never stops a batch: it becomes a record with an ``error`` naming the file and reason.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from .config import VIDEO_EVERY
from .fileio import atomic_write, check_writable, visible_files
from .images import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from .inference import EmotionRecognizer, FaceResult, ImageError, annotate, load_image
from .runtime import check_count, progress_bar

ANNOTATED_NAME = re.compile(r".+_annotated(_\d+)?\.(png|mp4)")  # what --annotate writes (see _unique_name)
# ffmpeg's own log lines ("moov atom not found") would repeat the errors ferkit reports, naming the file;
# OpenCV reads this when its ffmpeg backend starts, so it is set before any video is opened.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET


@dataclass
class Record:
    """The faces found in one image or video frame, or the error that stopped it."""

    source: str
    faces: list[FaceResult] = field(default_factory=list)
    frame: int | None = None
    time_s: float | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"source": self.source}
        if self.frame is not None:
            d.update(frame=self.frame, time_s=round(self.time_s or 0.0, 3))
        if self.error is not None:
            d["error"] = self.error
        else:
            d["faces"] = [f.to_dict() for f in self.faces]
        return d


def expand_paths(paths: list[str | Path], skip: str | Path | None = None) -> list[Path]:
    """Files as given (so a bad one gets reported), and folders searched by :func:`_search`; a folder with
    no image or video stays in the list, to be reported too."""
    out: list[Path] = []
    for p in map(Path, paths):
        out += (sorted(_search(p, skip)) if p.is_dir() else []) or [p]
    return out


def _search(folder: Path, skip: str | Path | None) -> Iterator[Path]:
    """The images and videos below ``folder`` (and links to nothing, to be reported), through linked folders
    (each real folder once), but not hidden files and folders (``._a.jpg`` of macOS, ``.ipynb_checkpoints/``)
    nor annotated outputs, which a next run would take as inputs: the folder ``skip`` where it lies below
    ``folder``, or the files named as ferkit names them where ``skip`` is ``folder`` itself."""
    exts = {*IMAGE_EXTENSIONS, *VIDEO_EXTENSIONS}
    outputs = os.path.realpath(skip) if skip is not None else None
    unreadable: list[OSError] = []  # folders that cannot be listed: reported (they were skipped without a word)
    for path in visible_files(folder, unreadable.append, outputs):
        if path.suffix.lower() not in exts:
            continue
        if outputs is not None and ANNOTATED_NAME.fullmatch(path.name) and os.path.realpath(path.parent) == outputs:
            continue
        yield path
    yield from (Path(e.filename) for e in unreadable if e.filename is not None and Path(e.filename) != folder)


@contextlib.contextmanager
def _opencv_quiet() -> Iterator[None]:
    """OpenCV's log without its warnings (errors still shown) for the time of the block."""
    import cv2

    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


def _fps(cap: Any) -> float:
    """The frame rate an opened ``cv2.VideoCapture`` reports, or 30 where the container gives none."""
    import cv2

    fps = cap.get(cv2.CAP_PROP_FPS)
    return fps if fps > 0 else 30.0


class VideoFrames:
    """(frame index, time in seconds, RGB frame) for every ``every``-th frame of a video file or camera;
    ``decoded`` counts the frames decoded so far, sampled or not (after the loop: all that could be).

    A file's time is the frame's own timestamp (so that a phone's variable-frame-rate video does not drift)
    from its first frame's, or the last time plus the last gap where the container gives none or no later one
    (raw H.264, an MPEG stream's last frame, an AVI's B-frames); a ``live`` source's (a camera: its number, a
    device path or a stream URL such as ``rtsp://...``; a number is live) is the time since its first frame.
    ``end`` is when the last frame decoded ends, in the same time."""

    def __init__(self, source: str | int, every: int = 1, live: bool | None = None) -> None:
        check_count("every", every)
        self.source, self.every, self.decoded, self.end = source, every, 0, 0.0
        self.live = isinstance(source, int) if live is None else live

    def _open(self) -> Any:
        import cv2

        if not self.live:
            if not os.access(self.source, os.R_OK):  # OpenCV would try every backend, and log each
                raise ImageError(f"{self.source}: permission denied")
            cap = cv2.VideoCapture(self.source)
            if not cap.isOpened():
                raise ImageError(f"{self.source}: cannot open as a video file (not a video, or an MP4/MOV cut short)")
            return cap
        with _opencv_quiet():  # OpenCV warns of each backend that found no such camera
            cap = cv2.VideoCapture(self.source)
        if not cap.isOpened():
            raise ImageError(f"{_camera_name(self.source)}: cannot open (no such camera or stream, or no access to it)")
        return cap

    def __iter__(self) -> Iterator[tuple[int, float, np.ndarray]]:
        import cv2

        cap = self._open()
        start, step = None, 1 / _fps(cap)  # step: the last gap between timestamps, else the frame rate's
        t = -step  # the first frame's time is 0
        try:
            while cap.grab():
                index = self.decoded
                self.decoded += 1
                if self.live:
                    now = time.monotonic()
                    start = now if start is None else start
                    t = now - start
                else:
                    stamp = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000  # the grabbed frame's
                    if start is None and math.isfinite(stamp):  # the first timestamp, maybe after frames without
                        start = stamp - (t + step)
                    if start is not None and math.isfinite(stamp) and stamp - start > t + 1e-6:  # a microsecond later
                        step, t = stamp - start - t, stamp - start
                    else:
                        t += step
                self.end = t + step
                if index % self.every == 0:
                    ok, bgr = cap.retrieve()
                    if ok:
                        yield index, t, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        finally:
            cap.release()


def predict_camera(
    recognizer: EmotionRecognizer, camera: int | str, every: int = 1, fallback: bool = False
) -> Iterator[Record]:
    """One :class:`Record` per ``every``-th frame of ``camera`` (its number, a device path such as
    ``/dev/video2`` or a stream URL such as ``rtsp://host/stream``), until it stops; an error record when it
    opens but gives no frame (a camera in use elsewhere, or a device that is not a camera)."""
    source, frames = f"webcam:{_without_password(camera)}", 0
    for index, t, rgb in VideoFrames(camera, every, live=True):
        frames += 1
        yield Record(source, recognizer.predict(rgb, whole_image_fallback=fallback), frame=index, time_s=t)
    if frames == 0:
        yield Record(source, error=f"{_camera_name(camera)}: opened, but gave no frame")


def _camera_name(camera: int | str) -> str:
    """How errors name a live source: ``camera 0``, or the path or URL as given (without a password)."""
    return f"camera {camera}" if isinstance(camera, int) else _without_password(camera)


def _without_password(source: int | str) -> str:
    """``source`` as printed: a stream URL's user and password (``rtsp://admin:secret@host/``) left out."""
    from urllib.parse import urlsplit

    url = urlsplit(str(source))
    if not url.scheme or "@" not in url.netloc:
        return str(source)
    return url._replace(netloc=url.netloc.rpartition("@")[2]).geturl()


def video_info(path: str | Path) -> tuple[int, float]:
    """A video file's frame count (0 if unknown) and frame rate (30 if unknown)."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    n, fps = (int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), _fps(cap)) if cap.isOpened() else (0, 30.0)
    cap.release()
    return max(0, n), fps


def _unlisted_video(path: Path) -> bool:
    """Whether a file named on the command line with a suffix that is neither an image's nor a video's
    (``clip.bin``) is a video: Pillow knows no image format of it (one ferkit refuses, TGA say, stays an image),
    and OpenCV decodes two frames of it."""
    import cv2
    from PIL import Image, UnidentifiedImageError

    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return False
    try:
        with Image.open(path):
            return False
    except UnidentifiedImageError:
        pass
    except Exception:  # an image Pillow will not open (too large, say), or no file: reported as an image
        return False
    with _opencv_quiet():  # a file that is no video is a question answered here, not FFmpeg's warning
        cap = cv2.VideoCapture(str(path))
        try:
            return cap.isOpened() and cap.grab() and cap.grab()
        finally:
            cap.release()


def _unique_name(name: str, used: set[str]) -> str:
    """``name``, or ``stem_2.ext``, ``stem_3.ext``... if an earlier input already wrote it."""
    stem, dot, ext = name.rpartition(".")
    candidate, k = name, 1
    while candidate in used:
        k += 1
        candidate = f"{stem}_{k}{dot}{ext}"
    used.add(candidate)
    return candidate


def _annotate_dir(path: str | Path | None) -> Path | None:
    """The folder for annotated outputs, created and written to now, so that a bad one fails before any work."""
    if path is None:
        return None
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        check_writable(path / "x_annotated.png")
    except (FileExistsError, NotADirectoryError) as e:
        raise ValueError(f"{path}: cannot be the folder for annotated outputs: it or a parent is a file") from e
    except OSError as e:
        raise ValueError(f"{path}: cannot write annotated outputs there ({e.strerror or e})") from e
    return path


def _save_annotated(rgb: np.ndarray, faces: list[FaceResult], path: Path) -> None:
    """Write the annotated image to ``path`` (PNG), atomically."""
    import cv2

    ok, png = cv2.imencode(".png", cv2.cvtColor(annotate(rgb, faces), cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"{path}: could not encode the annotated image")
    atomic_write(path, lambda f: f.write(png.tobytes()))


def predict_paths(
    recognizer: EmotionRecognizer,
    paths: str | Path | Sequence[str | Path],
    every: int = VIDEO_EVERY,
    annotate_dir: str | Path | None = None,
    fallback: bool = False,
    progress: bool = True,
) -> Iterator[Record]:
    """Run ``recognizer`` over images, folders and videos (one path or a list of them), one :class:`Record` per
    image or sampled frame (every ``every``-th of a video). ``annotate_dir`` is checked (and created) now, before
    the first record is asked for."""
    if isinstance(paths, (str, os.PathLike)):  # a string is one path, not a sequence of one-letter paths
        paths = [paths]
    files = expand_paths(paths, skip=annotate_dir)
    return _predict_files(recognizer, files, every, _annotate_dir(annotate_dir), fallback, progress)


def _predict_files(
    recognizer: EmotionRecognizer,
    files: list[Path],
    every: int,
    out_dir: Path | None,
    fallback: bool,
    progress: bool,
) -> Iterator[Record]:
    # the inputs in the output folder: an annotated picture named as one would replace it, unread
    used = {p.name for p in files if out_dir is not None and p.parent.resolve() == out_dir.resolve()}
    for path in progress_bar(files, enabled=progress and len(files) > 1, desc="predicting", unit="file"):
        if path.is_dir():
            readable = os.access(path, os.R_OK | os.X_OK)
            yield Record(str(path), error=f"{path}: " + ("no images or videos in this folder" if readable else
                                                         "cannot read this folder (permission denied)"))  # fmt: skip
            continue
        if path.is_file() and (path.suffix.lower() in VIDEO_EXTENSIONS or _unlisted_video(path)):
            name = _unique_name(f"{path.stem}_annotated.mp4", used)
            yield from _predict_video(recognizer, path, every, out_dir, name, fallback, progress)
            continue
        stdin = str(path) == "-"  # an image on standard input (`cat photo.jpg | ferkit predict -`)
        try:
            rgb = load_image(sys.stdin.buffer.read() if stdin else path, recognizer.max_pixels)  # bytes: a video told
            faces = recognizer.predict(rgb, whole_image_fallback=fallback)
        except (ImageError, OSError) as e:
            yield Record(str(path), error=str(e))
            continue
        yield Record(str(path), faces)
        if out_dir is not None:
            stem = "stdin" if stdin else path.stem
            try:
                _save_annotated(rgb, faces, out_dir / _unique_name(f"{stem}_annotated.png", used))
            except OSError as e:  # the faces are reported above; only the picture is missing
                yield Record(str(path), error=f"annotated image not written: {e}")


def _mpeg4_fps(fps: float) -> float:
    """``fps`` rounded as little as lets MPEG-4 hold it: OpenCV gives FFmpeg a time base of 1000 / round(fps x
    1000), whose denominator once reduced (the numerator of fps as a fraction of 1000) must stay under 65536
    (1000/3 fps, of a 1000 fps clip's every third frame, could not be written; 333.33 can)."""
    for digits in (3, 2, 1):
        rounded = round(fps, digits)
        if rounded > 0 and Fraction(round(rounded * 1000), 1000).numerator <= 65535:
            return rounded
    return float(min(max(1, round(fps)), 65535))


class _AnnotatedVideo:
    """Annotated frames written to ``path`` as MP4: into a hidden partial file, renamed when complete."""

    def __init__(self, path: Path, fps: float) -> None:
        self.path, self.fps = path, _mpeg4_fps(fps)
        self.partial = path.with_name(f".{path.name}.partial.mp4")
        self.writer: Any = None
        self.frames = 0

    def write(self, rgb: np.ndarray) -> bool:
        """Add a frame (RGB); False if the file cannot be opened for writing (nothing is left of it)."""
        import cv2

        if self.writer is None:
            size = (rgb.shape[1], rgb.shape[0])
            self.writer = cv2.VideoWriter(str(self.partial), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, size)
            if not self.writer.isOpened():
                self.close()
                return False
        self.writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        self.frames += 1
        return True

    def finish(self) -> None:
        """Complete the file, if a frame was written; raises OSError if it cannot be put in place."""
        if self.writer is not None:
            self.writer.release()
            self.writer = None
            # cv2.VideoWriter.write reports nothing: a full disk left a file without its index (unplayable)
            count, _ = video_info(self.partial)
            if count != self.frames:
                self.partial.unlink(missing_ok=True)
                raise OSError(f"{self.path}: the video writer stored {count} of {self.frames} frames (disk full?)")
            os.replace(self.partial, self.path)

    def close(self) -> None:
        """Release the writer and remove an unfinished file."""
        if self.writer is not None:
            self.writer.release()
            self.writer = None
        self.partial.unlink(missing_ok=True)


def _predict_video(
    recognizer: EmotionRecognizer,
    path: Path,
    every: int,
    out_dir: Path | None,
    out_name: str,
    fallback: bool,
    progress: bool,
) -> Iterator[Record]:
    total, fps = video_info(path)
    video = _AnnotatedVideo(out_dir / out_name, fps / every) if out_dir is not None else None
    decoded = VideoFrames(str(path), every)
    bar = progress_bar(total=-(-total // every) if total else None, enabled=progress, desc=path.name, unit="frame")
    frames = 0
    try:
        for index, t, rgb in decoded:
            frames += 1
            try:
                faces = recognizer.predict(rgb, whole_image_fallback=fallback)
            except ImageError as e:  # a frame over --max-pixels: every frame is
                raise ImageError(f"{path}: frame {index}: {e}") from e
            bar.update()
            if video is not None and not video.write(annotate(rgb, faces)):  # the frames are still reported
                yield Record(str(path), error=f"{video.path}: cannot write the annotated video")
                video = None
            yield Record(str(path), faces, frame=index, time_s=t)
        if frames == 0:
            yield Record(str(path), error=f"{path}: no video frame could be decoded")
        if video is not None:
            try:
                video.finish()
            except OSError as e:  # the frames are reported above; only the video is missing
                yield Record(str(path), error=f"annotated video not written: {e}")
        # a cut file falls short of its header's frame count and of its length (count / average frame rate) by
        # over a second and a tenth: the count may be an estimate (MKV/WebM: length x the highest frame rate), and
        # a last frame held long (a slideshow's) makes the length longer than the last timestamp and gap say
        length = total / fps
        if (
            frames
            and total - decoded.decoded >= max(1 + fps, 0.1 * total)
            and length - decoded.end >= max(1.0, 0.1 * length)
        ):
            yield Record(
                str(path),
                error=f"{path}: decoding stopped at {decoded.end:.2f} s (after frame {decoded.decoded - 1}) of the "
                f"{length:.2f} s ({total} frames) its header announces (truncated or damaged file?); the frames "
                "before it are reported",
            )
    except ImageError as e:
        yield Record(str(path), error=str(e))
    finally:
        bar.close()
        if video is not None:
            video.close()
