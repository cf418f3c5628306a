"""Metrics, test-time augmentation, predictions and the written report."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import read_only_filesystem, synthetic_data, tiny_config

from ferkit.checkpoint import slim_checkpoint
from ferkit.data import CLASSES, SPLITS, DataError, save_cache, tta_views
from ferkit.evaluate import (
    compute_metrics,
    evaluate_checkpoints,
    evaluate_tta,
    format_summary,
    plot_training_curves,
    predict_proba,
    predict_proba_modes,
    rank_ensembles,
    select_ensemble,
    split_probabilities,
    write_report,
)
from ferkit.models import build_model
from ferkit.training import train

PNG = b"\x89PNG\r\n\x1a\n"


def _random_case(n=300, seed=0, drop_class=None):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 7, n)
    if drop_class is not None:
        y[y == drop_class] = (drop_class + 1) % 7
    logits = rng.normal(size=(n, 7))
    logits[np.arange(n), y] += 1.0  # better than chance, not perfect
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs


@pytest.mark.parametrize("drop_class", [None, 1])
def test_metrics_agree_with_each_other(drop_class):
    y, probs = _random_case(drop_class=drop_class)
    m = compute_metrics(y, probs)
    cm = np.array(m["confusion_matrix"])
    n = len(y)
    assert m["n"] == n == cm.sum()
    assert cm.shape == (7, 7)
    assert m["accuracy"] == pytest.approx(np.trace(cm) / n)
    assert m["accuracy"] == pytest.approx((probs.argmax(1) == y).mean())
    assert cm.sum(1).tolist() == np.bincount(y, minlength=7).tolist()  # rows are true classes
    assert cm.sum(0).tolist() == np.bincount(probs.argmax(1), minlength=7).tolist()  # columns predictions
    rep = m["report"]
    assert sum(rep[c]["support"] for c in CLASSES) == n
    f1s = []
    for i, c in enumerate(CLASSES):
        row, col = cm[i].sum(), cm[:, i].sum()
        recall = cm[i, i] / row if row else 0.0
        precision = cm[i, i] / col if col else 0.0
        assert rep[c]["recall"] == pytest.approx(recall), c
        assert rep[c]["precision"] == pytest.approx(precision), c
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert rep[c]["f1-score"] == pytest.approx(f1), c
        f1s.append(f1)
        assert m["confusion_matrix_normalized"][i][i] == pytest.approx(recall, abs=1e-4)
    assert m["macro_f1"] == pytest.approx(np.mean(f1s))
    assert m["weighted_f1"] == pytest.approx(np.average(f1s, weights=cm.sum(1)))
    roc_classes = [c for i, c in enumerate(CLASSES) if cm[i].sum() > 0]
    assert sorted(m["roc"]) == sorted(roc_classes)
    assert m["macro_auc"] == pytest.approx(np.mean([m["roc"][c]["auc"] for c in roc_classes]))
    assert 0.5 < m["macro_auc"] < 1.0
    for r in m["roc"].values():
        assert r["fpr"][0] == 0 and r["tpr"][-1] == 1 and len(r["fpr"]) == len(r["tpr"])
    json.dumps(m)  # plain JSON-able values


def test_calibration_metrics():
    """log-loss as sklearn's; ECE of a model right exactly as often as it says, 0; of one always 90% sure and
    right half the time, 0.4; the prior ratio of each class, its mean probability over its frequency."""
    from sklearn.metrics import log_loss

    from ferkit.evaluate import calibration

    labels = np.array([0, 0, 1, 1, 2, 3, 4, 5, 6, 6])
    probs = np.full((10, 7), 0.1 / 6)
    probs[np.arange(10), [0, 1, 1, 1, 2, 3, 4, 5, 6, 0]] = 0.9  # two wrong
    c = calibration(labels, probs)
    assert c["nll"] == pytest.approx(log_loss(labels, probs))
    assert c["ece"] == pytest.approx(0.1)  # one bin: 90% sure, 80% right
    assert c["prior_ratio"]["disgust"] == pytest.approx(probs[:, 1].mean() / 0.2)
    half = np.tile(probs[0], (10, 1))  # always "angry" at 0.9, right for 5 of the 10
    assert calibration(np.array([0] * 5 + [1] * 5), half)["ece"] == pytest.approx(0.4)
    assert calibration(np.array([0] * 5 + [1] * 5), half)["prior_ratio"]["fear"] is None  # absent class
    loose = calibration(labels, probs * 1.01)  # rows summing to 1.01: ECE and the ratios were off too
    assert loose["ece"] == pytest.approx(c["ece"]) and loose["prior_ratio"] == pytest.approx(c["prior_ratio"])


def test_perfect_predictions():
    y = np.repeat(np.arange(7), 5)
    m = compute_metrics(y, np.eye(7)[y])
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0 and m["macro_auc"] == 1.0
    assert np.array_equal(np.array(m["confusion_matrix"]), np.diag(np.full(7, 5)))


def test_macro_f1_leaves_out_a_class_neither_present_nor_predicted():
    """A small subset (``--limit``) can miss a class: it must not count as F1 0 (macro-AUC skips it too),
    while a class predicted but absent does count (its precision is 0)."""
    y = np.repeat([0, 2, 3, 4, 5, 6], 5)  # no disgust
    m = compute_metrics(y, np.eye(7)[y])
    assert m["macro_f1"] == 1.0 and m["macro_auc"] == 1.0
    wrong = np.eye(7)[y]
    wrong[0] = np.eye(7)[1]  # one angry face called disgust
    assert compute_metrics(y, wrong)["macro_f1"] < 6 / 7
    y = np.repeat(np.arange(7), 5)
    m = compute_metrics(y, np.eye(7)[(y + 1) % 7])
    assert m["macro_f1"] == 0.0 == m["report"]["macro avg"]["f1-score"]  # all present: sklearn's own average


def test_tta_views():
    x = np.random.default_rng(0).random((3, 1, 48, 48), dtype=np.float32)
    assert len(tta_views(x, "none")) == 1 and tta_views(x, "none")[0] is x
    flip = tta_views(x, "flip")
    assert len(flip) == 2
    assert np.array_equal(flip[0], x) and np.array_equal(flip[1], x[..., ::-1])
    crops = tta_views(x, "crops")
    assert len(crops) == 10
    assert all(v.shape == x.shape and v.flags.c_contiguous for v in crops)  # what torch.from_numpy takes
    assert np.array_equal(crops[0], x)
    for v, f in zip(crops[:5], crops[5:], strict=True):
        assert np.array_equal(f, v[..., ::-1])
    assert len({v.tobytes() for v in crops}) == 10  # all different
    # each corner view is a 3-pixel shift of the image (a crop of the padded image), its border reflected
    shifted = [v for v in crops[1:5] if np.array_equal(v[..., 3:, 3:], x[..., :-3, :-3])]
    assert len(shifted) == 1
    # rows -3 and -1 of the image are its rows 3 and 1: reflected, the edge row not repeated
    assert np.array_equal(shifted[0][..., 0, 3:], x[..., 3, :-3])
    assert np.array_equal(shifted[0][..., 2, 3:], x[..., 1, :-3])
    with pytest.raises(ValueError, match="unknown TTA mode"):
        tta_views(x, "rotate")


def test_predict_proba():
    torch.manual_seed(0)
    model = build_model("ferkit_small", width=0.25).train()
    images = np.random.default_rng(0).integers(0, 256, (10, 48, 48), dtype=np.uint8)
    p = predict_proba(model, images, batch_size=4)
    assert p.shape == (10, 7) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert model.training  # mode restored
    p_again = predict_proba(model, images, batch_size=10)
    np.testing.assert_allclose(p, p_again, atol=1e-6)  # eval mode: deterministic, batch-independent
    for tta in ("flip", "crops"):
        pt = predict_proba(model, images, batch_size=4, tta=tta)
        assert pt.shape == (10, 7) and np.allclose(pt.sum(1), 1, atol=1e-5)
        assert not np.allclose(pt, p)
    # flip TTA is the mean of the plain and the mirrored predictions
    mirrored = predict_proba(model, images[:, :, ::-1].copy(), batch_size=4)
    np.testing.assert_allclose(predict_proba(model, images, tta="flip"), (p + mirrored) / 2, atol=1e-5)
    assert predict_proba(model, images[:0]).shape == (0, 7)


def test_predict_proba_modes_share_one_pass():
    torch.manual_seed(0)
    model = build_model("ferkit_small", width=0.25)
    images = np.random.default_rng(1).integers(0, 256, (6, 48, 48), dtype=np.uint8)
    modes = predict_proba_modes(model, images, batch_size=4, modes=("none", "flip", "crops"))
    for tta, p in modes.items():  # the widest pass (ten-crop) gives what each mode gives alone
        np.testing.assert_allclose(p, predict_proba(model, images, batch_size=4, tta=tta), atol=1e-6)
    with pytest.raises(ValueError, match="unknown TTA mode"):
        predict_proba_modes(model, images, modes=("none", "rotate"))


def test_write_report(tmp_path):
    y, probs = _random_case()
    m = compute_metrics(y, probs)
    path = write_report(m, tmp_path / "eval", "PrivateTest", {"model": "m", "split": "PrivateTest"})
    assert path == tmp_path / "eval" / "PrivateTest.json"
    payload = json.loads(path.read_text())
    assert payload["model"] == "m" and payload["accuracy"] == pytest.approx(m["accuracy"])
    assert payload["confusion_matrix"] == m["confusion_matrix"]
    for name in ("PrivateTest_confusion.png", "PrivateTest_confusion_norm.png", "PrivateTest_roc.png"):
        data = (tmp_path / "eval" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    summary = format_summary(m)
    assert all(c in summary for c in CLASSES) and f"{m['accuracy']:.4f}" in summary


def test_plot_training_curves(trained_run, tmp_path):
    plot_training_curves(trained_run / "metrics.csv", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG)


def test_evaluate_checkpoint_and_ensemble(trained_run, synthetic_cache, tmp_path):
    ck = trained_run / "best.pt"
    res = evaluate_checkpoints([ck], synthetic_cache, split="PrivateTest", out=tmp_path, tta="flip", device="cpu")
    assert res["n"] == 28 and res["split"] == "PrivateTest" and res["model"] == "run"  # its run's folder
    cm = np.array(res["confusion_matrix"])
    assert cm.sum(1).tolist() == [4] * 7
    assert res["accuracy"] == pytest.approx(np.trace(cm) / 28)
    report = json.loads((tmp_path / "PrivateTest_tta-flip.json").read_text())
    assert report["accuracy"] == res["accuracy"] and report["tta"] == "flip"
    assert (tmp_path / "training_curves.png").is_file()
    assert (tmp_path / "PrivateTest_tta-flip_confusion.png").is_file()

    # its slimmed copy (the same weights) gives the same predictions, under the copy's name; the same file twice,
    # in two files, or as a checkpoint and its slimmed copy is refused as an ensemble: it would count double
    slim = slim_checkpoint(ck, tmp_path / "slim.pt")
    alone = evaluate_checkpoints([slim], synthetic_cache, split="PrivateTest", tta="flip", device="cpu")
    assert alone["model"] == "slim" and alone["confusion_matrix"] == res["confusion_matrix"]
    assert "report_json" not in alone
    with pytest.raises(ValueError, match=r"best\.pt and .*slim\.pt: ensemble members made from the same trained"):
        evaluate_checkpoints([ck, slim], synthetic_cache, split="PrivateTest", tta="flip", device="cpu")
    with pytest.raises(ValueError, match=r"best\.pt and .*slim\.pt: candidates made from the same trained weights"):
        select_ensemble([ck, slim], synthetic_cache, device="cpu")
    with pytest.raises(ValueError, match="ensemble member given twice"):
        evaluate_checkpoints([ck, trained_run / "." / "best.pt"], synthetic_cache, device="cpu")
    copy = tmp_path / "copy.pt"
    copy.write_bytes(ck.read_bytes())
    with pytest.raises(ValueError, match=r"copy\.pt: one model in several files"):
        evaluate_checkpoints([ck, copy], synthetic_cache, device="cpu")
    train(tiny_config(synthetic_cache, tmp_path / "second", seed=1, epochs=1))  # an ensemble is named by its runs
    ens = evaluate_checkpoints([ck, tmp_path / "second" / "last.pt"], synthetic_cache, device="cpu")
    assert ens["model"] == "ensemble(run, second/last)"

    both = evaluate_tta([ck], synthetic_cache, split="PrivateTest", out=tmp_path, modes=("none", "flip"), device="cpu")
    assert both["flip"]["confusion_matrix"] == res["confusion_matrix"]
    assert json.loads((tmp_path / "PrivateTest.json").read_text())["tta"] == "none"

    sub = evaluate_checkpoints([ck], synthetic_cache, split="PublicTest", device="cpu", limit=10)
    assert sub["n"] == 10 and np.array(sub["confusion_matrix"]).sum() == 10


def _model(correct_on, n=4, strong=0.9, weak=0.6):
    """Probabilities over 2 classes for labels all 0: strongly right on ``correct_on``, mildly wrong elsewhere."""
    p = np.array([[1 - weak, weak]] * n)
    p[list(correct_on)] = [strong, 1 - strong]
    return {"none": p, "flip": p.copy()}


def test_rank_ensembles_finds_complementary_models():
    labels = np.zeros(4, dtype=int)
    a, b = _model([0, 1]), _model([2, 3])
    c = {m: np.array([[0.0, 1.0]] * 4) for m in ("none", "flip")}  # confidently wrong everywhere
    rows = rank_ensembles([a, b, c], labels)
    assert len(rows) == 7 * 2  # every non-empty subset of 3 models, under both modes
    assert rows[0] == {"models": [0, 1], "tta": "none", "accuracy": 1.0}  # a and b fix each other's errors
    assert rows[1] == {"models": [0, 1], "tta": "flip", "accuracy": 1.0}  # a tie goes to the cheaper TTA
    assert {tuple(r["models"]) for r in rows if r["accuracy"] == 0.5} == {(0,), (1,)}  # ties: fewer models first
    assert [r["accuracy"] for r in rows] == sorted((r["accuracy"] for r in rows), reverse=True)
    assert all(r["accuracy"] == 0.0 for r in rows if 2 in r["models"])  # c outvotes even the pair
    assert rows[-1]["models"] == [0, 1, 2]  # the last of the worst: the most models
    singles = rank_ensembles([a, b, c], labels, max_size=1)
    assert len(singles) == 3 * 2 and singles[0]["models"] == [0]


def test_select_ensemble_scores_as_evaluate_does(trained_run, synthetic_cache):
    best, last = trained_run / "best.pt", trained_run / "last.pt"
    rows = select_ensemble([best, last], synthetic_cache, modes=("none", "flip"), top=100, device="cpu")
    assert len(rows) == 3 * 2
    assert sorted(tuple(r["checkpoints"]) for r in rows if r["tta"] == "none") == sorted(
        [(str(best),), (str(last),), (str(best), str(last))]
    )
    for row in rows:
        res = evaluate_checkpoints(row["checkpoints"], synthetic_cache, "PublicTest", tta=row["tta"], device="cpu")
        assert (row["accuracy"], row["macro_f1"]) == (res["accuracy"], pytest.approx(res["macro_f1"]))
    assert len(select_ensemble([best, last], synthetic_cache, top=1, device="cpu")) == 1
    with pytest.raises(ValueError, match="1 to 14 candidate models"):
        select_ensemble([best] * 15, synthetic_cache, device="cpu")


def test_one_macro_f1_and_valid_json_when_classes_are_missing(trained_run, synthetic_cache, tmp_path):
    from ferkit.evaluate import format_summary

    best = trained_run / "best.pt"
    (row,) = select_ensemble([best], synthetic_cache, modes=("none",), device="cpu", limit=5)  # some classes absent
    res = evaluate_checkpoints([best], synthetic_cache, "PublicTest", device="cpu", limit=5)
    assert row["macro_f1"] == pytest.approx(res["macro_f1"])
    assert res["report"]["macro avg"]["f1-score"] == pytest.approx(res["macro_f1"])  # one macro-F1 in the JSON
    evaluate_checkpoints([best], synthetic_cache, "PublicTest", device="cpu", limit=1, out=tmp_path)
    assert not (tmp_path / "PublicTest.json").exists()  # a subset's report is named for it, not for the split
    text = (tmp_path / "PublicTest_limit1.json").read_text()  # one image: no class has a ROC curve
    assert "NaN" not in text and json.loads(text)["macro_auc"] is None and json.loads(text)["limit"] == 1
    summary = format_summary(json.loads(text))
    assert "macro-AUC -" in summary
    absent = [line.split() for line in summary.splitlines() if line.endswith(" 0")]  # classes not in the subset
    assert len(absent) == 6 and all(row[1:] == ["-", "-", "-", "-", "0"] for row in absent)  # not 0.000: no score
    # a --limit of more than the split's 28 images evaluates the whole split, and says so by its name
    evaluate_checkpoints([best], synthetic_cache, "PublicTest", device="cpu", limit=500, out=tmp_path)
    assert json.loads((tmp_path / "PublicTest.json").read_text())["n"] == 28
    assert json.loads((tmp_path / "PublicTest.json").read_text())["limit"] == 0
    assert not (tmp_path / "PublicTest_limit500.json").exists()


def test_models_with_other_classes_are_not_scored_on_fer2013(trained_run, synthetic_cache, tmp_path):
    from ferkit.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(trained_run / "best.pt")
    swapped = save_checkpoint(tmp_path / "swapped.pt", {**state, "classes": [*CLASSES[1:], CLASSES[0]]})
    with pytest.raises(ValueError, match=r"swapped.pt: its classes disgust, .*, angry are not FER-2013's"):
        evaluate_checkpoints([swapped], synthetic_cache, split="PublicTest", device="cpu")


def test_an_empty_split_is_named(trained_run, tmp_path):
    from conftest import synthetic_data

    from ferkit.data import save_cache

    cache = save_cache(synthetic_data({"Training": 2, "PublicTest": 1, "PrivateTest": 0}), tmp_path / "no_private.npz")
    with pytest.raises(ValueError, match=f"{cache}: no PrivateTest images to evaluate on"):
        evaluate_checkpoints([trained_run / "best.pt"], cache, split="PrivateTest", device="cpu")


def test_evaluation_shows_progress_per_model(trained_run, synthetic_cache, capsys):
    best, last = trained_run / "best.pt", trained_run / "last.pt"
    evaluate_checkpoints([best, last], synthetic_cache, split="PublicTest", device="cpu")
    err = capsys.readouterr().err
    assert f"PublicTest 1/2 {best}" in err and f"PublicTest 2/2 {last}" in err


def test_prediction_cache_reuses_a_models_probabilities(trained_run, synthetic_cache, tmp_path, monkeypatch):
    import ferkit.evaluate as ev

    best, last, cache = trained_run / "best.pt", trained_run / "last.pt", tmp_path / "cache"
    first = evaluate_tta([best], synthetic_cache, "PrivateTest", modes=("none",), device="cpu", cache=cache)
    (entry,) = cache.glob("*.npz")
    calls = []
    real = ev.predict_proba_modes
    monkeypatch.setattr(ev, "predict_proba_modes", lambda *a, **k: calls.append(a[4]) or real(*a, **k))

    again = evaluate_tta([best], synthetic_cache, "PrivateTest", modes=("none",), device="cpu", cache=cache)
    assert calls == [] and again["none"]["confusion_matrix"] == first["none"]["confusion_matrix"]
    assert again["none"]["roc"] == first["none"]["roc"]

    # another file, another split or a mode not kept yet runs the model; what was kept stays
    evaluate_tta([last], synthetic_cache, "PrivateTest", modes=("none",), device="cpu", cache=cache)
    select_ensemble([best], synthetic_cache, ("none",), device="cpu", cache=cache)
    evaluate_tta([best], synthetic_cache, "PrivateTest", modes=("flip",), device="cpu", cache=cache)
    assert calls == [("none",), ("none",), ("none", "flip")] and len(list(cache.glob("*.npz"))) == 3
    with np.load(entry) as f:
        assert sorted(f.files) == ["flip", "none"]

    # a damaged entry is computed again and replaced
    entry.write_bytes(b"not an npz")
    evaluate_tta([best], synthetic_cache, "PrivateTest", modes=("none",), device="cpu", cache=cache)
    assert calls[-1] == ("none",) and len(calls) == 4
    with np.load(entry) as f:
        assert np.allclose(f["none"].sum(1), 1.0)

    # so is one whose compressed stream is corrupt (zlib.error, not one of numpy's own errors)
    np.savez_compressed(entry, none=np.full((4, 7), 1 / 7))
    damaged = bytearray(entry.read_bytes())
    damaged[50:80] = b"\xff" * 30  # inside the deflate stream: the zip directory stays readable
    entry.write_bytes(bytes(damaged))
    with pytest.raises(zlib.error), np.load(entry) as f:
        f["none"]
    evaluate_tta([best], synthetic_cache, "PrivateTest", modes=("none",), device="cpu", cache=cache)
    assert len(calls) == 5

    # and one holding NaNs (it stopped the run with "best.pt: its probabilities are NaN ... (diverged?)")
    with np.load(entry) as f:
        kept = dict(f)
    kept["none"][0, 0] = np.nan
    np.savez(entry, **kept)
    evaluate_tta([best], synthetic_cache, "PrivateTest", modes=("none",), device="cpu", cache=cache)
    assert len(calls) == 6


def test_prediction_cache_keeps_the_narrower_modes_of_the_widest(trained_run, synthetic_cache, tmp_path, monkeypatch):
    """`evaluate --tta flip` kept only flip, so `select-ensemble --tta none flip` ran the model again, although
    the flip views hold the plain image's: every mode up to the widest is kept now, and matches a plain run."""
    import ferkit.evaluate as ev

    best, cache = trained_run / "best.pt", tmp_path / "cache"
    evaluate_tta([best], synthetic_cache, "PublicTest", modes=("flip",), device="cpu", cache=cache)
    calls = []
    real = ev.predict_proba_modes
    monkeypatch.setattr(ev, "predict_proba_modes", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    cached = select_ensemble([best], synthetic_cache, ("none", "flip"), device="cpu", cache=cache)
    assert calls == []
    assert cached == select_ensemble([best], synthetic_cache, ("none", "flip"), device="cpu")


def test_output_folders_that_are_files_are_refused_before_any_model_runs(trained_run, synthetic_cache, tmp_path):
    a_file = tmp_path / "one.jpg"
    a_file.write_bytes(b"x")
    for option, kwargs in (("--out", {"out": a_file}), ("--cache", {"cache": a_file})):
        with pytest.raises(ValueError, match=re.escape(f"{option} {a_file}: {a_file} is a file, not a folder")):
            evaluate_tta([trained_run / "best.pt"], synthetic_cache, "PrivateTest", device="cpu", **kwargs)
        below = {k: a_file / "sub" for k in kwargs}  # failed after the models ran: "Not a directory"
        with pytest.raises(ValueError, match=re.escape(f"{option} {a_file / 'sub'}: {a_file} is a file, not a folder")):
            evaluate_tta([trained_run / "best.pt"], synthetic_cache, "PrivateTest", device="cpu", **below)


def test_reports_give_the_accuracy_without_the_copies_of_training_images(trained_run, tmp_path):
    """288 of PrivateTest's images are copies of Training images, which a model has learnt (the shipped one got 95%
    of them right, 71% of the others): the report gives the accuracy on the others too."""
    data = synthetic_data({"Training": 16, "PublicTest": 4, "PrivateTest": 4})
    private, training = (np.flatnonzero(data.splits == SPLITS.index(s)) for s in ("PrivateTest", "Training"))
    data.images[private[:5]] = data.images[training[:5]]
    cache = save_cache(data, tmp_path / "leaky.npz")
    best = trained_run / "best.pt"
    result = evaluate_checkpoints([best], cache, "PrivateTest", tmp_path / "eval", device="cpu")
    probs, labels = split_probabilities(best, cache, "PrivateTest", device="cpu")
    right = probs.argmax(1) == labels
    assert result["unseen"]["n"] == len(labels) - 5
    assert result["unseen"]["accuracy"] == pytest.approx(right[5:].mean())
    assert result["accuracy"] == pytest.approx(right.mean())
    assert json.loads((tmp_path / "eval" / "PrivateTest.json").read_text())["unseen"] == result["unseen"]
    assert f"(n={len(labels) - 5}; the other 5 are copies of Training images)" in format_summary(result)
    for copies, said in ((1, "the other 1 is a copy of a Training image)"), (0, "none is a copy of a Training image)")):
        unseen = {**result["unseen"], "n": result["n"] - copies}  # 'the other 1 are copies', 'the other 0 are'
        assert f"(n={unseen['n']}; {said}" in format_summary({**result, "unseen": unseen})
    assert evaluate_checkpoints([best], cache, "Training", device="cpu", limit=20)["unseen"] is None


def test_read_only_output_folders_are_refused_before_a_model_runs(trained_run, synthetic_cache, tmp_path, monkeypatch):
    """A read-only --out or --cache failed only once the models had run (minutes of ten-crop on a CPU)."""
    import ferkit.evaluate as ev

    monkeypatch.setattr(ev, "load_for_evaluation", lambda *a: pytest.fail("a model was loaded"))
    for option, folder in (("out", tmp_path / "eval"), ("cache", tmp_path / "cache")):
        with read_only_filesystem(monkeypatch), pytest.raises(OSError, match=re.escape(str(folder))):
            evaluate_tta([trained_run / "best.pt"], synthetic_cache, "PrivateTest", device="cpu", **{option: folder})


def test_a_read_only_cache_that_holds_every_entry_serves_them(trained_run, synthetic_cache, tmp_path, monkeypatch):
    """The check for a writable --cache refused a shared, read-only cache that needed no new entry."""
    best, cache = trained_run / "best.pt", tmp_path / "cache"
    first = evaluate_tta([best], synthetic_cache, "PrivateTest", device="cpu", cache=cache)["none"]
    with read_only_filesystem(monkeypatch):
        again = evaluate_tta([best], synthetic_cache, "PrivateTest", device="cpu", cache=cache)["none"]
    assert again["accuracy"] == first["accuracy"]


def test_a_failed_evaluation_leaves_no_empty_folders(trained_run, tmp_path):
    """The checks that --out and --cache can be written made them, and a run that failed next left them empty."""
    out, cache = tmp_path / "reports" / "eval", tmp_path / "cache"
    with pytest.raises(DataError, match="no such file"):
        evaluate_tta([trained_run / "best.pt"], tmp_path / "none.npz", "PrivateTest", out, device="cpu", cache=cache)
    assert list(tmp_path.iterdir()) == []


def test_an_out_folder_of_another_model_s_reports_is_refused(trained_run, synthetic_cache, tmp_path, monkeypatch):
    """A second model's reports went into the first's folder: each file replaced, the other TTAs' left, mixed."""
    import ferkit.evaluate

    titles = []
    real = ferkit.evaluate.plot_confusion
    monkeypatch.setattr(ferkit.evaluate, "plot_confusion", lambda *a: titles.append(a[3]) or real(*a))
    out, best, last = tmp_path / "eval", trained_run / "best.pt", trained_run / "last.pt"
    evaluate_tta([best], synthetic_cache, "PublicTest", out, ("none", "flip"), device="cpu", limit=10)
    assert titles[0] == "run on PublicTest, a 10-image subset, TTA none"  # the plots say what they are
    with pytest.raises(ValueError, match=re.escape(f"--out {out}: holds PublicTest_limit10.json, a report of {best}")):
        evaluate_tta([last], synthetic_cache, "PublicTest", out, device="cpu", limit=10)
    copy = tmp_path / "elsewhere.pt"  # the same weights in another file, or the same file retrained: its own
    shutil.copy(best, copy)
    evaluate_tta([copy], synthetic_cache, "PublicTest", out, device="cpu", limit=10)
    evaluate_tta([copy], synthetic_cache, "PublicTest", out, device="cpu", limit=10)
    retrained = tmp_path / "moved_run" / "elsewhere.pt"  # a resumed run's file, after the run was moved
    retrained.parent.mkdir()
    shutil.copy(last, retrained)
    out2 = tmp_path / "eval2"
    evaluate_tta([copy], synthetic_cache, "PublicTest", out2, device="cpu", limit=10)
    (out2 / "notes.json").write_text('{"checkpoints": [null]}')  # not a report: ignored
    evaluate_tta([retrained], synthetic_cache, "PublicTest", out2, device="cpu", limit=10)


def test_prediction_cache_drops_a_models_entries_of_older_versions(trained_run, synthetic_cache, tmp_path):
    from ferkit.evaluate import CACHE_VERSION

    best, cache = trained_run / "best.pt", tmp_path / "cache"
    evaluate_tta([best], synthetic_cache, "PrivateTest", modes=("none",), device="cpu", cache=cache)
    (entry,) = cache.glob("*.npz")
    key = entry.name.removesuffix(f"-v{CACHE_VERSION}.npz")
    unversioned, older = cache / f"{key}.npz", cache / f"{key}-v{CACHE_VERSION - 1}.npz"
    newer = cache / f"{key}-v{CACHE_VERSION + 1}.npz"  # a newer ferkit sharing the folder keeps its entry
    other_model = cache / f"0123456789abcdef-{key.split('-', 1)[1]}-v{CACHE_VERSION - 1}.npz"
    for path in (unversioned, older, newer, other_model):
        shutil.copy(entry, path)
    entry.unlink()
    evaluate_tta([best], synthetic_cache, "PrivateTest", modes=("none",), device="cpu", cache=cache)
    assert sorted(p.name for p in cache.glob("*.npz")) == sorted([entry.name, newer.name, other_model.name])


def test_prediction_cache_keeps_nothing_for_a_file_replaced_while_loading(
    trained_run, synthetic_cache, tmp_path, monkeypatch
):
    import ferkit.evaluate as ev

    ck, cache = tmp_path / "model.pt", tmp_path / "cache"
    shutil.copy(trained_run / "best.pt", ck)
    real = ev.load_for_evaluation

    def load_then_replace(path):
        loaded = real(path)
        shutil.copy(trained_run / "last.pt", ck)  # another run's checkpoint lands under the same name
        return loaded

    monkeypatch.setattr(ev, "load_for_evaluation", load_then_replace)
    with pytest.raises(ValueError, match="model.pt: the file changed while it was evaluated"):  # whose numbers?
        evaluate_tta([ck], synthetic_cache, "PrivateTest", modes=("none",), device="cpu", cache=cache, out=tmp_path)
    assert not list(cache.glob("*.npz")) and not list(tmp_path.glob("*.json"))  # the report named the old digest


def test_prediction_cache_knows_weights_kept_beside_an_onnx_file(synthetic_cache, tmp_path):
    """An ONNX model whose weights lie in a .data file beside it (torch's export without external_data=False)
    was cached under its .onnx file's bytes: other weights put beside it were given the first ones' numbers."""
    import onnx
    from helpers_inference import make_checkpoint

    from ferkit.export import export_onnx

    def external(seed: int, folder: Path) -> Path:
        model = onnx.load(str(export_onnx(make_checkpoint(tmp_path / f"{seed}.pt", seed=seed), tmp_path / "e.onnx")))
        folder.mkdir()
        onnx.save_model(model, str(folder / "m.onnx"), save_as_external_data=True, location="m.onnx.data")
        return folder / "m.onnx"

    a, b = external(0, tmp_path / "a"), external(1, tmp_path / "b")
    cache = tmp_path / "cache"
    run = dict(modes=("none",), device="cpu", cache=cache)
    first = evaluate_tta([a], synthetic_cache, "PrivateTest", **run)["none"]
    shutil.copy(b.with_suffix(".onnx.data"), a.with_suffix(".onnx.data"))  # a's .onnx file as it was, b's weights
    second = evaluate_tta([a], synthetic_cache, "PrivateTest", **run)["none"]
    fresh = evaluate_tta([a], synthetic_cache, "PrivateTest", modes=("none",), device="cpu")["none"]  # no cache
    assert second["digests"] != first["digests"] and len(list(cache.glob("*.npz"))) == 2
    assert second["confusion_matrix"] == fresh["confusion_matrix"] != first["confusion_matrix"]


def test_file_digest_is_the_sha256_of_the_bytes(tmp_path):
    from ferkit.fileio import file_digest

    path = tmp_path / "blob"
    data = bytes(range(256)) * 9000  # more than one read block
    path.write_bytes(data)
    assert file_digest(path) == hashlib.sha256(data).hexdigest()[:16]


def test_a_foreign_metrics_csv_beside_the_model_costs_only_the_plot(trained_run, synthetic_cache, tmp_path, capsys):
    """A metrics.csv of other columns (or text, or bytes that are not UTF-8) beside the model crashed evaluate
    after its report was written."""
    (tmp_path / "best.pt").write_bytes((trained_run / "best.pt").read_bytes())
    header = b"epoch,train_loss,val_loss,train_acc,val_acc\n"
    for text in (b"epoch,loss\n1,0.5\n", header + b"warmup,1,1,0.1,0.1\n", header + b"\xff,1,1,0.1,0.1\n"):
        (tmp_path / "metrics.csv").write_bytes(text)
        out = tmp_path / "eval"
        res = evaluate_checkpoints([tmp_path / "best.pt"], synthetic_cache, "PublicTest", out, device="cpu")
        assert (tmp_path / "eval" / "PublicTest.json").is_file() and res["n"] == 28
        assert "not a ferkit run's metrics" in capsys.readouterr().err
        assert not (tmp_path / "eval" / "training_curves.png").exists()
