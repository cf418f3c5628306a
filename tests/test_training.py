"""The training loop (outputs, exact resume, schedules, early stopping), checkpoints and atomic writes."""

from __future__ import annotations

import csv
import errno
import json
import logging
import math
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import synthetic_data, tiny_config

from ferkit import distill, training
from ferkit.checkpoint import (
    CheckpointError,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    slim_checkpoint,
)
from ferkit.cli import main
from ferkit.config import TrainConfig
from ferkit.data import CLASSES, FERData, load_cache, save_cache
from ferkit.fileio import LOCK_NAME, atomic_write, exclusive_folder
from ferkit.models import build_model
from ferkit.runtime import resolve_device
from ferkit.training import RUN_IN_PROGRESS, amp_dtype, batch_indices, lr_factor, make_optimizer, train

STEPS_PER_EPOCH = 4  # tiny_config: train_limit 64 / batch 16


def _metrics(out: Path) -> list[dict[str, float]]:
    with open(out / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- a run's outputs


def test_run_outputs(trained_run):
    for name in ("best.pt", "last.pt", "metrics.csv", "train.log", "config.yaml"):
        assert (trained_run / name).is_file(), name
    assert not list(trained_run.glob("*.tmp")) and [p.name for p in trained_run.glob(".*")] == [LOCK_NAME]
    config = TrainConfig.from_yaml(trained_run / "config.yaml")
    assert config.to_dict() == torch.load(trained_run / "best.pt", weights_only=False)["config"]
    rows = _metrics(trained_run)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert [r["step"] for r in rows] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    for r in rows:
        assert 0 <= r["val_acc"] <= 1 and 0 <= r["train_acc"] <= 1
        assert r["train_loss"] > 0 and r["val_loss"] > 0 and r["img_per_s"] > 0
    log = (trained_run / "train.log").read_text()
    assert "epoch 1:" in log and "epoch 2:" in log and "best PublicTest accuracy" in log
    assert "class weights: {'angry': 0.956, 'disgust': 1.008," in log  # of the train_limit's 64 images

    last = load_checkpoint(trained_run / "last.pt")
    assert last["model"] == "ferkit_small" and last["model_kwargs"] == {"width": 0.25}
    assert last["classes"] == list(CLASSES)
    assert last["train_state"]["epoch"] == 2 and last["train_state"]["step"] == 2 * STEPS_PER_EPOCH
    assert TrainConfig.from_dict(last["config"]).epochs == 2
    best = load_checkpoint(trained_run / "best.pt")
    best_row = max(rows, key=lambda r: r["val_acc"])  # first epoch with the best accuracy
    assert best["metrics"]["epoch"] == best_row["epoch"]
    assert "optimizer" not in best

    model, state = model_from_checkpoint(trained_run / "last.pt")
    assert not model.training
    _assert_same_weights(model.state_dict(), last["state_dict"])
    assert model(torch.rand(2, 1, 48, 48)).shape == (2, 7)


def test_train_evaluates_its_best_checkpoint_as_the_config_says(tmp_path, synthetic_cache):
    """``evaluate`` (on by default) is the Python API's too: train() wrote no out/eval, the CLI alone did."""
    result = train(tiny_config(synthetic_cache, tmp_path / "run", epochs=1, evaluate=True, tta="flip"))
    report = result["evaluation"]
    assert report["split"] == "PrivateTest" and report["tta"] == "flip"
    assert report["checkpoints"] == [str(tmp_path / "run" / "best.pt")]
    assert Path(report["report_json"]) == tmp_path / "run" / "eval" / "PrivateTest_tta-flip.json"
    assert json.loads(Path(report["report_json"]).read_text())["accuracy"] == report["accuracy"]
    assert train(tiny_config(synthetic_cache, tmp_path / "off", epochs=1))["evaluation"] is None
    assert not (tmp_path / "off" / "eval").exists()
    assert train(tiny_config(synthetic_cache, tmp_path / "none", epochs=0, evaluate=True))["evaluation"] is None
    # data without PrivateTest: refused before the training (it trained, then failed the evaluation)
    no_test = save_cache(synthetic_data({"Training": 16, "PublicTest": 4, "PrivateTest": 0}), tmp_path / "n.npz")
    with pytest.raises(ValueError, match="no PrivateTest images for the final evaluation"):
        train(tiny_config(no_test, tmp_path / "no_test", evaluate=True))
    assert not (tmp_path / "no_test").exists()
    assert train(tiny_config(no_test, tmp_path / "no_test", epochs=1))["evaluation"] is None  # --no-evaluate
    assert train(tiny_config(no_test, tmp_path / "targets", epochs=0, evaluate=True))["evaluation"] is None


def test_training_learns_the_synthetic_task(tmp_path, synthetic_cache):
    """The synthetic classes differ by a bright block; a few epochs must beat chance (1/7) clearly."""
    out = tmp_path / "run"
    result = train(tiny_config(synthetic_cache, out, epochs=6, train_limit=0, augment="none", batch_size=16))
    rows = _metrics(out)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert result["best_acc"] >= 0.5
    assert result["best"] == str(out / "best.pt")


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize(
    "variant",
    [
        "cosine-interrupted",  # epochs=2 stopped after epoch 1 (max_steps), then resumed
        "constant-extended",  # epochs=1, then resumed with epochs=2; with EMA, mixup/CutMix, balanced sampler
    ],
)
def test_resume_is_exact(tmp_path, synthetic_cache, variant):
    extra = {}
    if variant == "constant-extended":
        extra = dict(schedule="constant", ema=0.9, mixup=0.2, cutmix=0.5, sampler="balanced", augment="strong")
    straight = tmp_path / "straight"
    train(tiny_config(synthetic_cache, straight, epochs=2, **extra))

    parts = tmp_path / "parts"
    if variant == "cosine-interrupted":
        first = train(tiny_config(synthetic_cache, parts, epochs=2, max_steps=STEPS_PER_EPOCH, **extra))
    else:
        first = train(tiny_config(synthetic_cache, parts, epochs=1, **extra))
    assert first["epoch"] == 1
    result = train(tiny_config(synthetic_cache, parts, epochs=2, **extra), resume=True)
    assert result["epoch"] == 2 and result["step"] == 2 * STEPS_PER_EPOCH
    assert "resumed from" in (parts / "train.log").read_text()
    if extra.get("sampler") == "balanced":  # the config still says class_weights: true; the log says what ran
        assert "class weights: none (the balanced sampler" in (parts / "train.log").read_text()

    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(parts / "last.pt")
    _assert_same_weights(a["state_dict"], b["state_dict"])
    if extra.get("ema"):
        _assert_same_weights(a["ema_state_dict"], b["ema_state_dict"])
        assert not torch.equal(a["ema_state_dict"]["head.3.weight"], a["state_dict"]["head.3.weight"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    ra, rb = _metrics(straight), _metrics(parts)
    for r in ra + rb:
        del r["epoch_time_s"], r["img_per_s"]
    assert ra == rb


def test_a_longer_cosine_takes_its_own_learning_rate_from_the_first_new_step(tmp_path, synthetic_cache):
    """A finished cosine run extended spent its first new step at the old curve's end, LR 0 (metrics.csv said so)."""
    out = tmp_path / "run"
    train(tiny_config(synthetic_cache, out, epochs=1, min_lr_ratio=0.0))
    before = load_checkpoint(out / "last.pt")["state_dict"]
    train(tiny_config(synthetic_cache, out, epochs=2, max_steps=STEPS_PER_EPOCH + 1), resume=True)
    cfg = tiny_config(synthetic_cache, out, epochs=2)
    assert _metrics(out)[1]["lr"] == pytest.approx(cfg.lr * lr_factor(cfg, STEPS_PER_EPOCH, STEPS_PER_EPOCH))
    after = load_checkpoint(out / "last.pt")["state_dict"]
    assert not torch.equal(before["head.3.weight"], after["head.3.weight"])  # the step moved the weights


def test_resume_without_checkpoint_starts_fresh(tmp_path, synthetic_cache):
    out = tmp_path / "run"
    result = train(tiny_config(synthetic_cache, out, epochs=1), resume=True)
    assert result["epoch"] == 1
    assert "no " in (out / "train.log").read_text() and "starting a new run" in (out / "train.log").read_text()


def test_resume_of_finished_run_changes_nothing(tmp_path, synthetic_cache):
    out = tmp_path / "run"
    train(tiny_config(synthetic_cache, out, epochs=1))
    before = (out / "last.pt").read_bytes()
    result = train(tiny_config(synthetic_cache, out, epochs=1), resume=True)
    assert result["epoch"] == 1
    assert (out / "last.pt").read_bytes() == before


def test_a_new_run_refuses_to_overwrite_an_old_one(tmp_path, synthetic_cache):
    out = tmp_path / "run"
    train(tiny_config(synthetic_cache, out, epochs=1))
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.suffix in (".pt", ".csv")}
    with pytest.raises(ValueError, match="already holds a run .* --resume continues it"):
        train(tiny_config(synthetic_cache, out, epochs=1, seed=5))
    assert {p: (out / p).read_bytes() for p in files} == files


def test_a_run_killed_between_its_writes_resumes_whole(tmp_path, synthetic_cache, monkeypatch):
    """A kill after the last epoch's last.pt lost that epoch from metrics.csv for good (no later epoch rewrote
    it); best.pt, written before last.pt, could hold an epoch that the resumed run redid otherwise."""
    out = tmp_path / "run"
    cfg = tiny_config(synthetic_cache, out, epochs=2, patience=0)
    real_save, real_record = training.save_checkpoint, training._Run.record

    def killed_before_best(path, state):
        if Path(path).name == "best.pt" and state["metrics"]["epoch"] == 2:
            raise KeyboardInterrupt
        return real_save(path, state)

    def improved_in_epoch_2(run, row):  # so that epoch 2 writes a best.pt
        row["val_acc"] = row["epoch"] / 10
        return real_record(run, row)

    monkeypatch.setattr(training._Run, "record", improved_in_epoch_2)
    monkeypatch.setattr(training, "save_checkpoint", killed_before_best)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert load_checkpoint(out / "best.pt")["metrics"]["epoch"] == 1  # last.pt has epoch 2, best.pt not yet
    assert load_checkpoint(out / "last.pt")["train_state"]["epoch"] == 2
    assert (out / "metrics.csv").read_text().count("\n") == 2  # header + epoch 1
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    train(cfg, resume=True)  # nothing left to train: only what the kill left unwritten
    best, last = load_checkpoint(out / "best.pt"), load_checkpoint(out / "last.pt")
    assert best["metrics"]["epoch"] == 2 and last["train_state"]["best_epoch"] == 2
    assert all(torch.equal(best["state_dict"][k], v) for k, v in last["state_dict"].items())
    assert [r["epoch"] for r in csv.DictReader((out / "metrics.csv").open())] == ["1", "2"]
    # killed after the last epoch's checkpoints, before its metrics row
    out2 = tmp_path / "run2"
    real_report = training._report_epoch

    def killed_in_epoch_2(out, run, row, *args):
        if row["epoch"] == 2:
            raise KeyboardInterrupt
        real_report(out, run, row, *args)

    monkeypatch.setattr(training, "_report_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(synthetic_cache, out2, epochs=2))
    monkeypatch.setattr(training, "_report_epoch", real_report)
    train(tiny_config(synthetic_cache, out2, epochs=2), resume=True)
    assert [r["epoch"] for r in csv.DictReader((out2 / "metrics.csv").open())] == ["1", "2"]


def test_a_folder_holding_only_best_pt_is_not_overwritten(tmp_path, synthetic_cache):
    out = tmp_path / "run"
    train(tiny_config(synthetic_cache, out, epochs=1))
    (out / "last.pt").unlink()
    best = (out / "best.pt").read_bytes()
    with pytest.raises(ValueError, match=r"already holds a run \(best.pt\)"):
        train(tiny_config(synthetic_cache, out, epochs=1))
    with pytest.raises(ValueError, match="holds a best.pt but no last.pt to resume from"):
        train(tiny_config(synthetic_cache, out, epochs=1), resume=True)
    assert (out / "best.pt").read_bytes() == best


def test_resume_errors_name_the_checkpoint(tmp_path, synthetic_cache):
    out = tmp_path / "run"
    train(tiny_config(synthetic_cache, out, epochs=1))
    recipe = (out / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"last.pt: this run was trained with other settings \(model_kwargs: "):
        train(tiny_config(synthetic_cache, out, epochs=2, model_kwargs={"width": 0.5}), resume=True)
    for changed in ({"lr": 0.01}, {"ema": 0.99}, {"schedule": "plateau"}, {"augment": "none"}):
        with pytest.raises(ValueError, match=f"this run was trained with other settings \\({next(iter(changed))}: "):
            train(tiny_config(synthetic_cache, out, epochs=2, **changed), resume=True)
    assert (out / "config.yaml").read_text() == recipe  # a failed resume leaves the run's recipe alone
    last = torch.load(out / "last.pt", weights_only=False)  # a run from before --geometry, which its config lacks
    del last["config"]["geometry"]
    torch.save(last, out / "last.pt")
    with pytest.raises(ValueError, match=r"other settings \(geometry: 1.0 -> 0.3\)"):  # it was taken silently
        train(tiny_config(synthetic_cache, out, epochs=2, geometry=0.3), resume=True)
    (out / "last.pt").write_bytes((out / "best.pt").read_bytes())  # a best.pt has no optimizer state
    with pytest.raises(ValueError, match="last.pt: no optimizer state to resume from"):
        train(tiny_config(synthetic_cache, out, epochs=2), resume=True)


def test_resume_takes_moved_data_but_not_other_data(tmp_path, synthetic_cache):
    """Resumed on a data set of another size, the cosine schedule went back up (it counts steps of an epoch)."""
    out = tmp_path / "run"
    train(tiny_config(synthetic_cache, out, epochs=1))
    moved = tmp_path / "moved.npz"
    moved.write_bytes(synthetic_cache.read_bytes())  # the same data elsewhere: fine
    assert train(tiny_config(moved, out, epochs=2), resume=True)["epoch"] == 2
    data = load_cache(synthetic_cache)
    save_cache(FERData(data.images[16:], data.labels[16:], data.splits[16:], data.sources[16:]), tmp_path / "less.npz")
    with pytest.raises(ValueError, match=r"last.pt: this run trained on other images \(n=64 sha256=\w+\) than .*less"):
        train(tiny_config(tmp_path / "less.npz", out, epochs=3), resume=True)


def test_a_moved_run_resumes_without_its_initial_weights_file(tmp_path, synthetic_cache, trained_run):
    init = tmp_path / "init.pt"
    init.write_bytes((trained_run / "best.pt").read_bytes())
    train(tiny_config(synthetic_cache, tmp_path / "a", epochs=1, init_weights=str(init)))
    (tmp_path / "a").rename(tmp_path / "b")  # e.g. copied back from a GPU machine
    init.unlink()  # only the start read it
    result = train(tiny_config(synthetic_cache, tmp_path / "." / "b", epochs=2, init_weights=str(init)), resume=True)
    assert result["epoch"] == 2
    assert "resuming with out" in (tmp_path / "b" / "train.log").read_text()


def test_a_run_that_fails_to_start_leaves_no_run_folder(tmp_path, synthetic_cache):
    """They were found missing after the data was read, and left an empty run folder with an empty train.log, as
    initial weights, a model or a targets file that fail still did."""
    missing = tmp_path / "teacher" / "best.pt"
    for option, change in (("teacher", {"teacher": [str(missing)]}), ("init-weights", {"init_weights": str(missing)})):
        with pytest.raises(
            FileNotFoundError,
            match=re.escape(f"--{option} {missing}: no such file (train or export")
            if option == "teacher"
            else re.escape(f"{missing}: no such file (nothing is downloaded)"),
        ):
            train(tiny_config(synthetic_cache, tmp_path / "run", **change))
    with pytest.raises(FileNotFoundError, match=re.escape(f"--init-weights {tmp_path}: a folder, not a file")):
        train(tiny_config(synthetic_cache, tmp_path / "run", init_weights=str(tmp_path)))
    with pytest.raises(
        ValueError, match=re.escape(f"{synthetic_cache}: 8 Training images, fewer than one batch of 16")
    ):
        train(tiny_config(synthetic_cache, tmp_path / "run", train_limit=8, batch_size=16))
    tests_only = synthetic_data({"Training": 0, "PublicTest": 1, "PrivateTest": 1})  # a CSV of test rows, say
    no_training = save_cache(tests_only, tmp_path / "tests_only.npz")
    with pytest.raises(ValueError, match=re.escape(f"{no_training}: no Training images to train on")):
        train(tiny_config(no_training, tmp_path / "run"))
    (tmp_path / "text.pt").write_text("not weights")  # found wanting once the run's log is open
    with pytest.raises(ValueError, match="text.pt: not a readable weights file"):
        train(tiny_config(synthetic_cache, tmp_path / "run", init_weights=str(tmp_path / "text.pt")))
    assert not (tmp_path / "run").exists()
    (tmp_path / "kept").mkdir()  # a folder that was there stays
    with pytest.raises(ValueError, match="text.pt: not a readable weights file"):
        train(tiny_config(synthetic_cache, tmp_path / "kept", init_weights=str(tmp_path / "text.pt")))
    assert (tmp_path / "kept").is_dir()
    (tmp_path / "afile").write_text("")  # was "[Errno 17] File exists: 'afile'", after the data was read
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(ValueError, match=re.escape(f"--out {out}: {tmp_path / 'afile'} is a file, not a folder")):
            train(tiny_config(tmp_path / "no-data.npz", out))


def test_two_trainings_never_share_a_run_folder(tmp_path, synthetic_cache, monkeypatch):
    """A scheduler's --resume while the old job still ran: both trained, wrote last.pt and logged every epoch
    twice, and each swept the other's half-written files (every .*.tmp, a user's own too). A lock on the
    folder (flock, gone with its process) refuses the second before it touches anything."""
    out, resumable = tmp_path / "run", training._resumable
    train(tiny_config(synthetic_cache, out, epochs=1))
    (out / ".notes.tmp").write_text("mine")
    stale = out / ".last.pt.0123456789abcdef.tmp"  # atomic_write's, from a killed process
    stale.write_bytes(b"half")
    log = (out / "train.log").read_text()
    refused = pytest.raises(RuntimeError, match="another training is writing to this folder")
    read = []
    monkeypatch.setattr(training, "_resumable", lambda *args: read.append(args) or resumable(*args))
    with exclusive_folder(out, RUN_IN_PROGRESS), refused:  # as the run still going holds it
        train(tiny_config(synthetic_cache, out, epochs=2), resume=True)
    assert not read  # refused before its last.pt was read: the old job may write another yet
    assert stale.exists() and (out / "train.log").read_text() == log
    assert train(tiny_config(synthetic_cache, out, epochs=2), resume=True)["epoch"] == 2
    assert not stale.exists() and (out / ".notes.tmp").read_text() == "mine"


def test_a_file_system_without_locks_trains_with_a_warning(tmp_path, synthetic_cache, monkeypatch):
    """flock failing otherwise than by a holder (ENOLCK on some network mounts) stopped every training there."""
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    train(tiny_config(synthetic_cache, tmp_path / "run", epochs=1))
    assert "its file system takes no locks" in (tmp_path / "run" / "train.log").read_text()


def test_each_start_of_a_run_is_recorded_with_what_a_repeat_needs(tmp_path, synthetic_cache):
    """A run resumed with more epochs could not be repeated from its config.yaml (which holds the last epochs
    only), nor bitwise without the torch version and thread count: last.pt keeps each start's. A resume
    that max_steps leaves nothing to do says so (it printed only 'resumed ... best ...')."""
    out = tmp_path / "run"
    train(tiny_config(synthetic_cache, out, epochs=1, warmup_epochs=1.5))
    assert "warmup_epochs 1.5 is longer than the run (1 epochs)" in (out / "train.log").read_text()
    train(tiny_config(synthetic_cache, out, epochs=3, max_steps=2 * STEPS_PER_EPOCH, warmup_epochs=1.5), resume=True)
    starts = load_checkpoint(out / "last.pt")["train_state"]["starts"]
    assert [(s["epoch"], s["changes"]) for s in starts] == [(0, {}), (1, {"epochs": (1, 3), "max_steps": (0, 8)})]
    assert starts[1] | {"epoch": 0, "changes": {}} == starts[0]  # the same machine
    assert (starts[0]["torch"], starts[0]["device"], starts[0]["threads"]) == (torch.__version__, "cpu", 1)
    train(tiny_config(synthetic_cache, out, epochs=3, max_steps=2 * STEPS_PER_EPOCH, warmup_epochs=1.5), resume=True)
    assert "max_steps 8 reached: training stops" in (out / "train.log").read_text()


def test_a_finished_run_hands_its_log_back_to_the_application(tmp_path, synthetic_cache, caplog):
    """The run's own handlers (train.log, the console) go with it; the log kept propagate=False, so an
    application's handlers never saw ferkit.train's messages after a run."""
    train(tiny_config(synthetic_cache, tmp_path / "run", epochs=1))
    log = logging.getLogger("ferkit.train")
    assert (log.handlers, log.propagate, log.level) == ([], True, logging.NOTSET)
    with caplog.at_level(logging.INFO):
        log.info("after the run")
    assert "after the run" in caplog.text


def test_max_steps_stops_mid_epoch(tmp_path, synthetic_cache, capsys):
    """...and the progress bar counts the last step (break left it one batch short: 1/4)."""
    out = tmp_path / "run"
    result = train(tiny_config(synthetic_cache, out, epochs=5, max_steps=STEPS_PER_EPOCH + 2, progress=True))
    assert result["step"] == STEPS_PER_EPOCH + 2
    assert [r["step"] for r in _metrics(out)] == [STEPS_PER_EPOCH, STEPS_PER_EPOCH + 2]
    last_bar = capsys.readouterr().err.split("epoch 2/5")[-1]
    assert f" 2/{STEPS_PER_EPOCH} " in last_bar and "lr=" in last_bar


def test_a_progress_bar_into_a_log_file_redraws_seldom(tmp_path, synthetic_cache, capsys, monkeypatch):
    """Into a file or pipe (a nohup log), the epoch bar drew every 0.1 s: thousands of lines an epoch."""
    batch = training.augmented_batch

    def slow(*args, **kwargs):  # a step that takes longer than a terminal's redraw interval
        time.sleep(0.15)
        return batch(*args, **kwargs)

    monkeypatch.setattr(training, "augmented_batch", slow)
    train(tiny_config(synthetic_cache, tmp_path / "run", epochs=1, progress=True))
    draws = capsys.readouterr().err.count("epoch 1/1")
    assert 1 <= draws <= 3, draws  # its start and its end (a draw at each of the 4 steps before)


# ---------------------------------------------------------------- plateau and early stopping


def _constant_predictions(monkeypatch):
    """PublicTest accuracy that never improves: a model-independent prediction."""

    def fake(model, images, **kw):
        probs = np.full((len(images), len(CLASSES)), 0.1)
        probs[:, 3] = 0.4
        return probs

    monkeypatch.setattr(training, "predict_proba", fake)


def test_plateau_halves_the_lr_used_for_training(tmp_path, synthetic_cache, monkeypatch):
    _constant_predictions(monkeypatch)
    out = tmp_path / "run"
    cfg = tiny_config(synthetic_cache, out, epochs=4, schedule="plateau", plateau_patience=0, lr=0.01)
    train(cfg)
    lrs = [r["lr"] for r in _metrics(out)]  # each epoch's LR, as it starts
    # epoch 1 sets the best; each later epoch without improvement halves the next one's LR, cumulatively
    assert lrs == pytest.approx([0.01, 0.01, 0.005, 0.0025])
    # and the optimizer steps with them: epoch 4's halving is the one a fifth epoch would start with
    assert load_checkpoint(out / "last.pt")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.00125)


def test_the_logged_lr_is_the_one_each_epoch_starts_with(tmp_path, synthetic_cache):
    """metrics.csv logged the LR after the epoch's last step: the next epoch's (0 for a cosine's last epoch)."""
    out = tmp_path / "run"
    cfg = tiny_config(synthetic_cache, out, epochs=3, warmup_epochs=0.0, lr=0.1)
    train(cfg)
    steps = int(_metrics(out)[0]["step"])  # an epoch's
    assert [r["lr"] for r in _metrics(out)] == pytest.approx([0.1 * lr_factor(cfg, e * steps, steps) for e in range(3)])
    assert _metrics(out)[-1]["lr"] > 0


def test_plateau_state_survives_resume(tmp_path, synthetic_cache, monkeypatch):
    _constant_predictions(monkeypatch)
    kw = dict(schedule="plateau", plateau_patience=1, lr=0.01)
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    train(tiny_config(synthetic_cache, straight, epochs=4, **kw))
    train(tiny_config(synthetic_cache, parts, epochs=2, **kw))
    train(tiny_config(synthetic_cache, parts, epochs=4, **kw), resume=True)
    assert [r["lr"] for r in _metrics(straight)] == [r["lr"] for r in _metrics(parts)]
    _assert_same_weights(
        load_checkpoint(straight / "last.pt")["state_dict"], load_checkpoint(parts / "last.pt")["state_dict"]
    )


def test_early_stopping(tmp_path, synthetic_cache, monkeypatch):
    _constant_predictions(monkeypatch)
    out = tmp_path / "run"
    result = train(tiny_config(synthetic_cache, out, epochs=10, patience=2))
    assert result["epoch"] == 3 and result["best_epoch"] == 1 and result["bad_epochs"] == 2
    assert len(_metrics(out)) == 3
    assert "early stopping" in (out / "train.log").read_text()
    before = {name: (out / name).read_bytes() for name in ("last.pt", "metrics.csv")}
    result = train(tiny_config(synthetic_cache, out, epochs=10, patience=2), resume=True)
    assert result["epoch"] == 3  # a resumed run that had stopped early stays stopped (it trained one more epoch)
    assert {name: (out / name).read_bytes() for name in before} == before


# ---------------------------------------------------------------- schedules and helpers


def _cfg(**kw) -> TrainConfig:
    return TrainConfig.from_dict(kw)


def test_lr_factor_warmup_then_cosine():
    cfg = _cfg(schedule="cosine", epochs=10, warmup_epochs=1)
    spe = 10
    assert lr_factor(cfg, 0, spe) == pytest.approx(0.1)
    assert lr_factor(cfg, 4, spe) == pytest.approx(0.5)
    assert lr_factor(cfg, 9, spe) == pytest.approx(1.0)
    assert lr_factor(cfg, 10, spe) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_factor(cfg, 55, spe) == pytest.approx(0.5)  # half way through the cosine
    assert lr_factor(cfg, 100, spe) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(cfg, 150, spe) == pytest.approx(0.0, abs=1e-12)  # stays at the end value
    f = [lr_factor(cfg, s, spe) for s in range(101)]
    assert all(a < b for a, b in zip(f[:10], f[1:10], strict=False))  # warm-up rises
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))  # cosine falls
    cfg_min = _cfg(schedule="cosine", epochs=10, warmup_epochs=0, min_lr_ratio=0.1)
    assert lr_factor(cfg_min, 0, spe) == pytest.approx(1.0)
    assert lr_factor(cfg_min, 50, spe) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(cfg_min, 100, spe) == pytest.approx(0.1)


def test_lr_factor_warmup_of_a_fractional_number_of_steps_stays_below_the_peak():
    for warmup, spe in [(0.5, 3), (1.5, 5), (0.2, 224)]:
        cfg = _cfg(schedule="cosine", epochs=4, warmup_epochs=warmup)
        f = [lr_factor(cfg, s, spe) for s in range(4 * spe)]
        assert max(f) == 1.0 and f.index(1.0) == math.ceil(warmup * spe) - 1


def test_lr_factor_exponential():
    cfg = _cfg(schedule="exponential", decay_rate=0.5, warmup_epochs=2)
    assert lr_factor(cfg, 0, 10) == pytest.approx(1 / 20)
    assert lr_factor(cfg, 19, 10) == pytest.approx(1.0)
    assert lr_factor(cfg, 20, 10) == pytest.approx(1.0)
    assert lr_factor(cfg, 30, 10) == pytest.approx(0.5)
    assert lr_factor(cfg, 45, 10) == pytest.approx(0.5**2.5)


@pytest.mark.parametrize("schedule", ["constant", "plateau"])
def test_lr_factor_flat(schedule):
    cfg = _cfg(schedule=schedule, warmup_epochs=3)
    assert {lr_factor(cfg, s, 7) for s in (0, 5, 100, 10_000)} == {1.0}


def test_lr_factor_unknown():
    cfg = _cfg(warmup_epochs=0)
    cfg.schedule = "linear"  # TrainConfig itself refuses it (below); the function still does
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(cfg, 5, 10)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"schedule": "linear"}, "schedule: 'linear' is not one of cosine"),
        ({"optimizer": "lion"}, "optimizer: 'lion' is not one of sgd, adamw"),
        ({"epochs": "many"}, "epochs: expected int, got 'many'"),
        ({"epochs": True}, "epochs: expected int, got True"),
        ({"lr": None}, "lr: expected float, got None"),
        ({"teacher": "a.pt"}, "teacher: expected list"),
        # out of range: batch_size 0 was a ZeroDivisionError, -5 "trained" with -9 steps an epoch, lr nan
        # trained on NaN losses and saved a "best" checkpoint, ema 2 and label_smoothing 3 were taken
        ({"batch_size": 0}, "batch_size: 0 is outside [1, inf)"),
        ({"batch_size": -5}, "batch_size: -5 is outside [1, inf)"),
        ({"lr": float("nan")}, "lr: nan is outside (0, inf)"),
        ({"lr": float("inf")}, "lr: inf is outside (0, inf)"),
        ({"lr": 0}, "lr: 0.0 is outside (0, inf)"),
        ({"ema": 2}, "ema: 2.0 is outside [0, 1)"),
        ({"label_smoothing": 3}, "label_smoothing: 3.0 is outside [0, 1)"),
        ({"epochs": -1}, "epochs: -1 is outside [0, inf)"),
        ({"mixup": -1}, "mixup: -1.0 is outside [0, inf)"),
        ({"threads": -2}, "threads: -2 is outside [0, 1024]"),
        ({"train_limit": -4}, "train_limit: -4 is outside [0, inf)"),
        ({"warmup_epochs": -1}, "warmup_epochs: -1.0 is outside [0, inf)"),
        ({"distill_temperature": 0}, "distill_temperature: 0.0 is outside (0, inf)"),
        ({"seed": 2**32}, "seed: 4294967296 is outside [0, 4294967295]"),  # overflowed later, unnamed
        ({"lr": "fast"}, "lr: expected float, got 'fast'"),
    ],
)
def test_config_refuses_bad_values(values, message):
    with pytest.raises(ValueError, match=re.escape(f"cfg.yaml: {message}")):
        TrainConfig.from_dict(values, source="cfg.yaml")


def test_config_takes_the_ends_of_its_ranges():
    cfg = TrainConfig(epochs=0, ema=0.0, momentum=0.0, distill_alpha=1.0, decay_rate=1.0, min_lr_ratio=1.0)
    assert (cfg.epochs, cfg.distill_alpha, cfg.decay_rate) == (0, 1.0, 1.0)


def test_a_diverging_run_stops_and_saves_nothing_of_it(tmp_path, synthetic_cache):
    with pytest.raises(ValueError, match=re.escape("training diverged: train loss nan in epoch 1 (try a lower --lr")):
        train(tiny_config(synthetic_cache, tmp_path / "run", lr=1e30, epochs=3))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_NAME, "config.yaml", "train.log"]


def test_config_takes_yaml_s_exponent_strings_for_a_float(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 1e-3\nweight_decay: 5E-4\n")  # YAML 1.1: strings without a dot
    cfg = TrainConfig.from_yaml(tmp_path / "c.yaml")
    assert (cfg.lr, cfg.weight_decay) == (0.001, 0.0005)


def test_config_takes_an_int_for_a_float():
    assert TrainConfig.from_dict({"lr": 1}).lr == 1.0 and isinstance(TrainConfig.from_dict({"lr": 1}).lr, float)


def test_config_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        TrainConfig.from_yaml(bad)
    bad.write_text("epochs: many\n")
    with pytest.raises(ValueError, match="bad.yaml: epochs: expected int"):
        TrainConfig.from_yaml(bad)


def test_batch_indices():
    batches = list(batch_indices(50, 8, seed=1, epoch=0))
    assert len(batches) == 6 and all(len(b) == 8 for b in batches)
    flat = torch.cat(batches)
    assert len(set(flat.tolist())) == 48 and flat.max() < 50  # no repeats, full batches only
    again = torch.cat(list(batch_indices(50, 8, seed=1, epoch=0)))
    other = torch.cat(list(batch_indices(50, 8, seed=1, epoch=1)))
    assert torch.equal(flat, again) and not torch.equal(flat, other)
    # DDP: the ranks share out each global batch
    for i, b in enumerate(batches):
        shards = [list(batch_indices(50, 8, 1, 0, rank=r, world=2))[i] for r in range(2)]
        assert sorted(torch.cat(shards).tolist()) == sorted(b.tolist())
    # balanced sampler: with replacement, following the weights
    w = np.zeros(50)
    w[:5] = 0.2
    sampled = torch.cat(list(batch_indices(50, 10, 0, 0, weights=w)))
    assert sampled.max() < 5


def test_make_optimizer_groups():
    model = build_model("ferkit_small", width=0.25)
    opt = make_optimizer(model, _cfg(optimizer="sgd", weight_decay=0.01, lr=0.1))
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"]
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert isinstance(make_optimizer(model, _cfg(optimizer="adamw")), torch.optim.AdamW)
    plain = make_optimizer(model, _cfg(momentum=0.0))  # config allows it; Nesterov without momentum raised
    assert plain.defaults["nesterov"] is False and make_optimizer(model, _cfg()).defaults["nesterov"] is True
    cfg = _cfg()
    cfg.optimizer = "lion"
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer(model, cfg)


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    cpu = torch.device("cpu")
    assert amp_dtype(_cfg(amp="bf16"), cpu) == torch.bfloat16  # on a CPU only when asked for
    assert amp_dtype(_cfg(amp="auto"), cpu) is None and amp_dtype(_cfg(amp="none"), cpu) is None
    with pytest.raises(ValueError, match="fp16 autocast needs CUDA"):
        amp_dtype(_cfg(amp="fp16"), cpu)


def test_bf16_on_a_cpu_without_it_warns(monkeypatch, caplog):
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False)
    with caplog.at_level("WARNING", logger="ferkit.train"):
        assert amp_dtype(_cfg(amp="bf16"), torch.device("cpu")) == torch.bfloat16
    assert "no native bfloat16" in caplog.text


def test_resolve_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match=r"^device 'gpu': not a device \(auto, cpu, cuda or cuda:N\)$"):
        resolve_device("gpu")  # torch's error listed its thirty-odd device types


def test_bf16_autocast_on_cpu(tmp_path, synthetic_cache):
    """--amp bf16 on a CPU computes in bfloat16 (the weights move differently from float32's) while the
    weights and checkpoints stay float32."""
    fp32 = train(tiny_config(synthetic_cache, tmp_path / "fp32", epochs=1))
    bf16 = train(tiny_config(synthetic_cache, tmp_path / "bf16", epochs=1, amp="bf16"))
    a = load_checkpoint(tmp_path / "fp32" / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "bf16" / "last.pt")["state_dict"]
    assert {v.dtype for v in b.values() if v.is_floating_point()} == {torch.float32}
    diff = max((b[k].float() - a[k].float()).abs().max().item() for k in a)
    assert 0 < diff < 0.1
    loss32, loss16 = fp32["history"][-1]["train_loss"], bf16["history"][-1]["train_loss"]
    assert math.isfinite(loss16) and loss16 == pytest.approx(loss32, rel=0.05)


def test_config_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nmodel_kwargs: {width: 0.5}\n")
    cfg = TrainConfig.from_yaml(path, lr=0.2)
    assert (cfg.epochs, cfg.model_kwargs, cfg.lr) == (3, {"width": 0.5}, 0.2)
    assert TrainConfig().model_kwargs is not TrainConfig().model_kwargs  # no shared mutable default
    with pytest.raises(ValueError, match="out: empty; name the run's folder"):  # it was the working folder
        TrainConfig(out=" ")
    path.write_text("epochs: 3\nepoch: 4\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: unknown config field(s) epoch (did you mean 'epochs'?)")):
        TrainConfig.from_yaml(path)
    path.write_text("epoch: 3\naaa: 1\nlrr: 2\n")  # a guess for each, said beside it
    with pytest.raises(
        ValueError, match=re.escape("field(s) aaa, epoch (did you mean 'epochs'?), lrr (did you mean 'lr'?)")
    ):
        TrainConfig.from_yaml(path)
    path.write_text("zzz: 4\n")  # nothing like it: no guess
    with pytest.raises(ValueError, match=re.escape(f"{path}: unknown config field(s) zzz") + "$"):
        TrainConfig.from_yaml(path)
    for missing, problem in (
        (tmp_path / "none.yaml", "config file not found"),
        (tmp_path, "is a folder, not a config file"),
    ):
        with pytest.raises(ValueError, match=re.escape(f"{missing}: {problem}")):  # was [Errno 2] ...
            TrainConfig.from_yaml(missing)
    path.write_text("- 1\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        TrainConfig.from_yaml(path)
    cfg = TrainConfig(epochs=7, model_kwargs={"width": 0.5}, teacher=["a.pt"], lr=0.02)
    assert TrainConfig.from_yaml(cfg.to_yaml(path)) == cfg
    # a key given twice was read as its last value; a teacher of 1 and a device "gpu" failed deep inside
    path.write_text("lr: 0.05\nepochs: 30\nlr: 0.5\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: not valid YAML ('lr' given twice")):
        TrainConfig.from_yaml(path)
    path.write_text("model_kwargs: {<<: [{width: 0.5}, {dropout: 0.2}], width: 0.25}\n")  # YAML's merge keys
    assert TrainConfig.from_yaml(path).model_kwargs == {"width": 0.25, "dropout": 0.2}
    with pytest.raises(ValueError, match=re.escape("teacher: expected a list of file names, got [1]")):
        TrainConfig(teacher=[1])
    with pytest.raises(ValueError, match="device: 'gpu' is not auto, cpu, cuda or cuda:N"):
        TrainConfig(device="gpu")
    assert TrainConfig(device="cuda:1").device == "cuda:1"


# ---------------------------------------------------------------- checkpoints and atomic writes


def _small_state() -> dict:
    model = build_model("ferkit_small", width=0.25)
    return {
        "model": "ferkit_small",
        "model_kwargs": {"width": 0.25},
        "classes": list(CLASSES),
        "state_dict": model.state_dict(),
    }


def test_checkpoint_round_trip(tmp_path):
    state = _small_state()
    path = save_checkpoint(tmp_path / "ck" / "a.pt", state)
    back = load_checkpoint(path)
    assert back["format"] == "ferkit-checkpoint/1" and back["model_kwargs"] == {"width": 0.25}
    _assert_same_weights(back["state_dict"], state["state_dict"])
    assert [p.name for p in path.parent.iterdir()] == ["a.pt"]


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "foreign", "missing"])
def test_load_checkpoint_errors_name_the_file(tmp_path, kind):
    path = tmp_path / "model.pt"
    if kind == "truncated":
        save_checkpoint(path, _small_state())
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "garbage":
        path.write_bytes(b"\x80\x02garbage" * 50)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign":
        torch.save({"state_dict": {}}, path)  # a torch file, but not a ferkit checkpoint
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_checkpoint(path)


class _RunsCode:
    """An object that runs code when unpickled: a checkpoint that holds one must be refused, not run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_load_checkpoint_runs_no_code_from_the_file(tmp_path):
    marker, path = tmp_path / "marker.txt", tmp_path / "evil.pt"
    torch.save({"format": "ferkit-checkpoint/1", **_small_state(), "extra": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert not marker.exists()
    # one line, without torch's advice to load it with weights_only=False (which would run its code)
    assert str(e.value) == f"{path}: not a ferkit checkpoint (it holds Python objects, left unread)"


def test_a_damaged_checkpoint_is_refused_not_used(tmp_path, capsys):
    """Bytes overwritten inside a checkpoint (a bad disk, a broken copy) were read as weights without a word:
    torch.load does not check the zip's CRC-32s. Every command that reads it refuses it now."""
    path = save_checkpoint(tmp_path / "best.pt", {**_small_state(), "config": {}, "metrics": {}})
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 2000] = bytes(2000)
    path.write_bytes(data)
    damaged = re.escape(f"{path}: a damaged ferkit checkpoint (") + r"archive/data/\d+ fails its checksum\)"
    with pytest.raises(CheckpointError, match=damaged):
        load_checkpoint(path)
    assert load_checkpoint(path, mmap=True)["model"] == "ferkit_small"  # its config alone is still read
    torch.serialization.set_crc32_options(False)  # a file that records no CRC-32s (0) is read as before
    try:
        unchecked = save_checkpoint(tmp_path / "nocrc.pt", _small_state())
    finally:
        torch.serialization.set_crc32_options(True)
    assert load_checkpoint(unchecked)["model"] == "ferkit_small"
    assert main(["export", str(path), "-o", str(tmp_path / "m.onnx")]) == 2
    assert re.search(damaged, capsys.readouterr().err) and not (tmp_path / "m.onnx").exists()


def test_load_checkpoint_of_an_onnx_file_says_so(tmp_path):
    from ferkit.inference import DEFAULT_MODEL

    with pytest.raises(CheckpointError, match=re.escape(f"{DEFAULT_MODEL}: an ONNX model; this takes a .pt")):
        load_checkpoint(DEFAULT_MODEL)
    (tmp_path / "cut.pt").write_bytes(save_checkpoint(tmp_path / "a.pt", _small_state()).read_bytes()[:1000])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "cut.pt")
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'cut.pt'}: not a readable ferkit checkpoint (") and "\n" not in message
    # torch's own words for these were "mmap can only be used with files saved with ..." and "pop from empty list"
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "fer2013.csv").write_text("emotion,pixels,Usage\n0,1 2 3,Training\n")
    for path, what in (("empty.pt", "an empty file"), ("fer2013.csv", "not the zip file torch.save writes")):
        for mmap in (False, True):
            with pytest.raises(CheckpointError, match=re.escape(f"{path}: not a readable ferkit checkpoint ({what})")):
                load_checkpoint(tmp_path / path, mmap=mmap)


def test_a_config_file_that_is_not_text_is_named(tmp_path):
    (tmp_path / "c.yaml").write_bytes(b"epochs: 3\n\xff\xfe\n")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'c.yaml'}: not a UTF-8 text file, so not a YAML")):
        TrainConfig.from_yaml(tmp_path / "c.yaml")


def test_model_from_checkpoint_mismatch(tmp_path):
    state = _small_state()
    state["model_kwargs"] = {"width": 0.5}
    path = save_checkpoint(tmp_path / "a.pt", state)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*do not fit"):
        model_from_checkpoint(path)


def test_model_from_checkpoint_prefers_ema(tmp_path):
    state = _small_state()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in state["state_dict"].items()}
    path = save_checkpoint(tmp_path / "a.pt", {**state, "ema_state_dict": ema})
    model, _ = model_from_checkpoint(path)
    assert torch.equal(model.state_dict()["head.3.weight"], ema["head.3.weight"])
    model, _ = model_from_checkpoint(path, ema=False)
    assert torch.equal(model.state_dict()["head.3.weight"], state["state_dict"]["head.3.weight"])


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_interrupted_atomic_write_keeps_old_file(tmp_path, error):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old content")

    def write(f):
        f.write(b"partial new cont")
        raise error

    with pytest.raises(type(error)):
        atomic_write(target, write)
    assert target.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]
    atomic_write(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_interrupted_checkpoint_save_keeps_old_checkpoint(tmp_path, monkeypatch):
    old = _small_state()
    path = save_checkpoint(tmp_path / "last.pt", old)
    before = path.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        f.truncate(f.tell() // 2)  # half written ...
        raise OSError("no space left on device")  # ... then the disk fills up

    monkeypatch.setattr(torch, "save", failing_save)
    new = _small_state()
    with pytest.raises(OSError, match="no space"):
        save_checkpoint(path, new)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    _assert_same_weights(load_checkpoint(path)["state_dict"], old["state_dict"])
    assert math.isfinite(float(load_checkpoint(path)["state_dict"]["head.3.bias"].sum()))


@pytest.mark.parametrize("half", [False, True])
def test_slim_checkpoint_keeps_the_ema_weights(tmp_path, half):
    state = _small_state()
    ema = build_model("ferkit_small", width=0.25)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(1.1)
    state["ema_state_dict"] = ema.state_dict()
    state["optimizer"] = {"state": {i: torch.zeros(1000) for i in range(20)}}
    full = save_checkpoint(tmp_path / "full.pt", state)
    slim = slim_checkpoint(full, tmp_path / "slim.pt", half=half)
    assert slim.stat().st_size < full.stat().st_size / (3 if half else 1.5)
    back = load_checkpoint(slim)
    assert back["ema_state_dict"] is None and "optimizer" not in back
    x = torch.rand(4, 1, 48, 48)
    want = model_from_checkpoint(full)[0](x)
    got = model_from_checkpoint(slim)[0](x)
    assert torch.allclose(got, want, rtol=1e-2 if half else 1e-5, atol=1e-3 if half else 1e-6)
    assert not torch.allclose(got, model_from_checkpoint(full, ema=False)[0](x), atol=1e-3)


def test_slim_refuses_to_overwrite_its_checkpoint(tmp_path):
    """`slim runs/x/last.pt -o runs/x/last.pt` dropped the optimiser state that --resume needs."""
    last = save_checkpoint(tmp_path / "last.pt", {**_small_state(), "optimizer": {"state": {}}})
    before = last.read_bytes()
    with pytest.raises(ValueError, match="that is the checkpoint itself"):
        slim_checkpoint(last, tmp_path / "." / "last.pt")
    assert last.read_bytes() == before
    with pytest.raises(ValueError, match=r"model\.onnx: name the output \*\.pt"):  # a checkpoint under an ONNX name
        slim_checkpoint(last, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()
    best = save_checkpoint(tmp_path / "best.pt", _small_state())
    with pytest.raises(ValueError, match=r"last\.pt: a run's checkpoint to resume from"):  # from another file too
        slim_checkpoint(best, last)
    assert last.read_bytes() == before
    assert slim_checkpoint(last, best) == best  # a checkpoint without optimiser state may be replaced


def test_cli_slim(tmp_path, capsys):
    from ferkit.cli import main

    full = save_checkpoint(tmp_path / "full.pt", _small_state())
    assert main(["slim", str(full), "-o", str(tmp_path / "s.pt"), "--half"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "s.pt")["state_dict"]["head.3.weight"].dtype == torch.float16


def test_ema_update_warms_up_then_uses_its_decay():
    step = 0
    update = training.ema_update(0.99, lambda: step)
    ema, new = [torch.zeros(3)], [torch.ones(3)]
    update(ema, new, torch.tensor(1))  # step 0: decay 0.1, the average mostly takes the new weights
    assert torch.allclose(ema[0], torch.full((3,), 0.9))
    step = 10_000
    update(ema, new, torch.tensor(2))  # warm-up over: decay 0.99
    assert torch.allclose(ema[0], torch.full((3,), 0.9 + 0.1 * 0.01))
    counts = [torch.tensor(5)]
    update(counts, [torch.tensor(7)], torch.tensor(3))
    assert counts[0].item() == 7


# ---------------------------------------------------------------- loss


def test_weighted_smoothed_cross_entropy():
    torch.manual_seed(0)
    logits, labels = torch.randn(32, 7), torch.randint(0, 7, (32,))
    w = torch.rand(7) + 0.5
    ce = training.WeightedSmoothedCE
    # without weights, or without smoothing, it is torch's cross-entropy; the weights' scale does not matter
    assert torch.allclose(ce(None, 0.1)(logits, labels), nn.CrossEntropyLoss(label_smoothing=0.1)(logits, labels))
    assert torch.allclose(ce(w, 0.0)(logits, labels), nn.CrossEntropyLoss(weight=w)(logits, labels))
    assert torch.allclose(ce(w, 0.1)(logits, labels), ce(3 * w, 0.1)(logits, labels))
    # with both, every image's best prediction is its smoothed label: uniform over the classes whatever
    # their weights (torch's weighted smoothing would pull it towards the heavily weighted classes)
    best = torch.full((32, 7), 0.1 / 7)
    best[torch.arange(32), labels] += 0.9
    x = best.log().requires_grad_()
    ce(w, 0.1)(x, labels).backward()
    assert x.grad.abs().max() < 1e-6
    x = best.log().requires_grad_()
    nn.CrossEntropyLoss(weight=w, label_smoothing=0.1)(x, labels).backward()
    assert x.grad.abs().max() > 1e-3


# ---------------------------------------------------------------- distillation


def test_distill_loss_is_hinton_s_t_squared_kl_per_image():
    g = torch.Generator().manual_seed(0)
    logits, t = torch.randn(3, 7, generator=g) * 3, 4.0
    target = torch.softmax(torch.randn(3, 7, generator=g), 1)
    want = t**2 * (target * (target.log() - torch.log_softmax(logits / t, 1))).sum(1).mean()
    assert distill.distill_loss(logits, target, t).item() == pytest.approx(want.item(), rel=1e-5)


def test_distill_loss_is_zero_only_when_student_matches_teachers():
    torch.manual_seed(0)
    teacher = build_model("ferkit_small", width=0.25).eval()
    x = torch.rand(4, 1, 48, 48)
    target = distill.teacher_probs([teacher, teacher], x, temperature=4.0)
    assert torch.allclose(target.sum(1), torch.ones(4))
    assert distill.distill_loss(teacher(x), target, 4.0).item() == pytest.approx(0.0, abs=1e-5)
    assert distill.distill_loss(torch.zeros(4, 7), target, 4.0).item() > 0


def test_distillation_with_cached_targets(tmp_path, synthetic_cache, trained_run, monkeypatch):
    """The cached targets are the teachers' flip-averaged softened probabilities for each training image,
    computed once: a resumed run reuses them, and a run with another temperature recomputes them."""
    calls = []
    real, real_modes = training.predict_proba, distill.predict_proba_modes

    def counted(*a, **k):  # the PublicTest checks
        calls.append(k.get("tta", "none"))
        return real(*a, **k)

    def counted_modes(*a, **k):  # the teachers' targets
        calls.append("+".join(k["modes"]))
        return real_modes(*a, **k)

    monkeypatch.setattr(training, "predict_proba", counted)
    monkeypatch.setattr(distill, "predict_proba_modes", counted_modes)
    teacher = str(trained_run / "best.pt")
    cfg = dict(epochs=1, teacher=[teacher, teacher], distill_alpha=0.5, distill_cache=True)
    out = tmp_path / "student"
    train(tiny_config(synthetic_cache, out, **cfg))
    with np.load(out / "teacher_probs.npz") as f:
        probs, key = f["probs"], list(f["key"])
    assert [k.split(" sha256=")[0] for k in key[:3]] == [teacher, teacher, "T=4.0"] and key[3].startswith("n=64 ")
    assert probs.shape == (64, 7) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert calls == ["flip", "flip", "none"]  # each teacher once, then the epoch's PublicTest check

    calls.clear()
    train(tiny_config(synthetic_cache, out, **{**cfg, "epochs": 2}), resume=True)
    assert calls == ["none"]  # only the second epoch's PublicTest check
    train(tiny_config(synthetic_cache, tmp_path / "other", **{**cfg, "distill_temperature": 2.0}))
    with np.load(tmp_path / "other" / "teacher_probs.npz") as f:
        assert not np.allclose(f["probs"], probs)


def test_distill_cache_notices_a_retrained_teacher(tmp_path, synthetic_cache, trained_run):
    """A teacher checkpoint replaced at the same path (e.g. retrained) makes the cached targets stale."""
    teacher = tmp_path / "teacher.pt"
    ck = load_checkpoint(trained_run / "best.pt")
    save_checkpoint(teacher, ck)
    cfg = dict(epochs=1, teacher=[str(teacher)], distill_cache=True)
    out = tmp_path / "student"
    train(tiny_config(synthetic_cache, out, **cfg))
    with np.load(out / "teacher_probs.npz") as f:
        first = f["probs"]
    ck["ema_state_dict"] = None
    ck["state_dict"] = {k: v * 1.5 if v.is_floating_point() else v for k, v in ck["state_dict"].items()}
    save_checkpoint(teacher, ck)
    train(tiny_config(synthetic_cache, out, **{**cfg, "epochs": 2}), resume=True)
    with np.load(out / "teacher_probs.npz") as f:
        assert not np.allclose(f["probs"], first)
    # said in the log, with or without the cache (a resume took other teachers without a word)
    assert "the --teacher files changed since this run last started" in (out / "train.log").read_text()


def test_a_damaged_targets_cache_is_computed_again(tmp_path, synthetic_cache, trained_run):
    """A run's own teacher_probs.npz, cut short (a copy interrupted), failed its resume with a BadZipFile."""
    cfg = dict(epochs=1, teacher=[str(trained_run / "best.pt")], distill_cache=True)
    out = tmp_path / "student"
    train(tiny_config(synthetic_cache, out, **cfg))
    with np.load(out / "teacher_probs.npz") as f:
        first = f["probs"]
    (out / "teacher_probs.npz").write_bytes((out / "teacher_probs.npz").read_bytes()[:1000])
    train(tiny_config(synthetic_cache, out, **{**cfg, "epochs": 2}), resume=True)
    with np.load(out / "teacher_probs.npz") as f:
        np.testing.assert_array_equal(f["probs"], first)


def test_an_exported_model_teaches_like_its_checkpoint(tmp_path, synthetic_cache, trained_run):
    """An .onnx teacher (e.g. the shipped model, on a machine without the teachers' checkpoints) gives the
    targets its checkpoint gives: ONNX models end in a softmax, which the temperature must see through."""
    from ferkit.evaluate import load_for_evaluation
    from ferkit.export import export_onnx

    pt = str(trained_run / "best.pt")
    onnx = str(export_onnx(pt, tmp_path / "teacher.onnx"))
    probs = {}
    for name, teacher in (("pt", pt), ("onnx", onnx)):
        train(tiny_config(synthetic_cache, tmp_path / name, epochs=1, teacher=[teacher], distill_cache=True))
        with np.load(tmp_path / name / "teacher_probs.npz") as f:
            probs[name] = f["probs"]
    assert probs["pt"].max(1).mean() < 0.9  # softened: T=4 flattens the teacher's probabilities
    np.testing.assert_allclose(probs["onnx"], probs["pt"], atol=1e-5)
    x = torch.rand(4, 1, 48, 48)  # the per-batch path as well
    per_batch = [distill.teacher_probs([load_for_evaluation(t)[0]], x, 4.0) for t in (pt, onnx)]
    torch.testing.assert_close(per_batch[1], per_batch[0], atol=1e-5, rtol=0)


def test_distill_cache_notices_other_images_of_the_same_count(tmp_path, synthetic_cache, trained_run):
    teacher = str(trained_run / "best.pt")
    out = tmp_path / "student"
    train(tiny_config(synthetic_cache, out, epochs=1, teacher=[teacher], distill_cache=True))
    with np.load(out / "teacher_probs.npz") as f:
        first = f["probs"]
    data = load_cache(synthetic_cache)
    data.images[:] = 255 - data.images  # other images, as many
    save_cache(data, tmp_path / "other.npz")
    for name in ("last.pt", "best.pt"):  # a new run in the same folder
        (out / name).unlink()
    train(tiny_config(tmp_path / "other.npz", out, epochs=1, teacher=[teacher], distill_cache=True))
    with np.load(out / "teacher_probs.npz") as f:
        assert not np.allclose(f["probs"], first)


def test_computing_the_targets_leaves_the_teachers_in_eval_mode(tmp_path, synthetic_cache, trained_run):
    from ferkit.checkpoint import model_from_checkpoint

    teacher = model_from_checkpoint(trained_run / "best.pt")[0]
    cfg = tiny_config(synthetic_cache, tmp_path / "x", teacher=[str(trained_run / "best.pt")])
    images = np.zeros((4, 48, 48), np.uint8)
    distill.cached_teacher_probs(cfg, [teacher], images, torch.device("cpu"), tmp_path / "t.npz")
    assert not any(m.training for m in teacher.modules())


def test_the_balanced_sampler_replaces_the_class_weights():
    labels = np.repeat(np.arange(7), [50, 5, 50, 90, 60, 40, 60])
    assert training.make_criterion(_cfg(), labels, torch.device("cpu")).weight is not None
    assert training.make_criterion(_cfg(sampler="balanced"), labels, torch.device("cpu")).weight is None


def test_a_targets_file_teaches_as_its_teachers_did(tmp_path, synthetic_cache, trained_run):
    """Teachers too big to carry to a machine teach through the teacher_probs.npz a distill_cache run wrote:
    a run given that file alone trains exactly as one given the teachers."""
    teacher = str(trained_run / "best.pt")
    train(tiny_config(synthetic_cache, tmp_path / "teachers", epochs=1, teacher=[teacher], distill_cache=True))
    targets = str(tmp_path / "teachers" / "teacher_probs.npz")
    train(tiny_config(synthetic_cache, tmp_path / "file", epochs=1, teacher=[targets]))
    a, b = (load_checkpoint(tmp_path / run / "last.pt")["state_dict"] for run in ("teachers", "file"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "file" / "teacher_probs.npz").exists()
    assert f"distillation targets: {targets}" in (tmp_path / "file" / "train.log").read_text()
    upper = tmp_path / "TARGETS.NPZ"  # read as a targets file too (it was loaded as a checkpoint, and failed)
    upper.write_bytes(Path(targets).read_bytes())
    train(tiny_config(synthetic_cache, tmp_path / "upper", epochs=1, teacher=[str(upper)]))
    b = load_checkpoint(tmp_path / "upper" / "last.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_distillation_options_that_would_do_nothing_or_mislead_are_refused(tmp_path, synthetic_cache):
    """--distill-cache without a teacher was ignored; a corrupt teacher file was told to be trained or exported."""
    with pytest.raises(ValueError, match="distill_cache keeps the targets of --teacher models"):
        train(tiny_config(synthetic_cache, tmp_path / "none", distill_cache=True))
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="distillation teacher: ") as refused:
        train(tiny_config(synthetic_cache, tmp_path / "broken", teacher=[str(broken)]))
    assert "train or export it first" not in str(refused.value)


def test_a_targets_file_must_fit_the_run(tmp_path, synthetic_cache, trained_run):
    teacher = str(trained_run / "best.pt")
    train(tiny_config(synthetic_cache, tmp_path / "teachers", epochs=1, teacher=[teacher], distill_cache=True))
    targets = str(tmp_path / "teachers" / "teacher_probs.npz")
    data = load_cache(synthetic_cache)
    data.images[:] = 255 - data.images
    save_cache(data, tmp_path / "other.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    (tmp_path / "cut.npz").write_bytes(Path(targets).read_bytes()[:1000])  # a BadZipFile traceback
    (tmp_path / "empty.npz").write_bytes(b"")  # an EOFError traceback
    np.savez(tmp_path / "nokey.npz", probs=np.zeros((64, 7)))
    bad, cut, empty, nokey, none = (str(tmp_path / f"{n}.npz") for n in ("bad", "cut", "empty", "nokey", "none"))
    refusals = {
        "computed at T=4.0, this run's distill_temperature is 2.0": dict(distill_temperature=2.0),
        "computed on other training images (n=64 sha256=": dict(data=tmp_path / "other.npz"),
        "teaches alone, without other teachers": dict(teacher=[targets, teacher]),
        "cannot teach mixed images": dict(mixup=0.2),
        f"--teacher {none}: no such file": dict(teacher=[none]),
        f"distillation targets {bad}: not a teacher_probs.npz": dict(teacher=[bad]),
        f"distillation targets {nokey}: not a teacher_probs.npz": dict(teacher=[nokey]),
        f"distillation targets {cut}: not a teacher_probs.npz of a run (File is not a zip": dict(teacher=[cut]),
        f"distillation targets {empty}: not a teacher_probs.npz of a run (No data left": dict(teacher=[empty]),
    }
    for i, (message, change) in enumerate(refusals.items()):
        data = change.pop("data", synthetic_cache)
        with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
            train(tiny_config(data, tmp_path / f"run{i}", **{"teacher": [targets], "epochs": 1, **change}))


def test_distill_cache_refuses_mixed_images(tmp_path, synthetic_cache, trained_run):
    teacher = str(trained_run / "best.pt")
    with pytest.raises(ValueError, match="mixup/cutmix"):
        train(tiny_config(synthetic_cache, tmp_path / "x", teacher=[teacher], distill_cache=True, mixup=0.2))


# ---------------------------------------------------------------- SAM


def test_sam_perturb_moves_the_weights_by_rho_along_the_gradient():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1, bias=False))
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    moves = training.sam_perturb(params, 0.05)
    g_norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
    for p, b, g in zip(params, before, grads, strict=True):
        assert torch.allclose(p.detach() - b, 0.05 * g / g_norm, atol=1e-7)
    assert math.sqrt(sum(float(((p.detach() - b) ** 2).sum()) for p, b in zip(params, before, strict=True))) == (
        pytest.approx(0.05, rel=1e-5)
    )
    training.sam_restore(params, moves)
    for p, b in zip(params, before, strict=True):
        assert torch.allclose(p.detach(), b, atol=1e-7)


def test_sam_refuses_fp16_loss_scaling(monkeypatch):
    """SAM's second backward pass is not loss-scaled: with fp16 its gradients would be divided by the scale.
    Refused whether fp16 is asked for or is what ``auto`` means on a GPU without bf16 (such as a V100 or T4, which
    torch says support bf16 unless asked about native support: ``auto`` trained them in emulated bf16)."""
    cuda = torch.device("cuda")  # checked without a GPU: only the dtype the options resolve to matters
    for bf16, amp, refused in [
        (True, "fp16", True),
        (False, "auto", True),
        (True, "auto", False),
        (False, "none", False),
    ]:
        monkeypatch.setattr(
            torch.cuda, "is_bf16_supported", lambda including_emulation=True, bf16=bf16: bf16 or including_emulation
        )
        cfg = TrainConfig(sam_rho=0.05, amp=amp)
        if refused:
            with pytest.raises(ValueError, match="SAM .* fp16 loss scaling"):
                training._check_config(cfg, 1, cuda)
        else:
            training._check_config(cfg, 1, cuda)
    training._check_config(TrainConfig(sam_rho=0.0, amp="auto"), 1, cuda)  # fp16 without SAM is fine
    assert training.amp_dtype(TrainConfig(amp="auto"), cuda) == torch.float16  # the last stub: no native bf16


def test_sam_with_emulated_bf16_warns_once(monkeypatch, tmp_path, synthetic_cache):
    """On a CPU without native bf16 the slow-emulation warning is logged once, not again by the SAM check."""
    warnings: list[str] = []
    monkeypatch.setattr(training, "_cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(training.log, "warning", lambda msg, *args, **kw: warnings.append(msg % args))
    training.train(tiny_config(synthetic_cache, tmp_path / "run", sam_rho=0.05, amp="bf16", epochs=1))
    assert sum("no native bfloat16" in w for w in warnings) == 1


def test_fp16_on_a_cpu_is_refused_before_the_data_loads(tmp_path):
    """--amp fp16 on a CPU fails at once with the reason, not after the data set has been read."""
    cfg = TrainConfig(amp="fp16", device="cpu", data=str(tmp_path / "absent.npz"), out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="fp16 autocast needs CUDA"):
        training.train(cfg)


def test_ctrl_c_while_a_checkpoint_is_written_is_an_interrupt(tmp_path):
    """torch's zip writer raised again while a Ctrl-C unwound it ('unexpected pos'): the run ended as an error
    (exit 2, a cryptic message) instead of as interrupted (130); nothing of the file is left."""
    from ferkit.fileio import atomic_write

    def write(f):
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "last.pt", write)
    assert list(tmp_path.iterdir()) == []


def test_a_new_start_clears_what_a_killed_write_left(tmp_path, synthetic_cache):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".last.pt.0123456789abcdef.tmp").write_bytes(b"half a checkpoint")
    train(tiny_config(synthetic_cache, out, epochs=1))
    assert not list(out.glob(".*.tmp"))


def test_sync_bn_on_cpu_processes_is_refused_before_any_data_loads():
    with pytest.raises(ValueError, match="sync_bn synchronises BatchNorm across CUDA processes only"):
        training._check_config(_cfg(sync_bn=True), 2, torch.device("cpu"))
    training._check_config(_cfg(sync_bn=True), 1, torch.device("cpu"))  # one process: nothing to synchronise


def test_a_cpu_run_resumes_where_fp16_needs_a_loss_scaler(tmp_path, synthetic_cache, monkeypatch):
    """A CPU run keeps an empty loss-scaler state; resumed on a GPU without bf16 (fp16, with a scaler) its
    loading failed ("The source state dict is empty")."""
    import ferkit.training

    out = tmp_path / "run"
    train(tiny_config(synthetic_cache, out, epochs=1))
    assert load_checkpoint(out / "last.pt")["scaler"] == {}
    monkeypatch.setattr(ferkit.training, "amp_dtype", lambda cfg, device: torch.float16)  # as on a T4
    assert train(tiny_config(synthetic_cache, out, epochs=2), resume=True)["epoch"] == 2


def test_every_process_takes_its_own_gpu(monkeypatch):
    """Under torchrun, --device cuda put every process on GPU 0 (only auto used LOCAL_RANK); cuda:N on N."""
    from ferkit.training import _check_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [resolve_device(d, 3) for d in ("auto", "cuda", "cuda:1")] == [torch.device(f"cuda:{i}") for i in (3, 3, 1)]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU visible to each process
    assert resolve_device("cuda", 3) == torch.device("cuda:0")
    _check_config(_cfg(device="cuda", amp="none"), 4, torch.device("cuda:3"))
    with pytest.raises(ValueError, match="device cuda:1: every process would use that one GPU"):
        _check_config(_cfg(device="cuda:1", amp="none"), 4, torch.device("cuda:1"))
    _check_config(_cfg(device="cuda:1", amp="none"), 1, torch.device("cuda:1"))  # one process: its choice


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_its_committed_teachers_exist(path):
    """configs/small_distill_cpu.yaml named the previous shipped model after it moved out of the package. Teachers
    under runs/ come from a training run of the README's; any other must be a file of this checkout."""
    config = TrainConfig.from_yaml(path)
    root = Path(__file__).parents[1]
    for teacher in config.teacher:
        assert teacher.startswith("runs/") or (root / teacher).is_file(), teacher


def test_a_step_fp16_loss_scaling_skips_moves_neither_schedule_nor_ema(synthetic_cache, tmp_path):
    """An overflowing fp16 step (the first few of a run, as the scale settles) left the weights alone but still
    advanced the LR schedule, the EMA and the step count, and torch warned of the schedule stepping first."""
    cfg = tiny_config(synthetic_cache, tmp_path, ema=0.9)
    run = training._Run(cfg, torch.device("cpu"), 1, np.arange(7).repeat(4), steps_per_epoch=4)
    run.scaler = torch.amp.GradScaler("cpu")  # as a CUDA fp16 run's (a CPU refuses fp16 autocast)
    before = [p.detach().clone() for p in run.model.parameters()]
    y = torch.arange(7)
    x = torch.rand(7, 1, 48, 48)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Detected call of `lr_scheduler.step()` before `optimizer.step()`"
        run.step(x.clone().fill_(float("nan")), y, y, 1.0, None)
    assert all(torch.equal(a, b) for a, b in zip(before, run.model.parameters(), strict=True))
    assert run.state["step"] == 0 and run.scheduler.last_epoch == 0 and int(run.ema.n_averaged) == 0
    run.step(x, y, y, 1.0, None)  # a finite one steps all of them
    assert run.state["step"] == 1 and run.scheduler.last_epoch == 1 and int(run.ema.n_averaged) == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, run.model.parameters(), strict=True))


def test_training_accuracy_of_mixed_images_counts_both_labels_by_their_share():
    logits = torch.eye(7)[[0, 1, 2, 3]]  # predicts 0, 1, 2, 3
    ya, yb = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 1, 5, 3])
    assert float(training.mixed_correct(logits, ya, yb, 1.0)) == 4
    assert float(training.mixed_correct(logits, ya, yb, 0.7)) == pytest.approx(0.7 * 4 + 0.3 * 2)
    assert float(training.mixed_correct(logits, yb, ya, 0.25)) == pytest.approx(0.25 * 2 + 0.75 * 4)


def test_resuming_a_run_taught_by_a_relative_path_elsewhere_says_where_to_resume(
    trained_run, synthetic_cache, tmp_path, monkeypatch
):
    """'--teacher t.pt: no such file (train or export it first, or change it)', and a changed teacher is refused."""
    import shutil

    (tmp_path / "start").mkdir()
    shutil.copy(trained_run / "best.pt", tmp_path / "start" / "t.pt")
    monkeypatch.chdir(tmp_path / "start")
    train(tiny_config(synthetic_cache, tmp_path / "run", epochs=1, teacher=["t.pt"]))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        FileNotFoundError, match=re.escape("--teacher t.pt: no such file (the run was given it relative")
    ):
        train(tiny_config(synthetic_cache, tmp_path / "run", epochs=2, teacher=["t.pt"]), resume=True)
    monkeypatch.chdir(tmp_path / "start")
    assert train(tiny_config(synthetic_cache, tmp_path / "run", epochs=2, teacher=["t.pt"]), resume=True)["epoch"] == 2
