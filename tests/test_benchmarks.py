"""The benchmarks' shared helpers (benchmarks/_common.py): their numbers are those of ``ferkit evaluate``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from ferkit.evaluate import compute_metrics

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import scores  # noqa: E402


def test_benchmark_scores_are_the_evaluation_reports():
    """A subset without class 1 (a --quick run): the hand-written macro F1 counted the absent class as 0."""
    y = np.array([0, 0, 2, 3, 3, 4, 5, 6])
    pred = np.array([0, 2, 2, 3, 0, 4, 5, 6])  # one mistake on class 0, one on class 3
    probs = np.eye(7)[pred]
    report = compute_metrics(y, probs)
    assert scores(y, probs) == {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"], "n": 8}
    assert report["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 2 / 3 + 3) / 6)  # the old code divided by 7
