"""The benchmarks' shared helpers (benchmarks/_common.py): their numbers are those of ``ferkit evaluate``, a
missing data set is an error that says how to make it, and each report names the commit it measured."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from ferkit.evaluate import compute_metrics

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import ROOT, git_revision, load_fer, scores  # noqa: E402


def test_benchmark_scores_are_the_evaluation_reports():
    """A subset without class 1 (a --quick run): the hand-written macro F1 counted the absent class as 0."""
    y = np.array([0, 0, 2, 3, 3, 4, 5, 6])
    pred = np.array([0, 2, 2, 3, 0, 4, 5, 6])  # one mistake on class 0, one on class 3
    probs = np.eye(7)[pred]
    report = compute_metrics(y, probs)
    assert scores(y, probs) == {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"], "n": 8}
    assert report["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 2 / 3 + 3) / 6)  # the old code divided by 7


def test_a_benchmark_without_the_data_says_how_to_make_it(tmp_path):
    """It ended in ferkit's traceback, with no word of `ferkit prepare`."""
    with pytest.raises(SystemExit, match=r"nothing\.npz: no FER-2013 cache; make it first: ferkit prepare"):
        load_fer(tmp_path / "nothing.npz")


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")
def test_a_report_names_the_commit_it_measured():
    import subprocess

    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    revision = git_revision()
    assert revision is not None and head.startswith(revision.rstrip("+")) and len(revision.rstrip("+")) == 12


def test_augment_sharpness_measures_the_blur_of_the_resampling(tmp_path, synthetic_cache):
    """benchmarks/augment_sharpness.py: the presets' geometry blurs every face (sharpness under the test faces'),
    half as many resampled blur less, and a share of 0 leaves them as sharp as at test time."""
    import json

    import augment_sharpness

    argv = [
        "--data",
        str(synthetic_cache),
        "--out-dir",
        str(tmp_path),
        "--presets",
        "light",
        "--geometry",
        "1",
        "0.5",
        "0",
    ]
    augment_sharpness.main([*argv, "--faces", "100", "--threads", "1"])
    rows = json.loads((tmp_path / "augment_sharpness.json").read_text())["rows"]
    test, full, half, none = (r["vs_test"] for r in rows)
    assert test == 1.0 and full < half < none and none == pytest.approx(1.0, abs=1e-4)
