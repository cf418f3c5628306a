"""ONNX export, float16 and int8 variants (ferkit.export, ``ferkit export``): metadata, agreement of the ONNX
and torch backends, and clear errors for bad model files. One small checkpoint is exported once."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers_inference import ASTRONAUT, CANVAS, make_checkpoint, photo_crops

from ferkit.checkpoint import CheckpointError
from ferkit.cli import main
from ferkit.data import CLASSES
from ferkit.export import (
    PREPROCESSING,
    _set_metadata,
    convert_fp16,
    export_onnx,
    fit_log_offsets,
    fit_prior,
    max_abs_diff,
    quantize_int8,
    read_metadata,
    undo_class_weights,
    with_metrics,
)
from ferkit.fileio import REPORT_KEYS, model_digest, staging_folder
from ferkit.inference import EmotionRecognizer


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """A quarter-width ferkit_small checkpoint, its ONNX export and fp16 and int8 versions of that."""
    d = tmp_path_factory.mktemp("export")
    ckpt = make_checkpoint(d / "best.pt")
    model = export_onnx(ckpt, d / "model.onnx", metrics={"accuracy": 0.61, "macro_f1": 0.55})
    int8 = quantize_int8(model, d / "model_int8.onnx", photo_crops(128, seed=0))
    fp16 = convert_fp16(model, d / "model_fp16.onnx")
    return {"pt": ckpt, "onnx": model, "int8": int8, "fp16": fp16}


@pytest.fixture(scope="module")
def held_out() -> np.ndarray:
    return photo_crops(200, seed=1)  # not the crops the BatchNorm statistics and calibration saw


def test_metadata_has_classes_and_preprocessing(exported):
    info = read_metadata(exported["onnx"])
    assert info["classes"] == list(CLASSES)
    assert info["preprocessing"] == PREPROCESSING
    assert info["name"] == "model" and info["input_size"] == 48  # the file's name: the shipped model's run
    assert info["architecture"] == "ferkit_small" and info["model_kwargs"] == {"width": 0.25}
    assert info["checkpoint"] == "best.pt"
    assert info["accuracy"] == 0.61 and info["macro_f1"] == 0.55
    assert PREPROCESSING in onnx.load(str(exported["onnx"])).doc_string
    rec = EmotionRecognizer(exported["onnx"], threads=1)
    assert rec.classes == CLASSES
    assert rec.model_info["name"] == "model" and rec.model_info["accuracy"] == 0.61


def test_a_checkpoint_and_its_exports_are_one_ensemble_member(exported, tmp_path):
    """Averaged as an ensemble, a checkpoint and its export (or two exports of it) counted one model twice."""
    for a, b in (("pt", "onnx"), ("onnx", "int8"), ("fp16", "pt")):
        with pytest.raises(ValueError, match=rf"{exported[a].name} and .*{exported[b].name}: ensemble members made"):
            EmotionRecognizer([exported[a], exported[b]], threads=1)
    rec = EmotionRecognizer([make_checkpoint(tmp_path / "other.pt", seed=1), exported["int8"]], threads=1)
    assert rec.model_info["name"] == "ensemble(other, model_int8)"
    run = exported["pt"].parent.name  # a run's best.pt is named by its run (its folder here: no config's out)
    assert EmotionRecognizer(exported["pt"]).model_info["name"] == run


def test_export_does_not_pass_on_torch_internal_warnings(tmp_path, exported):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(exported["pt"], tmp_path / "again.onnx")
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


def test_dynamic_batch_and_probabilities(exported, held_out):
    sess = session(exported["onnx"])
    assert [i.name for i in sess.get_inputs()] == ["image"]
    for n in (1, 3, 64):
        p = sess.run(None, {"image": held_out[:n, None].astype(np.float32) / 255})[0]
        assert p.shape == (n, 7)
        np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)


def test_onnx_agrees_with_torch(exported, held_out):
    assert max_abs_diff(exported["onnx"], exported["pt"], held_out) < 1e-4
    onnx_rec = EmotionRecognizer(exported["onnx"], threads=1)
    torch_rec = EmotionRecognizer(exported["pt"], backend="torch")
    p_onnx, p_torch = onnx_rec.classify_crops(held_out), torch_rec.classify_crops(held_out)
    assert np.abs(p_onnx - p_torch).max() < 1e-4
    assert p_torch.max(1).min() < 0.6 < p_torch.max(1).max()  # the test model does depend on its input
    assert len(set(p_torch.argmax(1))) >= 2
    for photo in (CANVAS, ASTRONAUT):
        a, b = onnx_rec.predict(photo), torch_rec.predict(photo)
        assert [f.box for f in a] == [f.box for f in b] and len(a) >= 1
        for fa, fb in zip(a, b, strict=True):
            assert list(fb.scores) == list(CLASSES)
            assert np.abs(np.array(list(fa.scores.values())) - list(fb.scores.values())).max() < 1e-4


def test_int8_model_mostly_agrees_with_fp32(exported, held_out):
    qmodel = onnx.load(str(exported["int8"]))
    assert any(n.op_type == "QuantizeLinear" for n in qmodel.graph.node)
    info = read_metadata(exported["int8"])
    assert info["quantization"] == "int8 static QDQ"
    assert info["classes"] == list(CLASSES) and "accuracy" not in info  # measured on the float model, not this one
    weights = [onnx.numpy_helper.to_array(t) for t in qmodel.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights and 32 < max(np.abs(w.astype(int)).max() for w in weights) <= 64  # 7-bit: no u8s8 saturation
    x = held_out[:, None].astype(np.float32) / 255
    p32 = session(exported["onnx"]).run(None, {"image": x})[0]
    p8 = session(exported["int8"]).run(None, {"image": x})[0]
    assert (p32.argmax(1) == p8.argmax(1)).mean() >= 0.85
    assert np.abs(p32 - p8).mean() < 0.05
    np.testing.assert_allclose(p8.sum(1), 1, atol=1e-5)  # the softmax stays in float: real probabilities
    assert len(np.unique(p8)) > 255
    faces = EmotionRecognizer(exported["int8"], threads=1).predict(ASTRONAUT)
    assert len(faces) == 1 and sum(faces[0].scores.values()) == pytest.approx(1, abs=1e-4)


def test_fp16_model_is_half_the_size_and_agrees(exported, held_out):
    info = read_metadata(exported["fp16"])
    assert info["precision"] == "float16" and info["classes"] == list(CLASSES) and "accuracy" not in info
    assert exported["fp16"].stat().st_size < 0.6 * exported["onnx"].stat().st_size
    sess = session(exported["fp16"])
    assert sess.get_inputs()[0].type == "tensor(float)" and sess.get_outputs()[0].type == "tensor(float)"
    x = held_out[:, None].astype(np.float32) / 255
    p32 = session(exported["onnx"]).run(None, {"image": x})[0]
    p16 = sess.run(None, {"image": x})[0]
    assert np.abs(p32 - p16).max() < 5e-3
    assert (p32.argmax(1) == p16.argmax(1)).mean() >= 0.98
    faces = EmotionRecognizer(exported["fp16"], threads=1).predict(ASTRONAUT)
    assert len(faces) == 1 and sum(faces[0].scores.values()) == pytest.approx(1, abs=1e-3)


def test_bad_model_files_give_errors_naming_them(tmp_path, exported):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(exported["onnx"].read_bytes()[:500])  # truncated
    with pytest.raises(ValueError, match=r"broken\.onnx: not a loadable ONNX model"):
        EmotionRecognizer(broken)
    half = tmp_path / "half.pt"
    half.write_bytes(exported["pt"].read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"half\.pt: not a readable ferkit checkpoint"):
        EmotionRecognizer(half)
    with pytest.raises(CheckpointError, match=r"half\.pt"):
        export_onnx(half, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
    import torch

    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match=r"foreign\.pt: not a ferkit checkpoint"):
        EmotionRecognizer(tmp_path / "foreign.pt", backend="torch")


def test_cli_export_bad_checkpoint(tmp_path, capsys):
    (tmp_path / "bad.pt").write_text("nope")
    assert main(["export", str(tmp_path / "bad.pt"), "-o", str(tmp_path / "m.onnx")]) == 2
    assert "bad.pt" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "m.onnx")]) == 2
    assert "missing.pt: checkpoint not found" in capsys.readouterr().err


def test_cli_export_refuses_to_write_over_its_checkpoint(tmp_path, exported, capsys):
    ck = tmp_path / "best.pt"
    shutil.copy(exported["pt"], ck)
    before = ck.read_bytes()
    # any file not named .onnx is refused: `-o runs/x/last.pt` wrote ONNX bytes over another run's checkpoint
    for out in (tmp_path / "." / "best.pt", tmp_path / "last.pt", tmp_path / "config.yaml"):
        assert main(["export", str(ck), "-o", str(out)]) == 2
        assert f"{out}: name the output *.onnx" in capsys.readouterr().err
    assert ck.read_bytes() == before and not (tmp_path / "last.pt").exists()
    (tmp_path / "exp.onnx").mkdir()  # its error named a temporary file: "Is a directory: 'tmpkb5eqy9r/exp' -> 'exp'"
    assert main(["export", str(ck), "-o", str(tmp_path / "exp.onnx")]) == 2
    assert f"{tmp_path / 'exp.onnx'}: is a folder; give a file name to write" in capsys.readouterr().err
    (tmp_path / "m_fp16.onnx").mkdir()  # a copy's name: refused before the export (it failed after, naming a temp)
    assert main(["export", str(ck), "-o", str(tmp_path / "m.onnx"), "--fp16"]) == 2
    assert f"{tmp_path / 'm_fp16.onnx'}: is a folder; give a file name to write" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def _report(model: Path, **values) -> dict:
    """A ``ferkit evaluate`` report of the file ``model`` on the whole PrivateTest split, ``values`` over
    placeholders."""
    report = dict.fromkeys(REPORT_KEYS, {}) | {"model": "m", "checkpoints": [str(model)], "split": "PrivateTest"}
    report |= {"digests": [model_digest(model)], "limit": 0}
    return report | {"tta": "none", "n": 3589, "macro_f1": 0.6, "weighted_f1": 0.7, "macro_auc": 0.9} | values


@pytest.mark.slow
def test_cli_export_with_report_check_and_int8(tmp_path, exported, synthetic_cache, capsys):
    report = tmp_path / "eval.json"
    report.write_text(json.dumps(_report(exported["pt"], accuracy=0.7, other=1)))
    out = tmp_path / "cli" / "m.onnx"
    argv = ["export", str(exported["pt"]), "-o", str(out), "--report", str(report), "--check", "--int8", "--fp16"]
    argv += ["--data", str(synthetic_cache)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert f"wrote {out}" in stdout
    diff = float(re.search(r"max \|onnx - torch\| on \d+ images: (\S+)", stdout)[1])
    assert diff < 1e-4
    info = read_metadata(out)
    assert info["accuracy"] == 0.7 and info["split"] == "PrivateTest" and "other" not in info
    int8 = out.with_name("m_int8.onnx")
    assert f"wrote {int8}" in stdout
    assert read_metadata(int8)["quantization"] == "int8 static QDQ" and read_metadata(int8)["name"] == "m_int8"
    assert EmotionRecognizer(int8, threads=1).classes == CLASSES
    fp16 = out.with_name("m_fp16.onnx")
    assert f"wrote {fp16}" in stdout
    assert read_metadata(fp16)["precision"] == "float16" and "accuracy" not in read_metadata(fp16)
    assert read_metadata(fp16)["name"] == "m_fp16"


def test_an_interrupted_export_leaves_the_earlier_set_whole(tmp_path, exported, synthetic_cache, monkeypatch, capsys):
    """Ctrl-C during the int8 calibration of a second export left the new m.onnx beside the old m_int8.onnx (each
    file was put in place as it was made); now all are made in a hidden folder first, then put in place."""
    out = tmp_path / "m.onnx"
    argv = ["export", "-o", str(out), "--int8", "--fp16", "--data", str(synthetic_cache)]
    assert main([*argv[:1], str(exported["pt"]), *argv[1:]]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before) == ["m.onnx", "m_fp16.onnx", "m_int8.onnx"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("ferkit.export.quantize_int8", interrupted)
    assert main([*argv[:1], str(make_checkpoint(tmp_path / "other" / "b.pt", seed=1)), *argv[1:]]) == 130
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m_fp16.onnx", "m_int8.onnx", "other"]
    capsys.readouterr()
    monkeypatch.undo()
    assert main(["export", str(exported["pt"]), "-o", str(out), "--fp16"]) == 0  # the int8 copy is left as it was
    assert capsys.readouterr().err == f"ferkit export: note: {tmp_path / 'm_int8.onnx'} is an earlier export's, " \
                                      "not rewritten (without --int8)\n"  # fmt: skip


def test_an_output_name_that_is_not_utf8(tmp_path, exported):
    """export failed on a file name of other bytes ("surrogates not allowed": the name went into the model's doc
    string), and slim and evaluate exited 2 after writing, printing it where stdout is strictly UTF-8."""
    import subprocess
    import sys

    out = tmp_path / "bad\udcff.onnx"  # the byte 0xff of a Latin-1 name, as Python decodes it
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    for command, name in (("export", out), ("slim", out.with_suffix(".pt"))):
        argv = [sys.executable, "-m", "ferkit", command, str(exported["pt"]), "-o", str(name)]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and "wrote " in done.stdout and "bad\\udcff" in done.stdout, done.stderr
    assert read_metadata(out)["name"] == "bad\udcff"


def test_staging_folders_are_hidden_beside_their_file(tmp_path):
    """A process killed while exporting left a visible tmpXXXXXXXX/ of model copies beside the outputs."""
    with staging_folder(tmp_path / "m.onnx") as folder:
        assert folder.parent == tmp_path and folder.name.startswith(".m.onnx.") and folder.name.endswith(".tmp")
    assert not folder.exists()


def test_cli_export_onnx_with_report_changes_only_the_metadata(tmp_path, exported, capsys):
    report = tmp_path / "PrivateTest_tta-flip.json"
    report.write_text(json.dumps(_report(exported["int8"], accuracy=0.72, tta="flip", x=1)))
    out = tmp_path / "shipped" / "best_int8.onnx"
    out.parent.mkdir()
    older = tmp_path / "older_int8.onnx"  # an export of an older ferkit: its preprocessing named a 10% margin
    _set_metadata(exported["int8"], {**read_metadata(exported["int8"]), "preprocessing": "crop with 10% margin"}, older)
    assert main(["export", str(older), "-o", str(out), "--report", str(report)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    info = read_metadata(out)
    assert info["name"] == "best_int8" and info["accuracy"] == 0.72 and info["tta"] == "flip"
    assert info["quantization"] == "int8 static QDQ" and "x" not in info
    assert info["preprocessing"] == PREPROCESSING  # today's text, not the file's
    assert onnx.load(str(out)).graph == onnx.load(str(exported["int8"])).graph
    assert "accuracy" not in read_metadata(exported["int8"])  # the source is untouched

    assert main(["export", str(exported["int8"]), "-o", str(out), "--int8"]) == 2
    assert "takes only --report" in capsys.readouterr().err
    (tmp_path / "broken.onnx").write_bytes(b"\x08garbage")
    assert main(["export", str(tmp_path / "broken.onnx"), "-o", str(out), "--report", str(report)]) == 2
    assert "broken.onnx: not a readable ONNX model" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["onnx", "int8"])
def test_undoing_class_weights_multiplies_the_probabilities_by_the_counts(tmp_path, exported, held_out, kind):
    counts = np.array([3995, 436, 4097, 7215, 4830, 3171, 4965])
    out = undo_class_weights(exported[kind], tmp_path / "undone.onnx", counts, 0.5)
    x = held_out[:, None].astype(np.float32) / 255
    before, after = session(exported[kind]).run(None, {"image": x})[0], session(out).run(None, {"image": x})[0]
    expected = before * np.sqrt(counts)
    np.testing.assert_allclose(after, expected / expected.sum(1, keepdims=True), atol=1e-5)
    assert (after.argmax(1) != before.argmax(1)).any()  # the rare classes lost ground: some answers change
    info = read_metadata(out)
    assert info["name"] == "undone"
    assert info["class_weights_undone"] == {"power": 0.5, "training_counts": counts.tolist()}
    assert "accuracy" not in info and "macro_f1" not in info  # measured on the source, not on this model
    assert info["classes"] == list(CLASSES) and info["architecture"] == "ferkit_small"
    with pytest.raises(ValueError, match="already undone"):
        undo_class_weights(out, tmp_path / "twice.onnx", counts, 0.5)
    with pytest.raises(ValueError, match="one positive count per class"):
        undo_class_weights(exported[kind], tmp_path / "bad.onnx", counts[:6], 0.5)
    for power in (0.0, float("nan"), -1.0):
        with pytest.raises(ValueError, match="expected a positive number"):
            undo_class_weights(exported[kind], tmp_path / "bad.onnx", counts, power)


def test_fit_log_offsets_recovers_a_tilt_and_matches_the_prior():
    """Probabilities tilted by known log offsets (as a class-weighted or distilled loss tilts them) are untilted
    by the fit, up to a constant; at the fit, each class's mean probability is its frequency."""
    from scipy.special import softmax

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (20_000, 7))
    labels = np.array([rng.choice(7, p=p) for p in softmax(logits, axis=1)])
    tilt = np.array([0.3, 1.4, 0.3, 0.0, 0.2, 0.4, 0.2])
    offsets = fit_log_offsets(softmax(logits + tilt, axis=1), labels)
    assert offsets.max() == 0
    np.testing.assert_allclose(offsets - offsets.mean(), -(tilt - tilt.mean()), atol=0.08)
    refit = softmax(logits + tilt + offsets, axis=1)
    np.testing.assert_allclose(refit.mean(0), np.bincount(labels) / len(labels), atol=1e-5)
    with pytest.raises(ValueError, match="no example of class 1"):
        fit_log_offsets(softmax(logits, axis=1)[labels != 1], labels[labels != 1])


def test_fit_prior_names_a_class_the_split_lacks(tmp_path, exported):
    """It said "no example of class 1", not which class of which split."""
    labels = np.array([0, 2, 3, 4, 5, 6] * 3)
    probs = np.full((len(labels), 7), 1 / 7)
    with pytest.raises(ValueError, match="PublicTest has no disgust image: every class must occur to fit its offset"):
        fit_prior(exported["onnx"], tmp_path / "fitted.onnx", probs, labels, "PublicTest")
    assert not (tmp_path / "fitted.onnx").exists()


@pytest.mark.parametrize("undo_first", [False, True])
def test_fit_prior_shifts_the_logits_of_an_export(tmp_path, exported, held_out, undo_first):
    """The fitted copy's probabilities are the source's times exp(offsets), renormalised; after
    --undo-class-weights the offsets are added to the ones in the graph (one Add before the Softmax)."""
    src = exported["int8"]
    if undo_first:
        src = undo_class_weights(src, tmp_path / "undone.onnx", np.arange(1, 8), 0.5)
    x = held_out[:, None].astype(np.float32) / 255
    before = session(src).run(None, {"image": x})[0]
    labels = np.arange(len(x)) % 7  # every class present; any labels do
    out = fit_prior(src, tmp_path / "fitted.onnx", before, labels, "PublicTest")
    info = read_metadata(out)
    offsets = np.array(info["prior_fitted"]["offsets"])
    assert info["prior_fitted"]["split"] == "PublicTest" and info["prior_fitted"]["n"] == len(x)
    assert ("class_weights_undone" in info) == undo_first and "accuracy" not in info
    after = session(out).run(None, {"image": x})[0]
    expected = before * np.exp(offsets)
    np.testing.assert_allclose(after, expected / expected.sum(1, keepdims=True), atol=1e-4)
    np.testing.assert_allclose(after.mean(0), np.bincount(labels) / len(labels), atol=1e-4)  # the labels' prior
    assert [n.op_type for n in onnx.load(str(out)).graph.node].count("Add") == [
        n.op_type for n in onnx.load(str(src)).graph.node
    ].count("Add") + (not undo_first)
    with pytest.raises(ValueError, match="prior is already fitted"):
        fit_prior(out, tmp_path / "twice.onnx", before, labels, "PublicTest")
    if not undo_first:  # the other order is refused too: the undoing would tilt a fitted model back
        with pytest.raises(ValueError, match="its prior is fitted; undo the class weights before --fit-prior"):
            undo_class_weights(out, tmp_path / "late.onnx", np.arange(1, 8), 0.5)


def test_cli_export_fits_the_prior_on_publictest(tmp_path, exported, synthetic_cache, capsys):
    from ferkit.data import load_dataset

    out = tmp_path / "fitted.onnx"
    argv = ["export", str(exported["int8"]), "-o", str(out), "--fit-prior"]
    assert main(argv) == 2
    assert "--fit-prior needs --data: its PublicTest split" in capsys.readouterr().err
    assert main([*argv, "--undo-class-weights", "0.5", "--data", str(synthetic_cache)]) == 2
    assert "one correction at a time" in capsys.readouterr().err
    assert main([*argv, "--data", str(synthetic_cache), "--report", str(tmp_path / "r.json")]) == 2
    assert "--report with --fit-prior: the corrected copy is another model" in capsys.readouterr().err
    assert not out.exists()
    assert main([*argv, "--data", str(synthetic_cache)]) == 0
    fitted = read_metadata(out)["prior_fitted"]
    assert capsys.readouterr().out.startswith(f"wrote {out}: {exported['int8']} with logit offsets {fitted['offsets']}")
    assert fitted["n"] == len(load_dataset(synthetic_cache).split("PublicTest")[1])
    pt = ["export", str(exported["pt"]), "-o", str(tmp_path / "pt.onnx"), "--fit-prior", "--data", str(synthetic_cache)]
    assert main(pt) == 2  # it made a plain export, the option ignored
    assert "--fit-prior takes an exported .onnx: export the checkpoint first" in capsys.readouterr().err


def test_cli_fit_prior_refuses_its_input_or_a_fitted_model_before_running_it(tmp_path, exported, synthetic_cache,
                                                                             capsys, monkeypatch):  # fmt: skip
    """``export X.onnx -o X.onnx --fit-prior`` ran the model over PublicTest, then refused."""
    import ferkit.evaluate

    monkeypatch.setattr(ferkit.evaluate, "split_probabilities", lambda *a: pytest.fail("the model ran"))
    src = shutil.copy(exported["int8"], tmp_path / "m.onnx")
    assert main(["export", str(src), "-o", str(src), "--fit-prior", "--data", str(synthetic_cache)]) == 2
    assert f"{src}: that is the model itself" in capsys.readouterr().err
    fitted = tmp_path / "fitted.onnx"
    fit_prior(src, fitted, np.full((7, 7), 1 / 7), np.arange(7), "PublicTest")
    again = ["export", str(fitted), "-o", str(tmp_path / "again.onnx"), "--fit-prior", "--data", str(synthetic_cache)]
    assert main(again) == 2
    assert "its prior is already fitted" in capsys.readouterr().err


def test_undoing_class_weights_of_a_float16_copy_says_what_to_do_instead(tmp_path, exported):
    with pytest.raises(ValueError, match="float16 copy; correct the float32 or int8 export"):
        undo_class_weights(exported["fp16"], tmp_path / "x.onnx", np.arange(1, 8), 0.5)
    undone = undo_class_weights(exported["onnx"], tmp_path / "undone.onnx", np.arange(1, 8), 0.5)
    half = convert_fp16(undone, tmp_path / "undone_fp16.onnx")  # the order that works
    assert read_metadata(half)["class_weights_undone"]["power"] == 0.5
    assert session(half).run(None, {"image": np.zeros((2, 1, 48, 48), np.float32)})[0].shape == (2, 7)


def test_cli_export_undoes_class_weights_with_the_counts_of_data(tmp_path, exported, synthetic_cache, capsys):
    from ferkit.data import load_dataset

    report = tmp_path / "PrivateTest_tta-flip.json"  # the source's: the corrected copy is another model
    report.write_text(json.dumps(_report(exported["int8"], accuracy=0.73, tta="flip")))
    out = tmp_path / "prior.onnx"
    argv = ["export", str(exported["int8"]), "-o", str(out), "--undo-class-weights", "0.5"]
    assert main([*argv, "--data", str(synthetic_cache), "--report", str(report)]) == 2
    assert "--report with --undo-class-weights: the corrected copy is another model" in capsys.readouterr().err
    assert main([*argv, "--data", str(synthetic_cache)]) == 0
    info = read_metadata(out)
    labels = load_dataset(synthetic_cache).split("Training")[1]
    assert info["class_weights_undone"]["training_counts"] == np.bincount(labels, minlength=7).tolist()
    assert "accuracy" not in info and info["quantization"] == "int8 static QDQ"

    assert main(argv) == 2
    assert "--undo-class-weights needs --data" in capsys.readouterr().err
    assert main(["export", str(exported["pt"]), "-o", str(tmp_path / "x.onnx"), "--undo-class-weights", "0.5"]) == 2
    assert "takes an exported .onnx" in capsys.readouterr().err


def test_evaluate_exported_models(exported, synthetic_cache):
    from ferkit.evaluate import evaluate_checkpoints

    def run(path):
        return evaluate_checkpoints([path], synthetic_cache, split="PrivateTest", tta="flip", device="cpu")

    pt, onnx_res, int8 = run(exported["pt"]), run(exported["onnx"]), run(exported["int8"])
    assert onnx_res["model"] == "model" and int8["model"] == "model_int8"
    assert onnx_res["confusion_matrix"] == pt["confusion_matrix"]
    assert abs(onnx_res["macro_auc"] - pt["macro_auc"]) < 1e-3
    assert int8["n"] == 28 and np.array(int8["confusion_matrix"]).sum() == 28


def test_cli_export_check_needs_training_images(tmp_path, exported, capsys):
    from conftest import synthetic_data

    from ferkit.data import save_cache

    cache = save_cache(synthetic_data({"Training": 0, "PublicTest": 1, "PrivateTest": 1}), tmp_path / "no_train.npz")
    assert main(["export", str(exported["pt"]), "-o", str(tmp_path / "m.onnx"), "--check", "--data", str(cache)]) == 2
    assert f"{cache}: no Training images to check and calibrate on" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export_int8_needs_readable_data_before_writing(tmp_path, exported, capsys):
    """int8 calibrated on random images disagrees with float32: --int8 needs --data, and --data is read
    before the float32 model is written."""
    out = tmp_path / "m.onnx"
    assert main(["export", str(exported["pt"]), "-o", str(out), "--int8"]) == 2
    assert "--int8 needs --data" in capsys.readouterr().err
    for option in ("--int8", "--check"):
        assert main(["export", str(exported["pt"]), "-o", str(out), option, "--data", str(tmp_path / "nope.npz")]) == 2
        assert "nope.npz" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_export_refuses_data_it_would_not_read(tmp_path, exported, synthetic_cache, capsys):
    """`export best.pt --data X` (no --check, no --int8) wrote an export and never read X, missing or not."""
    for model, options in ((exported["pt"], []), (exported["onnx"], ["--report", str(tmp_path / "r.json")])):
        argv = ["export", str(model), "-o", str(tmp_path / "m.onnx"), *options, "--data", str(synthetic_cache)]
        assert main(argv) == 2
        assert "--data is read only by --check, --int8, --undo-class-weights and --fit-prior" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_export_check_fails_over_its_tolerance(tmp_path, exported, capsys, monkeypatch):
    """--check printed any difference, NaN included, and exited 0; the wrong export stayed in OUT's place."""
    (tmp_path / "m.onnx").write_bytes(b"an earlier export")
    for diff in (float("nan"), 0.02):
        monkeypatch.setattr("ferkit.export.max_abs_diff", lambda *args, d=diff: d)
        assert main(["export", str(exported["pt"]), "-o", str(tmp_path / "m.onnx"), "--check", "--fp16"]) == 2
        err = capsys.readouterr().err
        assert f"its ONNX export's probabilities differ from its own by {diff:.2e}, over 0.0001" in err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no fp16 copy, no staged file
        assert (tmp_path / "m.onnx").read_bytes() == b"an earlier export"
    monkeypatch.undo()
    assert main(["export", str(exported["pt"]), "-o", str(tmp_path / "m.onnx"), "--check"]) == 0


def test_export_report_must_be_one_model_s_whole_privatetest(tmp_path, exported, capsys):
    """--report stamped whatever it was given: an ensemble's accuracy, a PublicTest subset's, a string (which
    then crashed serve), and an older report's macro-F1 stayed beside a newer accuracy."""
    head = _report(exported["int8"], accuracy=0.7, tta="flip")
    other = {"checkpoints": [f"runs/s/{exported['int8'].name}"], "digests": [model_digest(exported["onnx"])]}
    bad = {
        "ens.json": ({**head, "checkpoints": ["a.onnx", "b.onnx"]}, "an ensemble of 2 models, not of one"),
        "short.json": ({"accuracy": 0.7}, "not a report of `ferkit evaluate` (no model, checkpoints, digests, spl"),
        "other.json": ({**head, **other}, f"the report of {other['checkpoints'][0]}, not of "),  # the same name
        "pub.json": ({**head, "split": "PublicTest"}, "not a report on the whole PrivateTest split"),
        "PrivateTest.json": ({**head, "limit": 20}, "not a report on the whole PrivateTest split"),  # a subset, renamed
        "str.json": ({**head, "accuracy": "high"}, "no accuracy between 0 and 1"),
    }
    for name, (report, message) in bad.items():
        (tmp_path / name).write_text(json.dumps(report))
        assert (
            main(["export", str(exported["int8"]), "-o", str(tmp_path / "m.onnx"), "--report", str(tmp_path / name)])
            == 2
        )
        assert message in capsys.readouterr().err
    (tmp_path / "ok.json").write_text(json.dumps(_report(exported["onnx"], accuracy=0.7, tta="flip")))
    # the source's macro-F1 (0.55) must not stay
    assert (
        main(["export", str(exported["onnx"]), "-o", str(tmp_path / "m.onnx"), "--report", str(tmp_path / "ok.json")])
        == 0
    )
    info = read_metadata(tmp_path / "m.onnx")
    assert info["accuracy"] == 0.7 and info["macro_f1"] == 0.6


def test_undo_refuses_its_own_file_and_another_class_order(tmp_path, exported, synthetic_cache, capsys):
    original = tmp_path / "m.onnx"
    shutil.copy(exported["int8"], original)
    before = original.read_bytes()
    argv = ["--undo-class-weights", "0.5", "--data", str(synthetic_cache)]
    assert main(["export", str(original), "-o", str(tmp_path / "." / "m.onnx"), *argv]) == 2
    assert "that is the model itself" in capsys.readouterr().err and original.read_bytes() == before
    info = read_metadata(original)
    _set_metadata(original, {**info, "classes": list(reversed(CLASSES))})
    assert main(["export", str(original), "-o", str(tmp_path / "prior.onnx"), *argv]) == 2
    assert "not in FER-2013's order (that of the data)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "meta, message",
    [("not json", "its 'ferkit' metadata is not valid JSON"), ('["a"]', "its 'ferkit' metadata is not a JSON object"),
     ('{"classes": "abcdefg"}', "its 'ferkit' metadata names no list of classes")],
)  # fmt: skip
def test_foreign_metadata_is_named(tmp_path, exported, meta, message):
    """An AttributeError traceback, an unnamed JSON error, or faces labelled 'g' before."""
    path = tmp_path / "m.onnx"
    model = onnx.load(str(exported["onnx"]))
    for p in model.metadata_props:
        if p.key == "ferkit":
            p.value = meta
    onnx.save(model, str(path))
    for load in (read_metadata, lambda p: EmotionRecognizer(model=p, threads=1)):
        with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")):
            load(path)


def test_upper_case_onnx_and_a_checkpoint_without_metrics(tmp_path, exported, synthetic_cache):
    from ferkit.checkpoint import load_checkpoint, save_checkpoint
    from ferkit.evaluate import evaluate_tta

    upper = tmp_path / "M.ONNX"
    shutil.copy(exported["onnx"], upper)  # evaluate said "an ONNX model; this takes a .pt checkpoint"
    assert evaluate_tta([upper], synthetic_cache, "PrivateTest", device="cpu", limit=7)["none"]["n"] == 7
    state = load_checkpoint(exported["pt"])
    save_checkpoint(tmp_path / "none.pt", {**state, "metrics": None})  # a TypeError traceback in predict
    assert EmotionRecognizer(model=tmp_path / "none.pt", threads=1).model_info["accuracy"] is None
    with pytest.raises(ValueError, match="ensemble member given twice"):
        EmotionRecognizer(model=[exported["onnx"], exported["onnx"]], threads=1)


def test_a_model_s_digest_is_its_graph_and_weights(tmp_path, exported):
    """A report names what it scored by this digest: the same network with other metadata, or its weights
    stored beside the file, is the same model; other weights are another."""
    model = onnx.load(str(exported["onnx"]))
    onnx.save(model, str(tmp_path / "outside.onnx"), save_as_external_data=True, location="w.data", size_threshold=0)
    assert (tmp_path / "w.data").stat().st_size > 10_000
    with_metrics(exported["onnx"], tmp_path / "stamped.onnx", {"accuracy": 0.5})
    digest = model_digest(exported["onnx"])
    assert model_digest(tmp_path / "outside.onnx") == model_digest(tmp_path / "stamped.onnx") == digest
    assert model_digest(exported["int8"]) != digest


def test_export_checks_its_outputs_before_reading_the_data(tmp_path, exported, capsys, monkeypatch):
    """The data (minutes of decoding for a CSV or image folders) was read before OUT was found unwritable."""
    (tmp_path / "m.onnx").mkdir()
    read = []
    monkeypatch.setattr("ferkit.data.load_dataset", lambda *a, **k: read.append(a))
    argv = ["export", str(exported["pt"]), "-o", str(tmp_path / "m.onnx"), "--int8", "--data", "d.npz"]
    assert main(argv) == 2
    assert "m.onnx: is a folder" in capsys.readouterr().err and read == []


def test_a_staging_folder_a_killed_export_left_is_removed_by_a_later_one(tmp_path, exported):
    """A SIGKILLed export left its hidden .m.onnx.XXXXXXXX.tmp/ (megabytes) beside OUT for good."""
    import os
    import time

    from ferkit.fileio import STALE_STAGING_S

    old, young = tmp_path / ".m.onnx.k1ll3d_x.tmp", tmp_path / ".m.onnx.runn1ng_.tmp"  # young: another export's
    for folder in (old, young):
        folder.mkdir()
        (folder / "m.onnx").write_bytes(b"half an export")
    then = time.time() - STALE_STAGING_S - 60
    os.utime(old, (then, then))
    mine = tmp_path / ".mine.onnx.k1ll3d_x.tmp"  # another output's, and a user's file of that shape
    mine.mkdir()
    os.utime(mine, (then, then))
    assert main(["export", str(exported["pt"]), "-o", str(tmp_path / "m.onnx")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.onnx", young.name, mine.name])
