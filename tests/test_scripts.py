"""The shell scripts: what those of a GPU session refuse before any device time is spent, the tree that
travels (scripts/gpu_flagship.sh, scripts/device_tree.sh), and shipping a run (scripts/ship_model.sh)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("git") is None, reason="needs bash, git")


def flagship(root: Path, runs: str, students: str = "0", **env: str) -> subprocess.CompletedProcess:
    """scripts/gpu_flagship.sh of a project at ``root`` with ``RUNS`` (and ``env``), on no GPU and no data."""
    env = {**os.environ, "OUT": str(root / "out"), "RUNS": runs, "PY": "false", **env}
    script = root / "scripts" / "gpu_flagship.sh"
    return subprocess.run(["bash", str(script), "110", students], env=env, capture_output=True, text=True, timeout=60)


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


def test_the_flagship_script_refuses_what_would_not_come_back_before_any_work(tmp_path):
    """A MEMBERS file left home (device_tree.sh takes models/ out) silently took no part; a ninth file for $OUT did
    not come back; a budget that left the teachers no time ended with exit 0 and no checkpoint."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "gpu_flagship.sh", tmp_path / "scripts")
    done = flagship(tmp_path, "a --seed 1", MEMBERS="models/gone.onnx", EVALUATE="1")
    assert done.returncode == 2 and "MEMBERS: models/gone.onnx not found" in done.stdout
    done = flagship(tmp_path, "; ".join(f"r{i} --seed {i}" for i in range(5)), students="36", EVALUATE="1")
    assert done.returncode == 2 and "10 files for $OUT: the device tool brings back 8" in done.stdout
    done = flagship(tmp_path, "a --seed 1", BUDGET="80")
    assert done.returncode == 2 and "under a minute for the teachers" in done.stdout
    assert not (tmp_path / "runs" / "a").exists()


def test_device_tree_takes_the_big_folders_out_and_puts_them_back(tmp_path):
    """`out` exited 141 although it had worked (`head` closed git status's pipe under pipefail)."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(args, cwd=clone, capture_output=True, text=True, timeout=120)

    shutil.copy(ROOT / "scripts" / "device_tree.sh", clone / "scripts")  # this checkout's, committed or not
    tracked = run("git", "ls-files").stdout.splitlines()
    assert run("bash", "scripts/device_tree.sh", "out").returncode == 0
    again = run("bash", "scripts/device_tree.sh", "out")  # it said: commit the staged changes (the deletions)
    assert again.returncode == 1 and "already out (run back first)" in again.stderr
    left = run("git", "ls-files").stdout.splitlines()
    assert not [p for p in left if p.startswith(("reports/", "models/")) or p.endswith("centerface.onnx")]
    assert sum((clone / p).stat().st_size for p in left) < 16 * 2**20  # the tree that travels, without the data
    assert (clone / "reports").is_dir() and (clone / "src/ferkit/weights/centerface.onnx").is_file()  # kept here
    assert run("bash", "scripts/device_tree.sh", "back").returncode == 0
    assert run("git", "ls-files").stdout.splitlines() == tracked
    changed = run("git", "diff", "--quiet", "HEAD", "--", "scripts/device_tree.sh").returncode == 1  # copied in
    assert run("git", "status", "--short").stdout == (" M scripts/device_tree.sh\n" if changed else "")


def test_ship_model_makes_a_run_the_shipped_model_with_its_own_numbers(trained_run, synthetic_cache, tmp_path):
    """scripts/ship_model.sh in a copy of the project: the int8 export with its class weights undone and its prior
    fitted is evaluated, that very file ships with its PrivateTest flip accuracy, and the card and README quote
    the same report. The run and the data are given as paths relative to where it is called from (they were read
    from the project's folder)."""
    import json

    from ferkit.export import read_metadata

    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    (project / "src/ferkit/weights").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "ship_model.sh", project / "scripts")
    shutil.copy(ROOT / "README.md", project)
    run = shutil.copytree(trained_run, tmp_path / "tiny_run")
    data = os.path.relpath(synthetic_cache, tmp_path)
    env = {**os.environ, "FERKIT": str(Path(sys.executable).with_name("ferkit")), "DATA": data}
    env.update(INT8="1", UNDO="0.5", FIT="1")
    argv = ["bash", "project/scripts/ship_model.sh", run.name, "ferkit train --tiny", "a test machine"]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    shipped = project / "src/ferkit/weights/tiny_run_int8_prior.onnx"
    reports = project / "reports/tiny_run_int8_prior"
    head = json.loads((reports / "PrivateTest_tta-flip.json").read_text())
    info = read_metadata(shipped)
    assert info["accuracy"] == head["accuracy"] and info["name"] == "tiny_run_int8_prior"
    assert info["class_weights_undone"]["power"] == 0.5 and info["prior_fitted"]["split"] == "PublicTest"
    assert {"PublicTest.json", "PrivateTest_tta-crops.json", "metrics.csv", "train.log"} <= {
        p.name for p in reports.iterdir()
    }
    card = (project / "MODEL_CARD.md").read_text()
    assert card.startswith("# Model card: tiny_run_int8_prior") and "`ferkit train --tiny`" in card
    assert f"{head['accuracy']:.2%}" in card and f"{head['accuracy']:.2%}" in (project / "README.md").read_text()


def test_ship_model_that_fails_leaves_nothing_behind(trained_run, synthetic_cache, tmp_path):
    """A run that cannot ship (here: its best.pt is damaged) left an empty reports/<name>/ folder."""
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "ship_model.sh", project / "scripts")
    run = shutil.copytree(trained_run, tmp_path / "damaged_run")
    (run / "best.pt").write_bytes(b"not a checkpoint")
    env = {**os.environ, "FERKIT": str(Path(sys.executable).with_name("ferkit")), "DATA": str(synthetic_cache)}
    argv = ["bash", "scripts/ship_model.sh", str(run), "ferkit train --tiny", "a test machine"]
    done = subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "best.pt: not a readable ferkit checkpoint" in done.stderr
    assert not (project / "reports").exists() or not any((project / "reports").iterdir())
    assert not (project / "src").exists()


def test_device_tree_refuses_to_take_out_what_is_staged(tmp_path):
    """`back` resets reports/ and models/ to HEAD: what was staged there before `out` was unstaged."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    shutil.copy(ROOT / "scripts" / "device_tree.sh", clone / "scripts")  # this checkout's, committed or not
    (clone / "reports" / "new.json").write_text("{}")
    subprocess.run(["git", "add", "reports/new.json"], cwd=clone, check=True)
    done = subprocess.run(["bash", "scripts/device_tree.sh", "out"], cwd=clone, capture_output=True, text=True)
    assert done.returncode == 1 and "changes are staged under reports" in done.stderr
    staged = subprocess.run(["git", "diff", "--cached", "--name-only"], cwd=clone, capture_output=True, text=True)
    assert staged.stdout.split() == ["reports/new.json"]


def test_dev_script_repairs_a_virtualenv_without_pip_or_python(tmp_path):
    """A .venv whose Python had no pip (its making stopped; uv venv) failed every later run; the first repair
    cleared such a venv, packages and all, even on a mistyped command."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "dev.sh", tmp_path / "scripts")
    venv = tmp_path / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    (venv / "kept").write_text("")
    env = {**os.environ, "PYTHON": sys.executable}

    def dev(*args: str) -> subprocess.CompletedProcess:  # no project here: its pip install fails, after the repair
        return subprocess.run(["bash", "scripts/dev.sh", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip

    def has_pip() -> bool:
        return subprocess.run([venv / "bin" / "python", "-m", "pip", "--version"], capture_output=True).returncode == 0

    done = dev("sreve")
    assert done.returncode == 2 and "usage: bash scripts/dev.sh serve" in done.stderr and not has_pip()  # untouched
    dev("serve")
    assert has_pip() and (venv / "kept").exists()  # pip added, nothing cleared
    (venv / "bin" / "python").unlink()
    (venv / "bin" / "python").symlink_to(tmp_path / "gone" / "python3")  # the Python it was made with, removed
    dev("serve")
    assert has_pip() and not (venv / "kept").exists()  # made anew
