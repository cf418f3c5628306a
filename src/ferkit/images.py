"""Images in: a path, bytes, a file object, a PIL image or an array, decoded to RGB uint8 the one way that
training data (``ferkit.data``) and inference (``ferkit.inference``) share; clear errors for what is not an
image, is corrupt, or is too large to decode safely."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from .config import MAX_PIXELS
from .fileio import broken_link
from .runtime import warn_caller

MAX_UNIT_OVERSHOOT = 2.0  # a float array's pixels up to this are 0-1 values (a 0-255 image this dark is black)
MAX_8BIT_OVERSHOOT = 1023  # a float/int array's pixels up to this are 0-255 values (overshoot clipped); above: 16-bit
# the formats read (Pillow's names, MPO: a phone's JPEG): not Pillow's rarer ones, which run less used decoders
# or hand the file to another program (EPS to Ghostscript); AVIF where this Pillow has it
FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP", "TIFF", "AVIF")
# files read as images (a folder's search; files given by name are read whatever they are called)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".avif")
VIDEO_EXTENSIONS = {
    *(".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts"),
    *(".mts", ".m2ts", ".ogv", ".vob"),  # camcorders' AVCHD, Ogg, DVD
}

ImageInput = str | os.PathLike | bytes | BinaryIO | np.ndarray | Image.Image
ACCEPTED = "a path, bytes, a binary file object, a numpy array or a PIL image"


class ImageError(ValueError):
    """An input that is not a usable image; the message says which and why."""


class NotAnImageError(ImageError):
    """The data is not in any image format we can read."""


class ImageTooLargeError(ImageError):
    """The image has more pixels than allowed (checked from its header, before decoding)."""


def load_image(src: ImageInput, max_pixels: float = MAX_PIXELS) -> np.ndarray:
    """Decode a path, bytes, file object, PIL image or array into an RGB uint8 array (H, W, 3).
    Arrays are taken as RGB or gray: convert OpenCV's BGR first (``cv2.cvtColor(a, cv2.COLOR_BGR2RGB)``).

    Applies EXIF orientation; flattens alpha onto white; converts palette, 16-bit, CMYK and float
    images; refuses images over ``max_pixels`` pixels before decoding them (a ``max_pixels`` above Pillow's own
    decompression-bomb limit raises that limit, process-wide: :func:`let_pillow_open`). Float and integer arrays
    are read by their range: up to 1 (floats: up to 2) as 0-1, up to 1023 as 0-255 (clipped), beyond as 16-bit;
    uint16 as 16-bit."""
    from PIL import ImageOps, UnidentifiedImageError

    if not isinstance(src, (str, os.PathLike, bytes, bytearray, np.ndarray, Image.Image)) and not hasattr(src, "read"):
        raise ImageError(f"cannot read an image from {type(src).__name__}: pass {ACCEPTED}")
    if isinstance(src, np.ndarray):
        if src.ndim >= 2 and src.shape[0] * src.shape[1] > max_pixels:
            h, w = src.shape[:2]
            raise ImageTooLargeError(f"image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}")
        if src.dtype.kind == "u" and src.dtype.itemsize == 2 and 0 < src.max(initial=0) <= 255:
            warn_caller("a uint16 array whose pixels are all 0-255 is read as 16-bit, nearly black: if they are "
                        "8-bit values, pass a.astype(np.uint8)")  # fmt: skip
        return _array_to_rgb(src)
    if isinstance(src, io.TextIOBase):
        raise ImageError("a file opened in text mode: open it in binary mode ('rb')")
    name = str(src) if isinstance(src, (str, os.PathLike)) else ""  # data in memory: no name to give
    at = f"{name}: " if name else ""
    let_pillow_open(max_pixels)  # Pillow's own limit (179 M pixels) refused a larger max_pixels first
    if isinstance(src, (str, os.PathLike)):
        _check_file(Path(src), name)
    elif isinstance(src, (bytes, bytearray)) and not src:
        raise NotAnImageError("empty data (0 bytes), not an image")

    def check_size(im: Image.Image) -> None:
        w, h = im.size
        if w * h > max_pixels:
            raise ImageTooLargeError(f"{at}image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}")

    def decode(im: Image.Image) -> np.ndarray:
        check_size(im)
        return _pil_to_rgb(ImageOps.exif_transpose(im), from_file=im.format is not None)  # a copy has no format

    try:
        if isinstance(src, Image.Image):
            check_size(src)  # before load(): an image opened lazily is not decoded yet
            try:
                src.load()
            except (AssertionError, AttributeError, ValueError) as e:  # a closed file: a bare assert, or close()d
                if isinstance(e, ValueError) and "closed" not in str(e):
                    raise ImageError(f"corrupt or truncated image ({e})") from None
                raise ImageError("a PIL image whose file is closed: load() it before closing the file") from e
            return decode(src)
        Image.init()
        formats = [f for f in FORMATS if f in Image.OPEN]
        with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src, formats=formats) as im:
            return decode(im)  # closes a file it opened (a caller's file object stays open)
    except ImageError:
        raise
    except UnidentifiedImageError:
        if claimed := _claimed_format(src, formats):  # its header, then data Pillow's decoder could not read
            raise ImageError(f"{at}corrupt image (a {claimed} header, then unreadable data)") from None
        if isinstance(src, (bytes, bytearray)) and (video := _video_container(bytes(src[:12]))):  # an upload, stdin
            raise NotAnImageError(f"a video ({video}), not an image: videos are read from files, by `ferkit predict "
                                  "VIDEO` or ferkit.predict_paths") from None  # fmt: skip
        raise NotAnImageError(f"{at}not an image file (unknown or unsupported format)") from None
    except Image.DecompressionBombError as e:  # Pillow's own limit, met in Image.open before the check above
        if (m := re.search(r"Image size \((\d+) pixels\)", str(e))) and (n := int(m[1])) > max_pixels:
            raise ImageTooLargeError(f"{at}image is {n:,} pixels, over the limit of {max_pixels:,}") from None
        raise ImageTooLargeError(f"{at}refused as a possible decompression bomb ({e})") from None
    except MemoryError:
        raise
    except Exception as e:  # a damaged file makes Pillow's decoders raise most anything (IndexError, RuntimeError...)
        raise ImageError(f"{at}corrupt or truncated image ({e or type(e).__name__})") from None


# ISO media brands of videos (an ftyp box also begins HEIC/AVIF photos, CR3 raws, M4A audio: not these)
VIDEO_BRANDS = (b"isom", b"iso2", b"iso4", b"iso5", b"iso6", b"mp41", b"mp42", b"avc1", b"qt  ", b"M4V ", b"M4VP",
                b"dash", b"mmp4", b"MSNV", b"f4v ", b"3gp4", b"3gp5", b"3gp6", b"3g2a")  # fmt: skip
QUICKTIME_ATOMS = (b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot")  # a MOV without ftyp begins so


def _video_container(head: bytes) -> str | None:
    """The video container whose signature begins ``head`` (12 bytes or more), or None."""
    if (head[4:8] == b"ftyp" and head[8:12] in VIDEO_BRANDS) or head[4:8] in QUICKTIME_ATOMS:
        return "MP4/MOV"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "AVI"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "Matroska/WebM"
    return None


def _claimed_format(src: Any, formats: list[str]) -> str | None:
    """The format among ``formats`` whose signature begins the bytes or file ``src``, or None."""
    if isinstance(src, (bytes, bytearray)):
        head = bytes(src[:16])
    elif isinstance(src, (str, os.PathLike)):
        with open(src, "rb") as f:
            head = f.read(16)
    else:
        return None
    return next((f for f in formats if (accept := Image.OPEN[f][1]) is not None and accept(head)), None)


def let_pillow_open(max_pixels: int) -> None:
    """Raise Pillow's process-wide decompression-bomb limit to a ``max_pixels`` above ferkit's default
    (:data:`MAX_PIXELS`) where it is lower: :func:`load_image` refuses larger images itself, from their header,
    and Pillow's limit (179 M pixels, with a warning from 89 M) stopped a larger ``max_pixels`` first. The default
    leaves it as it is (an application may have lowered it)."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > max(Image.MAX_IMAGE_PIXELS, MAX_PIXELS):
        Image.MAX_IMAGE_PIXELS = max_pixels


def _check_file(path: Path, name: str) -> None:
    """Refuse a path that is not a readable regular file, saying what it is instead."""
    try:
        if path.is_dir():
            raise ImageError(f"{name}: is a folder, not an image file")
        if problem := broken_link(path):
            raise ImageError(f"{name}: {problem}")
        if not path.is_file():
            raise ImageError(f"{name}: " + ("not a regular file" if path.exists() else "no such file"))
        if not os.access(path, os.R_OK):  # PIL's PermissionError was reported as a corrupt image
            raise ImageError(f"{name}: permission denied")
        if path.stat().st_size == 0:
            raise NotAnImageError(f"{name}: empty file (0 bytes), not an image")
    except OSError as e:  # a name too long for a path, say (image data passed as a str)
        short = name if len(name) <= 200 else name[:60] + f"... ({len(name):,} characters)"
        raise ImageError(f"{short}: not a file path ({e.strerror})") from None


def _pil_to_rgb(im: Any, from_file: bool = False) -> np.ndarray:
    """RGB uint8 of a PIL image; ``from_file``: its 32-bit integer pixels (mode I) are 8-bit values when none
    is over 255, else 16-bit ones up to 65535 (an array's rule would scale 300-1023 as 8-bit, clipped)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # I;16*: uint16 arrays, scaled by the 16-bit range
        a = np.asarray(im)
        if im.mode == "I" and from_file and a.min(initial=0) >= 0 and 255 < a.max(initial=0) <= 65535:
            a = a.astype(np.uint16)  # 16-bit values (a PGM's, say), not scaled by the brightest; 0-255: 8-bit
        return _array_to_rgb(a)
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("La", "RGBa"):  # premultiplied alpha
        im = im.convert({"La": "LA", "RGBa": "RGBA"}[im.mode])
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)) or min(a.shape[:2]) == 0:
        raise ImageError(f"array of shape {a.shape} is not an image (expected HxW, HxWx3 or HxWx4)")
    if a.dtype.kind not in "biuf":
        raise ImageError(f"array of dtype {a.dtype} is not an image (expected integer or float pixels)")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ImageError("array has NaN or infinite pixel values")
    if a.dtype.kind == "u" and a.dtype.itemsize == 2:  # 16-bit, either byte order: scale by the type's range
        a = ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(a / 257): never a tie, 257 being odd
    elif a.dtype != np.uint8:
        # in place, in float32 where that holds the values exactly (float64 copies took 1.5 GB for 40 M pixels)
        a_kind, a = a.dtype.kind, a.astype(np.result_type(a.dtype, np.float32))
        top = float(a.max(initial=0))
        if top <= (MAX_UNIT_OVERSHOOT if a_kind == "f" else 1.0):  # a 0-1 float image, some past 1 after resizing
            a *= 255
        elif top > MAX_8BIT_OVERSHOOT:  # 16-bit values (or any larger range)
            a *= 255 / (65535.0 if top <= 65535 else top)
        # else 0-255 values, some past 255 after, say, cubic resizing: clipped (they were divided by 65535)
        a = np.clip(np.rint(a, out=a), 0, 255, out=a).astype(np.uint8)
    if a.ndim == 2 or a.shape[2] == 1:
        return np.repeat(a.reshape(a.shape[0], a.shape[1], 1), 3, axis=2)
    if a.shape[2] == 4:  # flatten alpha onto white, as for PIL images and files
        alpha = a[..., 3:].astype(np.float32) / 255
        return np.rint(a[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(a[..., :3])
