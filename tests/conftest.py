"""Shared fixtures: tiny synthetic FER-2013 data in every form ferkit reads (image folders with and
without split prefixes, fer2013.csv, .npz cache), a tiny training config, one trained run, and a read-only
file system (tests run as root, whom file modes do not stop)."""

from __future__ import annotations

import contextlib
import csv
import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ferkit.config import TrainConfig
from ferkit.data import CLASSES, SPLITS, FERData, save_cache


@pytest.fixture(autouse=True)
def _pillow_limit():
    """Pillow's process-wide decompression-bomb limit, put back as each test found it (ferkit raises it for a
    max_pixels above its default)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = limit


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Keep the suite light: a long training run shares this machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@contextlib.contextmanager
def read_only_filesystem(monkeypatch: pytest.MonkeyPatch):
    """Within: creating a file fails as on a read-only mount (EROFS, naming the file)."""
    real_open = os.open

    def refuse(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(os, "open", refuse)
        yield


def synthetic_face(label: int, k: int, seed: int = 0) -> np.ndarray:
    """A 48x48 uint8 image whose class shows as a bright block at a class-dependent place, on noise."""
    rng = np.random.default_rng([seed, label, k])
    img = rng.integers(20, 90, size=(48, 48)).astype(np.uint8)
    r, c = divmod(label, 3)
    img[4 + 14 * r : 4 + 14 * r + 12, 4 + 14 * c : 4 + 14 * c + 12] = 230
    return img


def synthetic_data(per_class: dict[str, int], seed: int = 0) -> FERData:
    """FERData with ``per_class[split]`` images of every class in every split."""
    images, labels, splits, sources = [], [], [], []
    for s, split in enumerate(SPLITS):
        for label in range(len(CLASSES)):
            for k in range(per_class[split]):
                images.append(synthetic_face(label, k, seed + 97 * s))
                labels.append(label)
                splits.append(s)
                sources.append(f"{split}_{label}_{k}")
    return FERData(
        images=np.stack(images),
        labels=np.asarray(labels, dtype=np.int64),
        splits=np.asarray(splits, dtype=np.uint8),
        sources=np.asarray(sources),
    )


@dataclass
class Folder:
    """A generated image folder and what ferkit should read from it, keyed by path relative to root."""

    root: Path
    expected: dict[str, tuple[int, int, np.ndarray]] = field(default_factory=dict)  # label, split, pixels
    lossless: set[str] = field(default_factory=set)  # PNG files: pixels must round-trip exactly


def _save(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))


@pytest.fixture(scope="session")
def fer_folder(tmp_path_factory) -> Folder:
    """Kaggle layout with split prefixes: per class 3 Training (JPEG), 2 PublicTest (JPEG) and
    2 PrivateTest (PNG) images: 49 images."""
    folder = Folder(tmp_path_factory.mktemp("fer_folder"))
    plan = [("train", "Training", 3, ".jpg"), ("test", "PublicTest", 2, ".jpg"), ("test", "PrivateTest", 2, ".png")]
    for label, cls in enumerate(CLASSES):
        for top, split, n, ext in plan:
            for k in range(n):
                img = synthetic_face(label, k, seed=SPLITS.index(split))
                rel = f"{top}/{cls}/{split}_{label}{k:03d}{ext}"
                _save(img, folder.root / rel)
                folder.expected[rel] = (label, SPLITS.index(split), img)
                if ext == ".png":
                    folder.lossless.add(rel)
    return folder


@pytest.fixture(scope="session")
def fer_folder_noprefix(tmp_path_factory) -> Folder:
    """Image folders WITHOUT split prefixes: per class 2 train/ and 5 test/ PNGs. The documented rule:
    train/ is Training; in test/ the files of each class sorted by name alternate PublicTest (even
    positions) and PrivateTest (odd positions)."""
    folder = Folder(tmp_path_factory.mktemp("fer_noprefix"))
    for label, cls in enumerate(CLASSES):
        for k in range(2):
            img = synthetic_face(label, k, seed=10)
            rel = f"train/{cls}/img_{k:02d}.png"
            _save(img, folder.root / rel)
            folder.expected[rel] = (label, 0, img)
        # names chosen so that sorted order differs from creation order
        for pos, name in enumerate(["a10", "a2", "b", "c_x", "z"]):
            img = synthetic_face(label, pos, seed=11)
            rel = f"test/{cls}/{name}.png"
            _save(img, folder.root / rel)
            folder.expected[rel] = (label, 1 + pos % 2, img)
        for rel in folder.expected:
            folder.lossless.add(rel)
    return folder


def write_csv(path: Path, rows: list[tuple[str, str, str]], header: str = "emotion,pixels,Usage") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        f.write(header + "\n")
        csv.writer(f, lineterminator="\n").writerows(rows)
    return path


def pixels_str(img: np.ndarray) -> str:
    return " ".join(str(int(v)) for v in img.reshape(-1))


@pytest.fixture(scope="session")
def fer_csv(tmp_path_factory) -> tuple[Path, FERData]:
    """A tiny fer2013.csv (2 rows per class, all three Usage values) and the FERData it holds."""
    data = synthetic_data({"Training": 1, "PublicTest": 1, "PrivateTest": 0}, seed=5)
    order = np.random.default_rng(0).permutation(len(data))  # interleave usages and classes
    images, labels, splits = data.images[order], data.labels[order], data.splits[order]
    splits = splits.copy()
    splits[::5] = SPLITS.index("PrivateTest")
    rows = [(str(int(y)), pixels_str(x), SPLITS[s]) for x, y, s in zip(images, labels, splits, strict=True)]
    path = write_csv(tmp_path_factory.mktemp("fer_csv") / "fer2013.csv", rows)
    return path, FERData(images, labels, splits, np.asarray([f"fer2013.csv:{i + 2}" for i in range(len(rows))]))


@pytest.fixture(scope="session")
def synthetic_cache(tmp_path_factory) -> Path:
    """A .npz cache big enough to train on: 16 Training, 4 PublicTest and 4 PrivateTest images per class."""
    data = synthetic_data({"Training": 16, "PublicTest": 4, "PrivateTest": 4})
    return save_cache(data, tmp_path_factory.mktemp("cache") / "synthetic.npz")


def tiny_config(data: Path, out: Path, **overrides) -> TrainConfig:
    """A training run that takes about a second: quarter-width ferkit_small, 4 steps per epoch."""
    values = dict(
        data=str(data),
        out=str(out),
        model="ferkit_small",
        model_kwargs={"width": 0.25},
        epochs=2,
        batch_size=16,
        lr=0.05,
        warmup_epochs=0.5,
        augment="light",
        train_limit=64,
        patience=0,
        device="cpu",
        threads=1,
        progress=False,
        evaluate=False,
    )
    values.update(overrides)
    return TrainConfig.from_dict(values)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, synthetic_cache) -> Path:
    """One finished tiny training run (2 epochs); returns its output folder. Do not modify it."""
    from ferkit.training import train

    out = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(synthetic_cache, out))
    return out
