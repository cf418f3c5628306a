"""Integration tests on the real FER-2013 image folder, named by the FERKIT_DATA environment variable
(skipped when it is unset or missing). About a minute on 2 otherwise idle CPU cores:

    FERKIT_DATA=/path/to/fer2013 pytest tests/test_real_data.py

FERKIT_TEST_THREADS (default 1) sets the torch threads of the training runs: 2 is ~1.7x faster on idle
cores, but several times slower than 1 when another job keeps the cores busy.
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import pixels_str, tiny_config, write_csv

from ferkit.checkpoint import load_checkpoint
from ferkit.data import CLASSES, SPLITS, load_csv, load_folder, save_cache
from ferkit.evaluate import evaluate_checkpoints
from ferkit.training import train

pytestmark = [pytest.mark.data, pytest.mark.slow]

THREADS = int(os.environ.get("FERKIT_TEST_THREADS", "1"))  # torch threads of the training runs

# README.md of the data set: images per class and split
EXPECTED = {
    "Training": dict(zip(CLASSES, [3995, 436, 4097, 7215, 4830, 3171, 4965], strict=True)),
    "PublicTest": dict(zip(CLASSES, [467, 56, 496, 895, 653, 415, 607], strict=True)),
    "PrivateTest": dict(zip(CLASSES, [491, 55, 528, 879, 594, 416, 626], strict=True)),
}


@pytest.fixture(scope="module")
def real_root() -> Path:
    value = os.environ.get("FERKIT_DATA")
    if not value:
        pytest.skip("FERKIT_DATA is not set (path to the FER-2013 image folder)")
    root = Path(value)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        pytest.skip(f"FERKIT_DATA={value} has no train/ and test/ folders")
    return root


@pytest.fixture(scope="module")
def real_data(real_root):
    return load_folder(real_root, progress=False)  # decoded once for the module, ~10 s


@pytest.fixture(scope="module")
def real_cache(real_data, tmp_path_factory) -> Path:
    return save_cache(real_data, tmp_path_factory.mktemp("real") / "fer2013.npz")


def _real_config(cache: Path, out: Path, **overrides):
    """ferkit_small at half width on a fixed 6,400-image training subset: 100 steps of 64 an epoch.

    No augmentation and no class weights: 200 steps are too few for either to pay off, and both slow
    the rise of plain accuracy that the assertions check.
    """
    values = dict(
        model_kwargs={"width": 0.5},
        epochs=2,
        batch_size=64,
        train_limit=6400,
        val_limit=1000,
        lr=0.05,
        warmup_epochs=0.3,
        augment="none",
        class_weights=False,
        threads=THREADS,
    )
    return tiny_config(cache, out, **{**values, **overrides})


@pytest.fixture(scope="module")
def real_run(real_cache, tmp_path_factory) -> Path:
    """A finished 2-epoch (200-step) training run on real data; returns its output folder."""
    out = tmp_path_factory.mktemp("real_run") / "run"
    try:
        train(_real_config(real_cache, out))
    finally:
        torch.set_num_threads(1)
    return out


def _metrics(out: Path) -> list[dict[str, float]]:
    with open(out / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_exact_split_and_class_counts(real_data):
    assert len(real_data) == 35_887
    assert real_data.images.shape == (35_887, 48, 48) and real_data.images.dtype == np.uint8
    assert real_data.counts() == EXPECTED
    # the split comes from the file-name prefix, and Training lives in train/
    for source, split in zip(real_data.sources, real_data.splits, strict=True):
        top, _, name = source.split("/")
        assert name.startswith(SPLITS[split] + "_"), source
        assert (top == "train") == (split == 0), source
    assert len(set(real_data.sources.tolist())) == len(real_data)
    assert 80 < real_data.images.mean() < 180  # real faces, not blank decodes


def test_csv_form_matches_the_images(real_data, tmp_path):
    """A small fer2013.csv made of real images loads back to the same pixels, labels and splits."""
    rng = np.random.default_rng(0)
    picks = np.concatenate([rng.choice(np.flatnonzero(real_data.splits == s), 5, replace=False) for s in range(3)])
    rows = [
        (str(int(real_data.labels[i])), pixels_str(real_data.images[i]), SPLITS[real_data.splits[i]]) for i in picks
    ]
    data = load_csv(write_csv(tmp_path / "fer2013.csv", rows), progress=False)
    np.testing.assert_array_equal(data.images, real_data.images[picks])
    np.testing.assert_array_equal(data.labels, real_data.labels[picks])
    np.testing.assert_array_equal(data.splits, real_data.splits[picks])


def test_training_learns(real_run):
    rows = _metrics(real_run)
    assert [r["step"] for r in rows] == [100, 200]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.05
    # PublicTest (held out, 1,000 images): chance is 1/7, always "happy" 25%
    assert max(r["val_acc"] for r in rows) > 0.30
    assert load_checkpoint(real_run / "best.pt")["metrics"]["val_acc"] == max(r["val_acc"] for r in rows)


def test_resume_and_evaluate(real_run, real_cache, tmp_path):
    real_run = shutil.copytree(real_run, tmp_path / "run")  # the module's run stays as the other tests read it
    try:  # half of a third epoch: enough to show that it continues where it stopped
        result = train(_real_config(real_cache, real_run, epochs=3, max_steps=250), resume=True)
    finally:
        torch.set_num_threads(1)
    assert result["epoch"] == 3 and result["step"] == 250
    rows = _metrics(real_run)
    assert [(r["epoch"], r["step"]) for r in rows] == [(1, 100), (2, 200), (3, 250)]
    assert "resumed from" in (real_run / "train.log").read_text()

    res = evaluate_checkpoints(
        [real_run / "best.pt"], real_cache, split="PrivateTest", out=tmp_path / "eval", device="cpu", limit=1000
    )
    n = res["n"]
    cm = np.array(res["confusion_matrix"])
    assert n == 1000 and cm.sum() == n
    assert res["accuracy"] == pytest.approx(np.trace(cm) / n)
    assert res["accuracy"] > 0.30  # PrivateTest: the final, untouched test set
    rep = res["report"]
    assert sum(rep[c]["support"] for c in CLASSES) == n
    f1s = []
    for i, c in enumerate(CLASSES):
        assert rep[c]["support"] == cm[i].sum()
        assert rep[c]["recall"] == pytest.approx(cm[i, i] / cm[i].sum())
        f1s.append(rep[c]["f1-score"])
    assert res["macro_f1"] == pytest.approx(np.mean(f1s))
    assert 0.6 < res["macro_auc"] <= 1.0
    assert (tmp_path / "eval" / "PrivateTest_limit1000.json").is_file()  # a subset, named as one
    assert (tmp_path / "eval" / "PrivateTest_limit1000_confusion.png").is_file()


@pytest.mark.parametrize("name", ["inference_speed", "face_detection", "crop_margin", "train_throughput", "load_app"])
def test_each_benchmark_runs_and_writes_its_quick_report(name, real_cache, tmp_path):
    """The README's numbers come from these scripts: each must still run (tiny settings) and report."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    data = [] if name == "load_app" else ["--data", str(real_cache)]
    cmd = [sys.executable, str(root / "benchmarks" / f"{name}.py"), "--quick", "--out-dir", str(tmp_path), *data]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / f"{name}_quick.json").read_text())
    assert report["quick"] is True and report["machine"]
    assert report["revision"] is None or report["revision"].rstrip("+").isalnum()  # None outside a checkout
    if name == "inference_speed":  # the default TTA and ten-crop, timed end to end
        assert [r["tta"] for r in report["end_to_end"]] == ["flip", "flip", "crops", "crops"]
