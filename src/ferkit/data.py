"""FER-2013 loading: the original CSV or the Kaggle image folders, into one cached array file.

Data flows one way: files -> :class:`FERData` (uint8 images, labels, splits) -> batches.
``prepare`` decodes once and writes an ``.npz`` cache (atomically) that loads in about a second.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import IMAGE_SIZE, TTA_MODES
from .fileio import atomic_write, broken_link, check_writable, read_npz, refuse_input, visible_files
from .images import IMAGE_EXTENSIONS
from .runtime import progress_bar

CLASSES: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
SPLITS: tuple[str, ...] = ("Training", "PublicTest", "PrivateTest")
SPLIT_SIZES = {"Training": 28_709, "PublicTest": 3_589, "PrivateTest": 3_589}  # FER-2013 as published
_TOPS = ("train", "test", "val")  # the image folders' split folders
CSV_HEADER = ["emotion", "pixels", "usage"]  # column names, matched without case


def model_input(crops: np.ndarray) -> np.ndarray:
    """What every ferkit model takes for uint8 face crops (N, 48, 48): float32 (N, 1, 48, 48) in [0, 1]."""
    return crops[:, None].astype(np.float32) / 255


def _shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate a batch by whole pixels, filling with the reflected border (a crop of a padded image). The edge
    pixel is not repeated, unlike training's augmentation: repeating it was worse on PublicTest (reports/runs.md)."""
    p = max(abs(dy), abs(dx))
    padded = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(p, p), (p, p)], mode="reflect")
    h, w = x.shape[-2:]
    return np.ascontiguousarray(padded[..., p - dy : p - dy + h, p - dx : p - dx + w])


def tta_views(x: np.ndarray, mode: str) -> list[np.ndarray]:
    """Views of a batch (N, 1, H, W) for test-time augmentation, the same for evaluation and recognition:
    ``none`` (the batch), ``flip`` (it and its mirror) or ``crops`` (ten-crop: the centre and four corner crops
    of a 3-pixel-padded image, then each mirrored). The first view is the batch, the one half-way along its mirror."""
    if mode not in TTA_MODES:
        raise ValueError(f"unknown TTA mode {mode!r}; choose one of {', '.join(TTA_MODES)}")
    if mode == "none":
        return [x]
    shifts = [(-3, -3), (-3, 3), (3, -3), (3, 3)] if mode == "crops" else []
    views = [x, *(_shift(x, dy, dx) for dy, dx in shifts)]
    return views + [np.ascontiguousarray(v[..., ::-1]) for v in views]


def scores_shape_problem(shape: tuple[int, ...], batch: int, n_classes: int) -> str | None:
    """Why a model's output of ``shape`` for ``batch`` images is not one score per image and class (None if it is)."""
    if tuple(shape) == (batch, n_classes):
        return None
    if shape[:1] != (batch,):
        return f"output {tuple(shape)} for {batch} images, expected ({batch}, {n_classes})"
    got = "(N, " + ", ".join(map(str, shape[1:])) + ")"
    return f"output {got}, expected (N, {n_classes}) for its {n_classes} classes"


class DataError(ValueError):
    """Raised when a data file or folder is not valid FER-2013; the message names the file."""


def stratified_subset(images: np.ndarray, labels: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random, stratified subset of ``n`` of ``images`` and their ``labels`` (all of them for 0 or
    more than there are): each class keeps its share."""
    if not n or n >= len(labels):
        return images, labels
    perm = np.random.default_rng(seed).permutation(len(labels))
    position = np.empty(len(labels))  # where each image falls within its class, in (0, 1)
    for c in np.unique(labels):
        members = perm[labels[perm] == c]
        position[members] = (np.arange(len(members)) + 0.5) / len(members)
    idx = np.sort(np.argsort(position, kind="stable")[:n])
    return images[idx], labels[idx]


@dataclass(frozen=True)
class FERData:
    """All of FER-2013 in memory: ``images`` (N, 48, 48) uint8, ``labels`` (N,) int64 in
    :data:`CLASSES` order, ``splits`` (N,) uint8 index into :data:`SPLITS`, ``sources`` (N,) ids."""

    images: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    sources: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Images and labels of one split (``Training``, ``PublicTest`` or ``PrivateTest``)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        mask = self.splits == SPLITS.index(name)
        return self.images[mask], self.labels[mask]

    def seen_in_training(self, images: np.ndarray) -> np.ndarray:
        """Whether each of ``images`` is, pixel for pixel, an image of the Training split: FER-2013's PublicTest
        and PrivateTest hold about 8% such copies, which a model has learnt (and mostly gets right)."""
        training = set(map(_digest, self.split("Training")[0]))
        return np.array([_digest(image) in training for image in images], dtype=bool)

    def counts(self) -> dict[str, dict[str, int]]:
        """Number of images per split and class."""
        out: dict[str, dict[str, int]] = {}
        for s, split in enumerate(SPLITS):
            labels = self.labels[self.splits == s]
            out[split] = {c: int((labels == i).sum()) for i, c in enumerate(CLASSES)}
        return out


def _digest(image: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=16).digest()


def _split_of(name: str, top: str, index_in_class: int) -> int:
    """Split of an image file: its ``Training_``/``PublicTest_``/``PrivateTest_`` prefix, else the
    folder rule: ``train/`` is Training; in ``test/`` (or ``val/``) the files of each class, sorted by
    name, alternate PublicTest (even positions) and PrivateTest (odd positions)."""
    prefix = name.split("_", 1)[0]
    if prefix in SPLITS:
        return SPLITS.index(prefix)
    if top == "train":
        return 0
    return 1 + index_in_class % 2


def _decode(path: Path) -> np.ndarray:
    """One image file as a 48x48 grayscale array, decoded as inference decodes photos (EXIF orientation,
    alpha onto white, 16-bit scaled, ITU-R 601 luma) and resized as faces are cropped; a corrupt file or one
    too large to decode safely is a :class:`DataError` naming it."""
    import cv2

    from .images import ImageError, load_image

    try:
        gray = cv2.cvtColor(load_image(path), cv2.COLOR_RGB2GRAY)
    except ImageError as e:
        raise DataError(f"{path}: unreadable image ({str(e).removeprefix(f'{path}: ')})") from e
    if gray.shape != (IMAGE_SIZE, IMAGE_SIZE):
        shrink = max(gray.shape) > IMAGE_SIZE
        gray = cv2.resize(gray, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return gray


def _layout_hint(root: Path) -> str:
    """Where the data a folder without train/ or test/ holds may be: nested one or two folders down (an
    unzipped archive), ``root`` itself being one split's folder, or Kaggle's CSV beside it."""
    tops = [p for pattern in ("*/*", "*/*/*") for p in root.glob(pattern) if p.name in _TOPS and p.is_dir()]
    if nested := sorted({p.parent for p in tops if not any(s.startswith(".") for s in p.relative_to(root).parts)}):
        return f" (give the folder that holds them: {nested[0]})"
    if root.name.lower() in _TOPS:
        return f" ({root.name}/ holds emotion folders: give the folder above it, {root.resolve().parent})"
    if any((root / c).is_dir() for c in CLASSES):
        return f" (it holds emotion folders: move them into {root / 'train'}/, or {root / 'test'}/ for test images)"
    csvs = [p for pattern in ("*.csv", "*/*.csv") for p in sorted(root.glob(pattern)) if p.name[0] != "."]
    if fer := [p for p in csvs if _csv_header_problem(_first_line(p)) is None]:  # Kaggle's original download
        return f" (or give the CSV file: {fer[0]})"
    return ""


def _first_line(path: Path) -> list[str]:
    """The fields of a CSV file's first line (read no further: a data row is 2,304 numbers)."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            return next(csv.reader([f.readline(4096)]), [])
    except OSError:
        return []


def _csv_header_problem(fields: list[str]) -> str | None:
    """What a CSV header lacks of FER-2013's columns (matched by name, without case, in any order; other
    columns are ignored), or None."""
    header = [h.strip().lower() for h in fields]
    if missing := [c for c in CSV_HEADER if c not in header]:
        if missing == ["usage"]:  # the challenge's train.csv: emotion,pixels
            return ("no Usage column to tell the splits apart (the challenge's train.csv?): give fer2013.csv or "
                    "icml_face_data.csv")  # fmt: skip
        if missing == ["emotion", "usage"]:  # its test.csv: pixels alone
            return ("no emotion column: unlabelled images (the challenge's test.csv?) can be neither trained nor "
                    "evaluated on")  # fmt: skip
        got = ",".join(h.strip() for h in fields)
        got = got if len(got) <= 80 else got[:77] + "..."  # a header-less file's first row: 2,304 numbers
        return f"expected the columns emotion, pixels and Usage (in any order), got {got!r}"
    if twice := [c for c in CSV_HEADER if header.count(c) > 1]:
        return f"the column {twice[0]!r} appears twice"
    return None


def _class_images(cls_dir: Path) -> list[Path]:
    """The image files under a class folder, in its (linked) sub-folders too, sorted; hidden ones skipped."""

    def unreadable(e: OSError) -> None:
        raise DataError(f"{e.filename}: cannot read this folder ({e.strerror})")

    images = [p for p in visible_files(cls_dir, unreadable) if p.suffix.lower() in IMAGE_EXTENSIONS]
    if broken := next((f"{p}: {why}" for p in images if (why := broken_link(p))), None):
        raise DataError(broken)
    return sorted(p for p in images if p.is_file())


def _decode_all(files: list[Path], desc: str, progress: bool) -> np.ndarray:
    """Decode every file (in threads); the unreadable ones are named together in one :class:`DataError`."""

    def decode(path: Path) -> np.ndarray | DataError:
        try:
            return _decode(path)
        except DataError as e:
            return e

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        it = pool.map(decode, files, chunksize=256)
        decoded = list(progress_bar(it, enabled=progress, total=len(files), desc=desc, unit="img"))
    if bad := [str(e) for e in decoded if isinstance(e, DataError)]:
        if len(bad) == 1:
            raise DataError(bad[0])
        more = f"\n  ... and {len(bad) - 5:,} more" if len(bad) > 5 else ""
        raise DataError(f"{len(bad):,} of {len(files):,} images are unreadable; remove or replace them:\n  "
                        + "\n  ".join(bad[:5]) + more)  # fmt: skip
    return np.stack(decoded)


def load_folder(root: str | Path, progress: bool = True) -> FERData:
    """Load the Kaggle layout ``root/{train,test}/<emotion>/*.jpg`` (``val/`` is read like ``test/``; images
    in sub-folders of an emotion's folder count as its own). Each of these folders present must hold one
    non-empty folder per emotion in :data:`CLASSES`; every unreadable image is named in one error."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    tops = [t for t in _TOPS if (root / t).is_dir()]
    if not tops:
        hint = _layout_hint(root)
        raise DataError(f"{root}: expected a train/ and/or test/ folder with one folder per emotion{hint}")
    if "test" in tops and "val" in tops:  # both would be read as PublicTest/PrivateTest: one split twice
        raise DataError(f"{root}: both test/ and val/; keep one (val/ is read as test/ is)")
    files: list[Path] = []
    labels: list[int] = []
    splits: list[int] = []
    for top in tops:
        found: dict[str, Path] = {}
        for cls_dir in sorted(p for p in (root / top).iterdir() if p.is_dir() and not p.name.startswith(".")):
            if cls_dir.name.lower() not in CLASSES:
                raise DataError(f"{cls_dir}: unknown class folder {cls_dir.name!r}; expected {', '.join(CLASSES)}")
            if twin := found.get(cls_dir.name.lower()):
                raise DataError(f"{cls_dir}: class {cls_dir.name.lower()!r} given twice (also {twin.name}/)")
            if not (names := _class_images(cls_dir)):
                raise DataError(f"{cls_dir}: no images (expected {', '.join('*' + e for e in IMAGE_EXTENSIONS)})")
            found[cls_dir.name.lower()] = cls_dir
            for i, p in enumerate(names):
                files.append(p)
                labels.append(CLASSES.index(cls_dir.name.lower()))
                splits.append(_split_of(p.name, top, i))
        if missing := [c for c in CLASSES if c not in found]:
            raise DataError(
                f"{root / top}: no {' or '.join(map(repr, missing))} folder "
                f"(expected one folder per emotion: {', '.join(CLASSES)})"
            )
    return FERData(
        images=_decode_all(files, f"decoding {root.name}", progress),
        labels=np.asarray(labels, dtype=np.int64),
        splits=np.asarray(splits, dtype=np.uint8),
        sources=np.asarray([str(p.relative_to(root)) for p in files]),
    )


_PLAIN = re.compile(r"[0-9\s]*", re.ASCII)  # int() also takes '+7', '1_0' and other scripts' digits


def _parse_pixels(text: str, where: str) -> np.ndarray:
    if not _PLAIN.fullmatch(text):
        bad = next((t for t in text.split(" ") if not _PLAIN.fullmatch(t)), text)
        if bad.startswith("-") and _PLAIN.fullmatch(bad[1:]):
            at = text.split().index(bad) + 1
            raise DataError(f"{where}: pixel values must be in 0..255, got {bad[:20]} (value {at})")
        raise DataError(f"{where}: pixels are not integers separated by spaces ({bad[:20]!r})")
    tokens = text.split()
    if len(tokens) != IMAGE_SIZE * IMAGE_SIZE:
        raise DataError(f"{where}: expected {IMAGE_SIZE * IMAGE_SIZE} pixel values, got {len(tokens)}")
    try:
        values = np.array(tokens, dtype=np.int64)
    except OverflowError:  # an integer of 20 digits or more
        values = np.array([256 if len(t.lstrip("0")) > 3 else int(t) for t in tokens])
    if (values > 255).any():
        i = int(np.argmax(values > 255))
        raise DataError(f"{where}: pixel values must be in 0..255, got {tokens[i][:20]} (value {i + 1})")
    return values.astype(np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE)


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """``(line number where the row starts, fields)`` of each non-blank row of a UTF-8 CSV file (a leading
    BOM is dropped); undecodable bytes and broken quoting become a :class:`DataError` naming the file and line."""
    end = 0  # the line the last row read ended on
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            for row in reader:
                if any(field.strip() for field in row):  # blank and whitespace-only lines are skipped
                    yield end + 1, row
                end = reader.line_num
    except UnicodeDecodeError as e:
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith(b"\x1f\x8b"):
            raise DataError(f"{path}: gzip-compressed: decompress it first (gunzip)") from None
        if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            raise DataError(f"{path}: UTF-16 text: save it as UTF-8") from None
        raise DataError(f"{path}:{_first_non_utf8_line(path)}: not a UTF-8 text CSV ({e.reason})") from None
    except csv.Error as e:
        why = "is a quote unmatched, or a line far too long?"
        raise DataError(f"{path}:{end + 1}: malformed CSV row ({e}); {why}") from None


def _first_non_utf8_line(path: Path) -> int:
    """The line of the first byte of ``path`` that is not UTF-8 (the text reader decodes in blocks)."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return data.count(b"\n", 0, e.start) + 1
    return 1


def load_csv(path: str | Path, progress: bool = True) -> FERData:
    """Load the original ``fer2013.csv`` (``emotion,pixels,Usage``; the columns may come in any order, as in
    ``icml_face_data.csv``); blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    images, labels, splits, sources = [], [], [], []
    rows = _csv_rows(path)
    line, fields = next(rows, (0, []))
    if not line:
        raise DataError(f"{path}: an empty file")
    if problem := _csv_header_problem(fields):  # by name, in any order: icml_face_data.csv has emotion,Usage,pixels
        raise DataError(f"{path}:{line}: {problem}")
    header = [h.strip().lower() for h in fields]
    column = [header.index(c) for c in CSV_HEADER]  # other columns (an index pandas wrote, say) are ignored
    rows = progress_bar(rows, enabled=progress, desc=f"parsing {path.name}", unit="row")
    for line, row in rows:
        where = f"{path}:{line}"
        if len(row) != len(header):
            unclosed = " (a quote opened on this line is never closed?)" if any("\n" in f for f in row) else ""
            raise DataError(f"{where}: expected {len(header)} fields, as the header has, got {len(row)}{unclosed}")
        emotion, pixels, usage = (row[i].strip() for i in column)
        if not (emotion.isascii() and emotion.isdigit()) or int(emotion) >= len(CLASSES):
            raise DataError(f"{where}: emotion must be 0..{len(CLASSES) - 1}, got {emotion!r}")
        if usage not in SPLITS:
            raise DataError(f"{where}: Usage must be one of {', '.join(SPLITS)}, got {usage!r}")
        images.append(_parse_pixels(pixels, where))
        labels.append(int(emotion))
        splits.append(SPLITS.index(usage))
        sources.append(f"{path.name}:{line}")
    if not images:
        raise DataError(f"{path}: no data rows")
    return FERData(
        images=np.stack(images),
        labels=np.asarray(labels, dtype=np.int64),
        splits=np.asarray(splits, dtype=np.uint8),
        sources=np.asarray(sources),
    )


def save_cache(data: FERData, out: str | Path) -> Path:
    """Write ``data`` to an ``.npz`` file atomically (temp file in the same folder, then rename)."""
    return atomic_write(
        out,
        lambda f: np.savez(
            f,
            images=data.images,
            labels=data.labels,
            splits=data.splits,
            sources=data.sources,
            classes=np.asarray(CLASSES),
        ),
    )


def load_cache(path: str | Path) -> FERData:
    """Load a cache written by :func:`save_cache`."""
    path = Path(path)
    try:
        z = read_npz(path, ["classes", "images", "labels", "splits", "sources"])
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except ValueError as e:
        raise DataError(f"{path}: not a ferkit data cache ({e.__cause__}); rebuild it with `ferkit prepare`") from e
    if tuple(z["classes"]) != CLASSES:
        found, fer = ", ".join(map(str, z["classes"])), ", ".join(CLASSES)
        raise DataError(f"{path}: classes {found}, not FER-2013's {fer}; rebuild it with `ferkit prepare`")
    data = FERData(z["images"], z["labels"], z["splits"], z["sources"])
    if problem := _cache_problem(data):  # what trained on silently: float images, splits other than three
        raise DataError(f"{path}: not a ferkit data cache ({problem}); rebuild it with `ferkit prepare`")
    return data


def _cache_problem(data: FERData) -> str | None:
    """What is wrong with a loaded cache's arrays, or None."""
    n = len(data.images)
    if data.images.dtype != np.uint8 or data.images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        return f"images of {data.images.dtype} {data.images.shape[1:]}, not uint8 {IMAGE_SIZE}x{IMAGE_SIZE}"
    if not len(data.labels) == len(data.splits) == len(data.sources) == n:
        return f"{n} images, {len(data.labels)} labels, {len(data.splits)} splits, {len(data.sources)} sources"
    if data.labels.dtype.kind not in "iu" or n and not 0 <= data.labels.min() <= data.labels.max() < len(CLASSES):
        return f"labels outside 0..{len(CLASSES) - 1}"
    if data.splits.dtype.kind not in "iu" or n and not 0 <= data.splits.min() <= data.splits.max() < len(SPLITS):
        return f"split codes outside 0..{len(SPLITS) - 1}"
    return None


def load_dataset(path: str | Path, progress: bool = True) -> FERData:
    """Load FER-2013 from a cache (``.npz``), a ``fer2013.csv`` or a Kaggle image folder (the
    suffix is matched case-insensitively)."""
    path = _existing(path)
    if path.is_dir():
        return load_folder(path, progress=progress)
    if path.suffix.lower() == ".npz":
        return load_cache(path)
    if path.suffix.lower() == ".csv":
        return load_csv(path, progress=progress)
    if path.suffix.lower() in (".gz", ".zip", ".tgz", ".tar", ".bz2", ".xz", ".7z"):
        raise DataError(f"{path}: an archive: unpack it first, then give the CSV file or the image folder")
    raise DataError(f"{path}: expected a folder, a .csv file or a .npz cache")


def _existing(path: str | Path) -> Path:
    """``path``, which must exist."""
    if not Path(path).exists():
        raise DataError(f"{path}: no such file or folder")
    return Path(path)


def prepare(src: str | Path, out: str | Path, progress: bool = True) -> FERData:
    """Decode ``src`` once and write the cache to ``out`` (a ``.npz`` file, which every command reads as one)."""
    refuse_input(out, src, "the data set", "another file for the cache")
    if Path(out).suffix.lower() != ".npz":
        raise DataError(f"{out}: name the cache *.npz (the other commands read a .npz file as a cache)")
    _existing(src)
    check_writable(out)  # before minutes of decoding
    data = load_dataset(src, progress=progress)
    save_cache(data, out)
    return data
