"""Atomic file writes (a temp file in the target folder, fsync, then rename over the target), JSON reads and
content digests (the keys of the prediction caches)."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np


def refuse_folder(path: str | Path) -> Path:
    """``path``, unless it names an existing folder (an output file's name was expected)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; give a file name to write")
    return path


def refuse_file(path: str | Path, option: str) -> None:
    """Refuse an output folder (``option``'s) that names an existing file, or lies below one: the inverse of
    :func:`refuse_folder`."""
    for p in (Path(path), *Path(path).parents):
        if p.exists() and not p.is_dir():
            raise ValueError(f"{option} {path}: {p} is a file, not a folder")


def refuse_input(out: str | Path, src: str | Path, what: str, instead: str) -> None:
    """Refuse an output ``out`` that is its own input ``src`` (``what``), which writing would destroy."""
    if Path(out).resolve() == Path(src).resolve():
        raise ValueError(f"{out}: that is {what} itself; name {instead}")


def broken_link(path: str | Path) -> str | None:
    """What is wrong with ``path`` if it is a link that leads to no file or folder ("a link to nothing (target)",
    "a loop of links (target)"), else None."""
    path = Path(path)
    if not path.is_symlink() or path.exists():
        return None
    try:
        path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"a loop of links ({os.readlink(path)})"
    return f"a link to nothing ({os.readlink(path)})"


def not_a_file(path: str | Path, what: str) -> str | None:
    """Why ``path`` cannot be read as the file ``what`` names ("checkpoint not found", "is a folder, not a
    checkpoint", a broken link), or None when it is a file."""
    path = Path(path)
    if path.is_file():
        return None
    if path.is_dir():
        return f"is a folder, not {'an' if what[0] in 'aeiouAEIOU' else 'a'} {what}"
    return broken_link(path) or f"{what} not found"


def visible_files(
    folder: str | Path, onerror: Callable[[OSError], object] | None = None, skip: str | None = None
) -> Iterator[Path]:
    """The files below ``folder``, through linked folders (each real folder once), hidden files and folders
    (``._a.jpg`` of macOS, ``.ipynb_checkpoints/``) skipped, and the folder whose real path is ``skip`` not
    entered; ``onerror`` gets the error of each folder that cannot be listed (as :func:`os.walk`'s does)."""
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True, onerror=onerror):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree, or a second link to one folder
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if d[0] != "." and os.path.realpath(os.path.join(root, d)) != skip]
        yield from (Path(root, name) for name in files if name[0] != ".")


def model_files(*models: str | os.PathLike[str]) -> list[Path]:
    """The model files ``models`` name, in order: a file itself, a folder every ``.onnx`` file directly in it, by
    name (a kept ensemble: ``models/``), hidden files skipped (macOS's ``._x.onnx``) and a link to nothing named."""
    out: list[Path] = []
    for model in models:
        if not str(model):  # Path("") is ".": an unset variable took every model of the working folder
            raise ValueError("an empty model path")
        path = Path(model)
        if not path.is_dir():
            out.append(path)
            continue
        found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".onnx" and p.name[0] != ".")
        if broken := next((f"{p}: {why}" for p in found if (why := broken_link(p))), None):
            raise FileNotFoundError(broken)  # left out, it shrank the ensemble without a word
        if not (found := [p for p in found if p.is_file()]):
            raise FileNotFoundError(f"{path}: no .onnx model in this folder")
        out += found
    return out


TEMP_TOKEN_BYTES = 8  # atomic_write's temp files: .NAME.<16 hex digits>.tmp
TEMP_NAME = re.compile(rf"\..+\.[0-9a-f]{{{2 * TEMP_TOKEN_BYTES}}}\.tmp")


def stale_temp_files(folder: str | Path) -> list[Path]:
    """The temp files :func:`atomic_write` left in ``folder`` when its process was killed (no other files:
    a user's own ``.notes.tmp`` is not one)."""
    return [p for p in Path(folder).glob(".*.tmp") if TEMP_NAME.fullmatch(p.name) and p.is_file()]


STALE_STAGING_S = 3600  # a staging folder this old is a killed process's (an export takes minutes)


@contextlib.contextmanager
def staging_folder(path: str | Path) -> Iterator[Path]:
    """A hidden temp folder beside ``path`` (``.NAME.<random>.tmp``) to build files in before they take their
    places; removed with what is left in it. One that a killed process left (SIGKILL, out of memory) is removed
    by the next one for ``path`` once it is :data:`STALE_STAGING_S` old (a younger one may be another export's)."""
    path = Path(path)
    ours = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")  # tempfile's 8 random characters
    for old in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            stale = time.time() - old.lstat().st_mtime > STALE_STAGING_S
            if ours.fullmatch(old.name) and old.is_dir() and not old.is_symlink() and stale:
                shutil.rmtree(old)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp") as tmp:
        yield Path(tmp)


LOCK_NAME = ".ferkit.lock"  # the file a run folder is locked by (kept: removing a lock file races its takers)


@contextlib.contextmanager
def exclusive_folder(folder: str | Path, what: str) -> Iterator[bool]:
    """Hold an exclusive lock on ``folder`` for the block, by flock on its file :data:`LOCK_NAME` (a regular
    file: NFS takes such locks to its server, so another host sees them; a killed process releases it); another
    process that holds it already is a RuntimeError naming ``what``. Yields whether it locked: False where the
    system or its file system takes no locks (Windows, some network mounts)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield False
        return
    fd = os.open(Path(folder) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise RuntimeError(f"{folder}: {what}") from None
        except OSError:  # ENOLCK, EOPNOTSUPP: a file system without locks
            locked = False
        yield locked  # outside the handlers: the block's own errors are not told as during ENOLCK's
    finally:
        os.close(fd)


def _open_temp(path: Path) -> tuple[Path, int]:
    """A new temp file beside ``path`` (its folders made), open for writing; errors name ``path``."""
    if file := next((p for p in path.parents if p.exists() and not p.is_dir()), None):
        raise NotADirectoryError(errno.ENOTDIR, f"{file} is a file, not a folder", str(path))
    tmp = path.parent / f".{path.name}.{secrets.token_hex(TEMP_TOKEN_BYTES)}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # as open() does: the umask applies
    except OSError as e:
        raise type(e)(e.errno, e.strerror, str(path)) from e


def check_writable(path: str | Path) -> Path:
    """``path``, once a file can be written there: checked before long work. The folders it makes to try are
    removed again (a run that fails later would leave them empty)."""
    path = refuse_folder(path)
    made = [p for p in path.parents if not p.exists()]  # deepest first
    tmp, fd = _open_temp(path)
    os.close(fd)
    tmp.unlink()
    for folder in made:
        with contextlib.suppress(OSError):  # something else wrote there meanwhile: kept
            folder.rmdir()
    return path


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(file)`` on a temp file next to ``path`` and rename it over ``path``: readers see the
    old file or the whole new one, never a partial write."""
    path = refuse_folder(path)
    tmp, fd = _open_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise type(e)(e.errno, e.strerror, str(path)) from e
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        stop = (KeyboardInterrupt, SystemExit)  # Ctrl-C, or SIGTERM as the CLI raises it
        if isinstance(e.__context__, stop) and not isinstance(e, stop):
            raise e.__context__ from None  # not the error a writer (torch's zip) raised while unwinding
        raise
    return path


def file_digest(path: str | Path) -> str:
    """The first 16 hex digits of the SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()[:16]


def model_digest(path: str | Path) -> str:
    """What identifies a model in the reports of ``ferkit evaluate``, checked where their numbers are quoted:
    an ONNX file's graph and weights (not its metadata, which ``export --report`` rewrites, nor where its
    weights are stored: in the file or beside it), or a checkpoint's bytes."""
    if problem := not_a_file(path, "model file" if Path(path).suffix.lower() == ".onnx" else "checkpoint"):
        raise FileNotFoundError(f"{path}: {problem}")
    if Path(path).suffix.lower() != ".onnx":
        return file_digest(path)
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(path)).graph
    except Exception as e:  # onnx raises protobuf's DecodeError and others for a damaged file
        raise ValueError(f"{path}: not a readable ONNX model ({e})") from e
    h = hashlib.sha256()
    for tensor in graph.initializer:  # one by one: a graph with its weights may be over protobuf's 2 GB
        h.update(f"{tensor.name} {tensor.data_type} {list(tensor.dims)}".encode())
        h.update(numpy_helper.to_array(tensor).tobytes())
    del graph.initializer[:]
    h.update(graph.SerializeToString())
    return h.hexdigest()[:16]


def bytes_digest(data: bytes | memoryview) -> str:
    """The first 16 hex digits of the SHA-256 of ``data`` (e.g. a contiguous array's ``.data``)."""
    return hashlib.sha256(data).hexdigest()[:16]


def read_npz(path: str | Path, keys: list[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays ``keys`` (all when None) of a ``.npz`` file, never unpickled; a damaged or foreign file, or
    one without a key, is a ValueError naming it (a missing one: FileNotFoundError)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in (f.files if keys is None else keys)}
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy raises many types: BadZipFile, EOFError, zlib.error, KeyError, ...
        raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON file holding one object (a report, a config), or a ValueError naming the file."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid JSON file ({e})") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


# what every `ferkit evaluate` report holds (evaluate.evaluate_tta writes them)
REPORT_KEYS = ("model", "checkpoints", "digests", "split", "tta", "n", "limit", "accuracy", "macro_f1")
REPORT_KEYS += ("weighted_f1", "macro_auc", "report", "roc")


def read_model_report(path: str | Path, model: str | Path, digest: str | None = None) -> dict[str, Any]:
    """A ``ferkit evaluate`` report of the file ``model`` (its network and weights: another run's ``best.pt``
    has the same name), checked: every report key, an accuracy between 0 and 1 and a single checkpoint (not
    an ensemble's numbers, which must never pass for a model's). ``digest``: ``model``'s, if already known."""
    report = read_json_object(path)
    if missing := [k for k in REPORT_KEYS if k not in report]:
        old = " (an older report, which names no model digest: evaluate again)" if "digests" in missing else ""
        raise ValueError(f"{path}: not a report of `ferkit evaluate` (no {', '.join(missing)}){old}")
    accuracy, checkpoints = report["accuracy"], report["checkpoints"]
    if not isinstance(accuracy, (int, float)) or isinstance(accuracy, bool) or not 0 <= accuracy <= 1:
        raise ValueError(f"{path}: not a report of `ferkit evaluate` (no accuracy between 0 and 1)")
    if not isinstance(checkpoints, list) or len(checkpoints) != 1:
        n = len(checkpoints) if isinstance(checkpoints, list) else "?"
        raise ValueError(f"{path}: the report of an ensemble of {n} models, not of one")
    if report["digests"] != [digest or model_digest(model)]:
        raise ValueError(f"{path}: the report of {checkpoints[0]}, not of {model} (another network or weights)")
    return report


def parse_model_metadata(text: str | None, source: str | Path) -> dict[str, Any]:
    """The ``ferkit`` metadata of an ONNX model (a JSON object; ``{}`` when absent), checked: ``classes``,
    when given, must be a list of names."""
    try:
        info = json.loads(text or "{}")
    except ValueError as e:
        raise ValueError(f"{source}: its 'ferkit' metadata is not valid JSON ({e})") from e
    if not isinstance(info, dict):
        raise ValueError(f"{source}: its 'ferkit' metadata is not a JSON object")
    classes = info.get("classes")
    if classes is not None and not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise ValueError(f"{source}: its 'ferkit' metadata names no list of classes ({classes!r})")
    return info


def refuse_repeats(paths: Iterable[str | Path], what: str) -> None:
    """Refuse one file given twice (it would count double: an ensemble's member, a card's report), however its
    path is written."""
    seen: dict[Path, Any] = {}
    for path in paths:
        if Path(path).resolve() in seen:
            raise ValueError(f"{path}: {what} given twice (also as {seen[Path(path).resolve()]})")
        seen[Path(path).resolve()] = path


def refuse_same_weights(paths: Sequence[str | Path], digests: Sequence[str | None], what: str) -> None:
    """Refuse two files made from one run's trained weights (``digests``: checkpoint.weights_digest, None where
    a file records none), e.g. a checkpoint and its ONNX export: as ensemble members it would count twice."""
    seen: dict[str, Any] = {}
    for path, digest in zip(paths, digests, strict=True):
        if not isinstance(digest, str):  # none recorded (or a foreign file's other value)
            continue
        if digest in seen:
            raise ValueError(f"{seen[digest]} and {path}: {what}s made from the same trained weights "
                             "(one model; it would count twice)")  # fmt: skip
        seen.setdefault(digest, path)


def model_name(names: list[str]) -> str:
    """What a model, or an ensemble of the models ``names`` (averaged in that order), is called in reports."""
    return names[0] if len(names) == 1 else "ensemble(" + ", ".join(names) + ")"
