"""The shell scripts of a GPU session: what they refuse before any device time is spent, and the tree that
travels (scripts/gpu_flagship.sh, scripts/device_tree.sh)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("git") is None, reason="needs bash, git")


def flagship(root: Path, runs: str) -> subprocess.CompletedProcess:
    """scripts/gpu_flagship.sh of a project at ``root`` with ``RUNS``, on no GPU and no data."""
    env = {**os.environ, "OUT": str(root / "out"), "RUNS": runs, "PY": "false"}
    script = root / "scripts" / "gpu_flagship.sh"
    return subprocess.run(["bash", str(script), "110", "0"], env=env, capture_output=True, text=True, timeout=60)


def test_the_flagship_script_refuses_a_run_name_twice_or_an_existing_run(tmp_path):
    """An existing runs/NAME came back as this session's (its old best.pt slimmed), with exit 0."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "gpu_flagship.sh", tmp_path / "scripts")
    twice = flagship(tmp_path, "a --seed 1; a --seed 2")
    assert twice.returncode == 2 and "RUNS names a run twice" in twice.stdout
    (tmp_path / "runs" / "b").mkdir(parents=True)
    old = flagship(tmp_path, "a --seed 1; b --seed 2")
    assert old.returncode == 2 and "runs/b already exists: give the run a new name" in old.stdout
    assert not (tmp_path / "data").exists() or not list((tmp_path / "data").iterdir())  # before any work


def test_device_tree_takes_the_big_folders_out_and_puts_them_back(tmp_path):
    """`out` exited 141 although it had worked (`head` closed git status's pipe under pipefail)."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=clone, capture_output=True, text=True, timeout=120)

    tracked = run("git", "ls-files").stdout.splitlines()
    assert run("bash", "scripts/device_tree.sh", "out").returncode == 0
    left = run("git", "ls-files").stdout.splitlines()
    assert not [p for p in left if p.startswith(("reports/", "models/")) or p.endswith("centerface.onnx")]
    assert sum((clone / p).stat().st_size for p in left) < 16 * 2**20  # the tree that travels, without the data
    assert (clone / "reports").is_dir() and (clone / "src/ferkit/weights/centerface.onnx").is_file()  # kept here
    assert run("bash", "scripts/device_tree.sh", "back").returncode == 0
    assert run("git", "ls-files").stdout.splitlines() == tracked and run("git", "status", "--short").stdout == ""
