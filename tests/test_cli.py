"""The ``ferkit`` command line, called in-process through ``cli.main``."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
from conftest import read_only_filesystem
from helpers_inference import make_checkpoint

from ferkit import cli
from ferkit.checkpoint import load_checkpoint, save_checkpoint
from ferkit.config import TrainConfig
from ferkit.data import load_cache
from ferkit.models import MODELS


def _squash(text: str) -> str:
    return "".join(text.split())


def test_train_help_lists_every_config_field(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    flat = _squash(out)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in out, flag
        assert _squash(f.metadata["help"]) in flat, f.name
        if f.type in ("bool", bool):
            assert "--no-" + f.name.replace("_", "-") in out
    for extra in ("--config", "--resume"):
        assert extra in out


def test_prepare_writes_cache(tmp_path, fer_folder, capsys):
    out = tmp_path / "fer.npz"
    assert cli.main(["prepare", str(fer_folder.root), "-o", str(out)]) == 0
    data = load_cache(out)
    assert len(data) == 49
    assert {s: sum(c.values()) for s, c in data.counts().items()} == {
        "Training": 21,
        "PublicTest": 14,
        "PrivateTest": 14,
    }
    printed = capsys.readouterr()
    assert f"wrote {out}: 49 images" in printed.out and "Training" in printed.out and "warning" not in printed.err
    assert "img/s" in printed.err or "s/img" in printed.err  # the decoding's progress bar
    assert cli.main(["prepare", str(fer_folder.root), "-o", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""  # prepare had no --no-progress
    # a folder without test/ is a cache of Training images alone: written, with a warning (it was silent)
    train_only = tmp_path / "train_only"
    shutil.copytree(fer_folder.root / "train", train_only / "train")
    assert cli.main(["prepare", str(train_only), "-o", str(tmp_path / "t.npz")]) == 0
    assert f"warning: no PublicTest or PrivateTest images in {train_only}" in capsys.readouterr().err


def test_prepare_csv(tmp_path, fer_csv):
    out = tmp_path / "fer.npz"
    assert cli.main(["prepare", str(fer_csv[0]), "-o", str(out)]) == 0
    assert len(load_cache(out)) == len(fer_csv[1])


def test_prepare_refuses_outputs_that_lose_data_or_that_nothing_reads(tmp_path, fer_csv, capsys):
    """`prepare good.csv -o good.csv` replaced the CSV by the cache; `-o x` wrote a cache no command read."""
    csv_path = fer_csv[0]
    before = csv_path.read_bytes()
    for out, message in ((csv_path, "that is the data set itself"), (tmp_path / "x", "name the cache *.npz")):
        assert cli.main(["prepare", str(csv_path), "-o", str(out)]) == 2
        assert f"ferkit prepare: error: {out}: {message}" in capsys.readouterr().err
    assert csv_path.read_bytes() == before and not (tmp_path / "x").exists()
    assert cli.main(["prepare", str(csv_path), "-o", str(tmp_path / "fer.NPZ")]) == 0


@pytest.mark.parametrize("kind", ["missing", "bad_class", "bad_csv"])
def test_prepare_bad_input_exit_2_names_path(tmp_path, capsys, kind):
    out = tmp_path / "fer.npz"
    if kind == "missing":
        src = bad = tmp_path / "no_such_folder"
    elif kind == "bad_class":
        src = tmp_path
        bad = tmp_path / "train" / "smiling"
        bad.mkdir(parents=True)
    else:
        src = bad = tmp_path / "fer2013.csv"
        src.write_text("a,b,c\n")
    assert cli.main(["prepare", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ferkit prepare: error: ")
    assert str(bad) in err
    assert not out.exists()


def test_models_lists_registry(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    for name in MODELS:
        assert name in out
    assert "timm:<arch>" in out


def test_models_describes_checkpoints(tmp_path, capsys):
    from helpers_inference import make_checkpoint

    from ferkit.models import build_model, describe

    ckpt = make_checkpoint(tmp_path / "quarter.pt")
    assert cli.main(["models", str(ckpt)]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    d = describe(build_model("ferkit_small", width=0.25))
    assert row == [str(ckpt), f"{d['params_m']:.2f}", f"{d['mflops']:.0f}", "ferkit_small", "width=0.25"]
    assert d["mflops"] < describe(build_model("ferkit_small"))["mflops"] / 4  # the checkpoint's size, not the default's
    assert cli.main(["models", str(tmp_path / "missing.pt")]) != 0
    assert "missing.pt: checkpoint not found" in capsys.readouterr().err
    assert cli.main(["models", str(tmp_path)]) != 0  # it said "checkpoint not found" of a folder
    assert f"{tmp_path}: is a folder, not a checkpoint" in capsys.readouterr().err


def test_train_then_evaluate(tmp_path, synthetic_cache, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        "--data",
        str(synthetic_cache),
        "--out",
        str(out),
        "--model-kwargs",
        "{width: 0.25}",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--train-limit",
        "32",
        "--augment",
        "none",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--no-progress",
    ]
    assert cli.main(args) == 0
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    cfg = TrainConfig.from_dict(load_checkpoint(out / "last.pt")["config"])
    assert (cfg.model_kwargs, cfg.epochs, cfg.batch_size, cfg.train_limit, cfg.progress) == (
        {"width": 0.25},
        1,
        16,
        32,
        False,
    )
    report = json.loads((out / "eval" / "PrivateTest.json").read_text())  # --evaluate is on by default
    assert report["split"] == "PrivateTest" and report["n"] == 28
    captured = capsys.readouterr()
    assert "accuracy" in captured.out and "PrivateTest 1/1" not in captured.err  # --no-progress: no bar either

    eval_out = tmp_path / "eval2"
    assert (
        cli.main(
            ["evaluate", str(out / "best.pt"), "--data", str(synthetic_cache), "--out", str(eval_out)]
            + ["--split", "PublicTest", "--tta", "none", "flip", "--device", "cpu", "--limit", "14"]
        )
        == 0
    )
    for name in ("PublicTest_limit14.json", "PublicTest_limit14_tta-flip.json"):  # a subset, named as one
        assert json.loads((eval_out / name).read_text())["n"] == 14


def test_train_zero_epochs_computes_only_the_teachers_targets(tmp_path, synthetic_cache, trained_run, capsys):
    """`--epochs 0 --distill-cache`: the targets file for another machine, no checkpoint and no evaluation
    of one (which had failed with 'best.pt: checkpoint not found' after logging a best epoch -1); a progress
    bar per teacher (minutes of silence each on a CPU)."""
    out, teacher = tmp_path / "targets", str(trained_run / "best.pt")
    args = ["train", "--data", str(synthetic_cache), "--out", str(out), "--epochs", "0", "--batch-size", "16"]
    args += ["--teacher", teacher, "--distill-cache", "--device", "cpu", "--progress"]
    assert cli.main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == [".ferkit.lock", "config.yaml", "teacher_probs.npz", "train.log"]
    err = capsys.readouterr().err
    assert "no epoch trained (epochs 0): no checkpoint" in err and f"teacher 1/1 {teacher}: 100%" in err


def test_select_ensemble_prints_the_choice_and_saves_the_ranking(
    trained_run, synthetic_cache, tmp_path, capsys, monkeypatch
):
    best, last, out = str(trained_run / "best.pt"), str(trained_run / "last.pt"), tmp_path / "select.json"
    args = ["select-ensemble", best, last, "--data", str(synthetic_cache), "--tta", "none", "flip", "--top", "4"]
    assert cli.main(args + ["--device", "cpu", "--out", str(out), "--cache", str(tmp_path / "probs")]) == 0
    assert len(list((tmp_path / "probs").glob("*.npz"))) == 2  # one entry per candidate, for later evaluations
    saved = json.loads(out.read_text())
    assert saved["split"] == "PublicTest" and saved["candidates"] == [best, last] and len(saved["ranking"]) == 4
    assert saved["limit"] == 0  # the whole split (a --limit N ranking says N)
    winner = saved["ranking"][0]
    printed = capsys.readouterr().out
    assert f"ferkit evaluate {' '.join(winner['checkpoints'])} --data {synthetic_cache} --split PrivateTest" in printed
    assert f"{winner['accuracy']:.4f}" in printed
    # an --out that cannot be written is refused before any model runs (it was after the ranking; a read-only
    # folder's error named the hidden temp file)
    for bad, why in ((tmp_path, "is a folder"), (out / "x.json", f"{out} is a file, not a folder")):
        assert cli.main([*args, "--device", "cpu", "--out", str(bad)]) == 2
        captured = capsys.readouterr()
        assert why in captured.err and "rank" not in captured.out
    with read_only_filesystem(monkeypatch):
        assert cli.main([*args, "--device", "cpu", "--out", str(tmp_path / "ro" / "rank.json")]) == 2
    captured = capsys.readouterr()
    assert f"Read-only file system: '{tmp_path / 'ro' / 'rank.json'}'" in captured.err and "rank" not in captured.out


def test_select_ensemble_quotes_its_command_and_refuses_a_candidate_twice(
    trained_run, synthetic_cache, tmp_path, capsys
):
    """The printed command was not shell-quoted (a path with a space broke it); one file given twice was
    ranked as two models."""
    spaced = tmp_path / "my runs" / "best model.pt"
    spaced.parent.mkdir()
    shutil.copy(trained_run / "best.pt", spaced)
    args = ["select-ensemble", str(spaced), "--data", str(synthetic_cache), "--device", "cpu", "--limit", "14"]
    assert cli.main(args) == 0
    assert (
        f"ferkit evaluate '{spaced}' --data {synthetic_cache} --split PrivateTest --tta none" in capsys.readouterr().out
    )
    assert cli.main([*args[:2], str(tmp_path / "my runs" / "." / "best model.pt"), *args[2:]]) == 2
    assert "candidate given twice (also as" in capsys.readouterr().err
    assert cli.main([*args[:2], str(trained_run / "best.pt"), *args[2:]]) == 2  # a copy: ranked, then refused
    assert "best.pt: one model in several files" in capsys.readouterr().err


def test_train_with_config_file(tmp_path, synthetic_cache):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(
        f"data: {synthetic_cache}\nout: {tmp_path / 'run'}\nmodel_kwargs: {{width: 0.25}}\nepochs: 1\n"
        "batch_size: 16\ntrain_limit: 32\ndevice: cpu\nthreads: 1\nprogress: false\n"
    )
    # a command-line option overrides the file
    assert cli.main(["train", "--config", str(cfg_file), "--epochs", "2", "--no-evaluate"]) == 0
    assert (tmp_path / "run" / "last.pt").is_file() and not (tmp_path / "run" / "eval").exists()
    assert (tmp_path / "run" / "metrics.csv").read_text().count("\n") == 3  # header + 2 epochs


def test_train_resume_of_no_run_says_so(tmp_path, capsys):
    assert cli.main(["train", "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert f"no run to resume in {tmp_path / 'nothing'} (no config.yaml or last.pt there)" in capsys.readouterr().err


def test_train_resume_reads_the_recipe_from_last_pt_without_config_yaml(tmp_path, synthetic_cache):
    """A run without its config.yaml (an older ferkit's, or one copied without it) said there was no run."""
    run = tmp_path / "run"
    args = ["train", "--data", str(synthetic_cache), "--out", str(run), "--model-kwargs", "{width: 0.25}"]
    assert cli.main([*args, "--epochs", "1", "--batch-size", "16", "--no-evaluate", "--no-progress"]) == 0
    (run / "config.yaml").unlink()
    assert cli.main(["train", "--out", str(run), "--epochs", "2", "--resume", "--no-evaluate"]) == 0
    assert (run / "metrics.csv").read_text().count("\n") == 3


def test_train_resume_takes_the_runs_own_settings(tmp_path, synthetic_cache, capsys):
    run = tmp_path / "run"
    first = ["train", "--data", str(synthetic_cache), "--out", str(run), "--model-kwargs", "{width: 0.25}"]
    first += ["--epochs", "1", "--batch-size", "16", "--train-limit", "32", "--lr", "0.01", "--augment", "none"]
    assert cli.main([*first, "--device", "cpu", "--no-progress", "--no-evaluate"]) == 0
    # no --config: the run's config.yaml; --epochs may grow
    assert cli.main(["train", "--out", str(run), "--epochs", "2", "--resume", "--no-evaluate"]) == 0
    saved = TrainConfig.from_yaml(run / "config.yaml")
    assert (saved.epochs, saved.lr, saved.augment, saved.model_kwargs) == (2, 0.01, "none", {"width": 0.25})
    assert (run / "metrics.csv").read_text().count("\n") == 3  # header + 2 epochs
    # another recipe under the same name is refused, naming what differs
    assert cli.main(["train", "--out", str(run), "--epochs", "3", "--lr", "0.05", "--resume", "--no-evaluate"]) == 2
    assert "this run was trained with other settings (lr: 0.01 -> 0.05)" in capsys.readouterr().err
    assert TrainConfig.from_yaml(run / "config.yaml").epochs == 2
    # a field this ferkit no longer has, in the run's own recipe, is dropped with a word
    last = load_checkpoint(run / "last.pt")
    save_checkpoint(run / "last.pt", {**last, "config": {**last["config"], "retired_option": 1}})
    assert cli.main(["train", "--out", str(run), "--epochs", "3", "--resume", "--no-evaluate"]) == 0
    assert f"{run}: ignoring retired_option (no longer training options)" in capsys.readouterr().err
    assert TrainConfig.from_yaml(run / "config.yaml").epochs == 3
    # the recipe is last.pt's: a config.yaml cut short (or emptied) beside it changes nothing
    (run / "config.yaml").write_text("data: elsewhere.npz\n")
    assert cli.main(["train", "--out", str(run), "--epochs", "4", "--resume", "--no-evaluate"]) == 0
    assert TrainConfig.from_yaml(run / "config.yaml").lr == 0.01
    # fewer epochs than the run has trained are refused (config.yaml said epochs: 2 of a 4-epoch run)
    assert cli.main(["train", "--out", str(run), "--epochs", "2", "--resume", "--no-evaluate"]) == 2
    assert "the run has trained 4 epochs, more than --epochs 2" in capsys.readouterr().err


def test_train_resume_keeps_the_runs_final_evaluation(tmp_path, synthetic_cache):
    """--no-evaluate and --tta are the run's settings: a resume without them once evaluated anyway."""
    run = tmp_path / "run"
    first = ["train", "--data", str(synthetic_cache), "--out", str(run), "--model-kwargs", "{width: 0.25}"]
    assert cli.main([*first, "--epochs", "1", "--batch-size", "16", "--no-progress", "--no-evaluate"]) == 0
    assert cli.main(["train", "--out", str(run), "--epochs", "2", "--resume"]) == 0
    assert not (run / "eval").exists()
    assert cli.main(["train", "--out", str(run), "--epochs", "3", "--resume", "--evaluate", "--tta", "flip"]) == 0
    assert [p.name for p in (run / "eval").glob("*.json")] == ["PrivateTest_tta-flip.json"]
    assert TrainConfig.from_yaml(run / "config.yaml").tta == "flip"


def test_train_unknown_config_field(tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("epoch: 3\n")
    assert cli.main(["train", "--config", str(cfg_file)]) == 2
    err = capsys.readouterr().err
    assert str(cfg_file) in err and "epoch" in err


def test_train_bad_data_path(tmp_path, capsys):
    missing = tmp_path / "nothing.npz"
    assert cli.main(["train", "--data", str(missing), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_train_requires_data(tmp_path, capsys):
    assert cli.main(["train", "--out", str(tmp_path / "run")]) == 2
    assert "ferkit train: error: --data is required" in capsys.readouterr().err


def test_evaluate_missing_checkpoint(tmp_path, synthetic_cache, capsys):
    missing = tmp_path / "none.pt"
    assert cli.main(["evaluate", str(missing), "--data", str(synthetic_cache), "--device", "cpu"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_bad_choice_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--schedule", "linear"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--model-kwargs", "{a: [}"], "not valid YAML"),
        (["train", "--model-kwargs", "[1, 2]"], "expected a YAML mapping"),
        (["train", "--model-kwargs", "{width:0.25}"], "has a key without a value"),
        (["select-ensemble", "a.pt", "--data", "d.npz", "--top", "0"], "must be at least 1"),
        (["select-ensemble", "a.pt", "--data", "d.npz", "--max-size", "-1"], "must be at least 0"),
        (["select-ensemble", "a.pt", "--data", "d.npz", "--limit", "-5"], "argument --limit: must be at least 0"),
        (["evaluate", "a.pt", "--data", "d.npz", "--limit", "-5"], "argument --limit: must be at least 0, got -5"),
        (["serve", "--port", "99999"], "argument --port: must be at most 65535, got 99999"),
        (["serve", "--concurrency", "0"], "argument --concurrency: must be at least 1, got 0"),
        (["serve", "--min-face", "0"], "argument --min-face: must be at least 1, got 0"),
        (["serve", "--timeout", "0"], "argument --timeout: must be positive, got 0"),
        (["serve", "--max-upload-mb", "x"], "argument --max-upload-mb: invalid number value: 'x'"),
    ],
)
def test_bad_option_values_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_bad_value_is_named_where_it_was_given(tmp_path, synthetic_cache, capsys):
    """`--config small.yaml --lr=-1` blamed the file ('small.yaml: lr: -1.0 is outside (0, inf)'), and without
    --config the prefix was 'config:'; a bad value of the file is the file's, one given over it is not refused."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lr: -1\n")
    base = ["train", "--data", str(synthetic_cache), "--out", str(tmp_path / "run"), "--device", "cpu"]
    for extra, message in [
        (["--config", str(recipe)], f"{recipe}: lr: -1.0 is outside (0, inf)"),
        (["--config", str(tmp_path / "recipe.yaml"), "--lr=-2"], "--lr: -2.0 is outside (0, inf)"),
        (["--lr=-2"], "--lr: -2.0 is outside (0, inf)"),
        (["--label-smoothing", "2"], "--label-smoothing: 2.0 is outside [0, 1)"),
        (["--threads", "99999"], "--threads: 99999 is outside [0, 1024]"),  # torch crashed (segmentation fault)
    ]:
        assert cli.main([*base, *extra]) == 2
        assert capsys.readouterr().err.endswith(f"ferkit train: error: {message}\n"), extra
    argv = [*base, "--config", str(recipe), "--lr", "0.05", "--epochs", "1", "--batch-size", "16"]
    assert cli.main([*argv, "--train-limit", "32", "--no-progress", "--no-evaluate"]) == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ("{depth: 3}", "model ferkit_small: no option 'depth'; it takes width, dropout, pre_size"),
        ("{num_classes: 3}", "--model-kwargs: num_classes cannot be set: FER-2013 has 7 classes, 1 channel"),
        ("{width: 0}", "model ferkit_small: width must be positive, got 0"),
        ("{pre_size: 0}", "model ferkit_small: pre_size must be a whole number of pixels or null, got 0"),
        ("{pre_size: '64'}", "model ferkit_small: pre_size must be a whole number of pixels or null, got '64'"),
        ("{dropout: 1.5}", "model ferkit_small: dropout probability has to be between 0 and 1, but got 1.5"),
    ],
)
def test_model_kwargs_the_model_does_not_take(tmp_path, synthetic_cache, capsys, kwargs, message):
    """num_classes was a TypeError traceback; width 0 trained a 4-channel net; pre_size 0 failed at the first
    batch, in torch's words, leaving a run folder."""
    run = tmp_path / "run"
    argv = ["train", "--data", str(synthetic_cache), "--out", str(run), "--model-kwargs", kwargs]
    argv += ["--batch-size", "16", "--device", "cpu", "--no-progress"]
    assert cli.main(argv) == 2
    assert f"ferkit train: error: {message}" in capsys.readouterr().err
    assert not run.exists()


def test_a_model_that_cannot_be_built_is_refused_before_the_data_is_read(tmp_path, capsys):
    """A misspelt model was reported once the whole data set had been decoded (14 s of FER-2013's folders)."""
    argv = ["train", "--model", "ferkit_smal", "--data", str(tmp_path / "absent.npz"), "--out", str(tmp_path / "r")]
    assert cli.main(argv) == 2
    assert "error: unknown model 'ferkit_smal' (did you mean 'ferkit_small'?)" in capsys.readouterr().err


def test_a_failed_process_of_a_torchrun_job_exits_at_once(tmp_path, monkeypatch, capsys):
    """Unwinding one rank's error could block in DDP's teardown while the others waited: the job hung."""

    class Exited(Exception):
        pass

    def exit_now(code):
        raise Exited(code)

    monkeypatch.setattr(os, "_exit", exit_now)
    argv = ["train", "--data", str(tmp_path / "absent.npz"), "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 2  # one process: returns
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr("ferkit.training._setup_distributed", lambda device: (0, 2, 0))  # as under torchrun
    with pytest.raises(Exited) as exc:
        cli.main(argv)
    assert exc.value.args == (2,) and "absent.npz: no such file or folder" in capsys.readouterr().err
    assert cli.main(["prepare", str(tmp_path / "absent"), "-o", str(tmp_path / "c.npz")]) == 2  # not training


def test_version(capsys):
    from ferkit import __version__

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out == f"ferkit {__version__}\n"


def test_the_space_entry_point_names_a_bad_model_setting(tmp_path):
    """app.py (the Hugging Face Space's entry point) ended in a traceback for a FERKIT_MODEL that is missing."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    model = str(tmp_path / "nope.onnx")
    env = {**os.environ, "FERKIT_MODEL": model}
    done = subprocess.run([sys.executable, str(root / "app.py")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"FERKIT_MODEL={model!r}: {model}: model file not found"


def test_an_output_path_that_is_a_folder_is_an_error(tmp_path, fer_csv, capsys):
    folder = tmp_path / "cache.npz"
    folder.mkdir()
    assert cli.main(["prepare", str(fer_csv[0]), "-o", str(folder)]) == 2
    assert f"ferkit prepare: error: {folder}: is a folder; give a file name to write" in capsys.readouterr().err


def test_card_keeps_its_own_name_in_errors_and_reads_reports_carefully(trained_run, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{'accuracy': 1}")
    argv = [
        "card",
        "--run",
        str(trained_run),
        "--onnx",
        "m.onnx",
        "--reports",
        str(bad),
        "--command",
        "ferkit train",
        "--hardware",
        "a CPU",
    ]
    assert cli.main(argv + ["--out", str(tmp_path / "CARD.md")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ferkit card: error:") and "bad.json: not a valid JSON file" in err
    bad.write_text("[1, 2]")
    assert cli.main(argv + ["--out", str(tmp_path / "CARD.md")]) == 2
    assert "bad.json: expected a JSON object, got list" in capsys.readouterr().err
    twice = [*argv, "--reports", str(bad), str(tmp_path / "." / "bad.json")]
    assert cli.main([*twice, "--out", str(tmp_path / "CARD.md")]) == 2
    assert "bad.json: report given twice" in capsys.readouterr().err  # its row twice in the card
    assert not (tmp_path / "CARD.md").exists()


def test_an_ensemble_or_a_sibling_does_not_overwrite_a_models_reports(trained_run, synthetic_cache, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "eval", ignore_errors=True)
    data = ["--data", str(synthetic_cache), "--device", "cpu"]
    assert cli.main(["evaluate", str(run / "best.pt"), *data]) == 0
    single = (run / "eval" / "PrivateTest.json").read_bytes()
    assert cli.main(["evaluate", str(run / "best.pt"), str(run / "last.pt"), *data]) == 0
    assert (run / "eval" / "PrivateTest.json").read_bytes() == single
    (ensemble,) = run.glob("eval_ensemble_*")
    assert json.loads((ensemble / "PrivateTest.json").read_text())["model"].startswith("ensemble(")
    # another ensemble with the same first model had the same folder (and replaced the first's report); the
    # same members in another order are the same ensemble
    other = make_checkpoint(tmp_path / "other.pt")
    assert cli.main(["evaluate", str(run / "best.pt"), str(other), *data]) == 0
    assert cli.main(["evaluate", str(run / "last.pt"), str(run / "best.pt"), *data]) == 0
    assert len(list(run.glob("eval_ensemble_*"))) == 2
    reports = {p: (p / "PrivateTest.json").read_bytes() for p in run.glob("eval_ensemble_*")}
    assert cli.main(["evaluate", str(run / "best.pt"), "--ensemble", str(other), *data]) == 0  # the README's form
    assert {p: (p / "PrivateTest.json").read_bytes() for p in run.glob("eval_ensemble_*")} == reports  # the same
    assert cli.main(["evaluate", str(run / "last.pt"), *data]) == 0  # a sibling file: a folder of its own
    assert (run / "eval" / "PrivateTest.json").read_bytes() == single
    assert (run / "eval_last_pt" / "PrivateTest.json").is_file()


def test_sigterm_unwinds_like_ctrl_c_and_leaves_no_temp_file(tmp_path):
    """`kill` during `prepare`'s write left a hidden 130 MB temp file beside the cache, never removed."""
    import signal
    import subprocess
    import sys

    script = (
        "import os, signal, sys\n"
        "import ferkit.data\n"
        "from ferkit import cli\n"
        "from ferkit.fileio import atomic_write\n"
        "def write(f):\n"
        "    f.write(b'half a cache')\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    f.write(b'never')\n"
        "ferkit.data.prepare = lambda src, out, progress: atomic_write(out, write)\n"
        "cli.main(['prepare', sys.argv[1], '-o', sys.argv[1] + '/fer.npz'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -15, proc.stderr  # ended by the signal, after unwinding
    assert list(tmp_path.iterdir()) == []
    assert "ferkit prepare: terminated" in proc.stderr
    before = signal.getsignal(signal.SIGTERM)  # a caller's own handler is back when main returns
    assert cli.main(["prepare", str(tmp_path / "nowhere")]) == 2
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_sigterm_python_drops_is_delivered_again(tmp_path):
    """Raised inside a weakref callback (where Python prints an exception and goes on), SIGTERM was lost: a
    killed evaluation ran to its end in 3 of 16 tries."""
    import subprocess
    import sys

    script = (
        "import os, signal, sys, weakref\n"
        "from ferkit import cli\n"
        "class Obj: pass\n"
        "def callback(ref):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    sum(range(10**5))  # Python code: the handler runs here, inside the callback\n"
        "def command(args):\n"
        "    obj = Obj()\n"
        "    ref = weakref.ref(obj, callback)\n"
        "    del obj\n"
        "    for _ in range(10**8): pass\n"
        "    open(sys.argv[1], 'w').close()\n"
        "    return 0\n"
        "cli.cmd_prepare = command\n"
        "cli.main(['prepare', 'src'])\n"
    )
    done = tmp_path / "ran_to_its_end"
    proc = subprocess.run([sys.executable, "-c", script, str(done)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -15, proc.stderr
    assert not done.exists()
    assert proc.stderr.endswith("ferkit prepare: terminated\n"), proc.stderr  # no "Exception ignored in"


def test_warnings_print_as_one_line():
    """A warning printed the line of ferkit's source that raised it, under the message."""
    import subprocess
    import sys

    script = (
        "import warnings\n"
        "from ferkit import cli\n"
        "def command(args):\n"
        "    warnings.warn('x.onnx: no class names in its metadata', stacklevel=2)\n"
        "    return 0\n"
        "cli.cmd_prepare = command\n"
        "raise SystemExit(cli.main(['prepare', 'src']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (0, "warning: x.onnx: no class names in its metadata\n")


def test_a_missing_train_extra_is_named(monkeypatch, capsys):
    """With only the app extra installed, `ferkit train` said "import of torch halted" and nothing more."""

    def no_torch(args):
        raise ImportError("import of torch halted", name="torch")

    monkeypatch.setattr(cli, "cmd_train", no_torch)
    assert cli.main(["train", "--data", "x.npz"]) == 2
    assert "pip install 'ferkit[train]'" in capsys.readouterr().err


def test_evaluating_the_shipped_model_writes_nothing_into_the_package(synthetic_cache, tmp_path, monkeypatch):
    """Its default report folder was beside the file: inside the installed package (site-packages)."""
    from ferkit.config import DEFAULT_MODEL, WEIGHTS_DIR

    before = sorted(WEIGHTS_DIR.iterdir())
    monkeypatch.chdir(tmp_path)
    argv = ["evaluate", str(DEFAULT_MODEL), "--data", str(synthetic_cache), "--split", "PublicTest", "--limit", "14"]
    assert cli.main([*argv, "--no-progress"]) == 0
    assert sorted(WEIGHTS_DIR.iterdir()) == before
    folder = "eval_" + DEFAULT_MODEL.name.replace(".", "_")
    assert (tmp_path / folder / "PublicTest_limit14.json").is_file()


def test_every_command_that_writes_takes_o_for_its_output():
    """-o was prepare's, slim's and export's; train, evaluate, select-ensemble and card took only --out."""
    parser = cli.build_parser()
    for argv in (
        ["prepare", "src"],
        ["train"],
        ["evaluate", "m.onnx", "--data", "d.npz"],
        ["select-ensemble", "a.onnx", "b.onnx", "--data", "d.npz"],
        ["card", "--run", "r", "--onnx", "m.onnx", "--reports", "r.json", "--command", "c", "--hardware", "h"],
        ["slim", "last.pt"],
        ["export", "best.pt"],
    ):
        assert parser.parse_args([*argv, "-o", "OUT"]).out == "OUT", argv


def test_threads_0_is_the_default_for_every_command():
    """train --threads 0 meant torch's default; predict and serve refused 0."""
    parser = cli.build_parser()
    assert parser.parse_args(["predict", "a.jpg", "--threads", "0"]).threads is None
    assert parser.parse_args(["serve", "--threads", "0"]).threads is None
    assert parser.parse_args(["serve", "--threads", "3"]).threads == 3
    assert parser.parse_args(["train", "--threads", "0"]).threads == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["predict", "a.jpg", "--threads", "-1"])


def test_an_unknown_option_is_named_by_its_command(capsys):
    """It was reported by the top-level parser: 'ferkit: error:' under ferkit's usage, not the command's."""
    for argv in (["predict", "a.jpg", "--bogus"], ["train", "--data", "d.npz", "--bogus", "1"]):
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2
        assert f"ferkit {argv[0]}: error: unrecognized arguments: --bogus" in err and f"usage: ferkit {argv[0]}" in err


def test_predict_takes_paths_after_its_options(monkeypatch):
    """`predict a.jpg --every 2 b.jpg` was "unrecognized arguments: b.jpg" (positionals end at an option)."""
    seen = {}
    monkeypatch.setattr(cli, "cmd_predict", lambda args: seen.update(paths=args.paths, every=args.every) or 0)
    assert cli.main(["predict", "a.jpg", "--every", "2", "b.jpg", "-"]) == 0
    assert seen == {"paths": ["a.jpg", "b.jpg", "-"], "every": 2}
    with pytest.raises(SystemExit):  # an unknown option among them is still an error
        cli.main(["predict", "a.jpg", "--every", "2", "b.jpg", "--bogus"])
