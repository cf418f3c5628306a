"""The model card and the README results block, generated from evaluation JSON."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from ferkit.card import RESULTS_END, RESULTS_START, readme_with_results, render_model_card, results_table
from ferkit.evaluate import evaluate_tta


@pytest.fixture(scope="module")
def reports(trained_run, synthetic_cache, tmp_path_factory):
    """The PrivateTest reports (flip, none) of trained_run's best.pt exported as my_model.onnx."""
    from ferkit.export import export_onnx

    out = tmp_path_factory.mktemp("reports")
    onnx = export_onnx(trained_run / "best.pt", out / "my_model.onnx")
    evaluate_tta([onnx], synthetic_cache, "PrivateTest", out, ("flip", "none"), device="cpu")
    return [out / "PrivateTest_tta-flip.json", out / "PrivateTest.json"]


def test_model_card_quotes_the_run_and_its_numbers(trained_run, reports, tmp_path, monkeypatch):
    import ferkit.card
    from ferkit.export import export_onnx

    onnx = export_onnx(trained_run / "best.pt", tmp_path / "my_model.onnx")
    card = render_model_card(trained_run, onnx, reports, "ferkit train --x", "a test machine")
    head = json.loads(reports[0].read_text())
    assert card.startswith("# Model card: my_model\n")  # "(shipped default)" only for a file shipped in weights/
    monkeypatch.setattr(ferkit.card, "WEIGHTS_DIR", tmp_path / "weights")  # the same file, as if shipped
    shipped = export_onnx(trained_run / "best.pt", tmp_path / "weights" / "my_model.onnx")
    card_shipped = render_model_card(trained_run, shipped, reports, "ferkit train --x", "a test machine")
    assert card_shipped.startswith("# Model card: my_model (shipped default)\n")
    assert "`ferkit train --x`" in card and "Hardware: a test machine" in card and "MiB, ONNX, float32," in card
    reproduce = f"ferkit evaluate {onnx.as_posix()} --data data/fer2013.npz --split PrivateTest --tta flip none"
    assert f"`{reproduce} --out reports/my_model`" in card  # the folder the card's numbers come from
    assert f"| my_model | PrivateTest | flip | {head['accuracy']:.2%} | {head['unseen']['accuracy']:.2%} |" in card
    assert "0 of the 28 PrivateTest images are copies, pixel for pixel, of Training images" in card  # none here
    assert "| teacher |" not in card  # no distillation in this run
    # a run on a subset says so (every card said 28,709 images), and shows its limit
    assert "Training split (a 64-image subset of its 28,709)" in card and "| train_limit | `64` |" in card
    assert all(f"| {c} |" in card for c in head["report"] if c in ("angry", "disgust", "neutral"))


def test_the_card_refuses_reports_of_other_images_or_one_row_twice(trained_run, synthetic_cache, reports, tmp_path):
    """A "PrivateTest" report scored on another data file (PublicTest's labels as PrivateTest's, say) was quoted
    beside the real ones, and a copied report gave its row twice: reports name the images they scored."""
    import shutil

    from conftest import synthetic_data

    from ferkit.data import save_cache
    from ferkit.export import export_onnx

    onnx = export_onnx(trained_run / "best.pt", tmp_path / "my_model.onnx")
    other = synthetic_data({"Training": 16, "PublicTest": 4, "PrivateTest": 4}, seed=5)  # as many, other pixels
    save_cache(other, tmp_path / "other.npz")
    evaluate_tta([onnx], tmp_path / "other.npz", "PrivateTest", tmp_path / "other", ("none",), device="cpu")
    ours, theirs = (json.loads(p.read_text())["images"] for p in (reports[1], tmp_path / "other/PrivateTest.json"))
    assert ours != theirs
    with pytest.raises(ValueError, match=r"other PrivateTest images than another report's"):
        render_model_card(trained_run, onnx, [reports[0], tmp_path / "other/PrivateTest.json"], "x", "y")
    copy = shutil.copy(reports[1], tmp_path / "copy.json")
    with pytest.raises(ValueError, match=r"copy\.json: a second report of PrivateTest with TTA none"):
        render_model_card(trained_run, onnx, [*reports, copy], "x", "y")


def test_model_card_names_the_initial_weights_and_the_teachers(trained_run, synthetic_cache, reports, tmp_path):
    from conftest import tiny_config

    from ferkit.export import export_onnx
    from ferkit.training import train

    teacher = str(trained_run / "best.pt")
    run = tmp_path / "finetune"
    train(tiny_config(synthetic_cache, run, epochs=1, init_weights=teacher, teacher=[teacher], distill_cache=True,
                      geometry=0.5))  # fmt: skip
    onnx = export_onnx(run / "best.pt", tmp_path / "my_model.onnx")
    evaluate_tta([onnx], synthetic_cache, "PrivateTest", tmp_path, ("none",), device="cpu")
    card = render_model_card(run, onnx, [tmp_path / "PrivateTest.json"], "ferkit train --y", "a test machine")
    assert f"| init_weights | `{teacher}` |" in card and f"| teacher | `['{teacher}']` |" in card
    assert "| distill_cache | `True` |" in card and "| geometry | `0.5` |" in card  # a recipe's, not shown before
    assert f"Started from the weights in `{teacher}`, whose own training is not counted here." in card


def test_a_report_from_before_copies_were_counted_still_makes_a_card(trained_run, reports, tmp_path):
    """Reports written before `unseen` existed (the kept models') still make a card and a table row."""
    from ferkit.export import export_onnx

    old = []
    for r in reports:
        old.append(tmp_path / r.name)
        old[-1].write_text(json.dumps({k: v for k, v in json.loads(r.read_text()).items() if k != "unseen"}))
    card = render_model_card(trained_run, export_onnx(trained_run / "best.pt", tmp_path / "my_model.onnx"), old,
                             "ferkit train --x", "a test machine")  # fmt: skip
    assert "this report predates counting them" in card
    assert re.search(r"\| my_model \| PrivateTest \| flip \| [\d.]+% \| – \|", card)
    all_copies = json.loads(reports[0].read_text()) | {"unseen": None}  # every image a Training image
    (tmp_path / "copies.json").write_text(json.dumps(all_copies))
    card = render_model_card(trained_run, tmp_path / "my_model.onnx", [tmp_path / "copies.json"], "ferkit", "here")
    assert f"Every one of the {all_copies['n']:,} {all_copies['split']} images is a Training image." in card


def test_readme_results_replace_only_the_results_block(reports, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{RESULTS_START}\nold table\n{RESULTS_END}\noutro\n")
    text = readme_with_results(readme, reports, reports[0].parent / "my_model.onnx")
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old table" not in text
    assert text.count("| my_model | PrivateTest |") == 2
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="results"):
        readme_with_results(readme, reports, reports[0].parent / "my_model.onnx")


def test_the_card_quotes_only_reports_of_its_model(trained_run, synthetic_cache, reports, tmp_path, capsys):
    """A ranking gave a KeyError traceback; an ensemble's, another model's, a 21-image subset's and a
    PublicTest headline's numbers went into the card as this model's; another model's report was taken for
    this one's when its file had the same name (every run's best.pt has)."""
    from ferkit.cli import main

    onnx = reports[0].parent / "my_model.onnx"
    head = json.loads(reports[0].read_text())
    other = {"checkpoints": ["runs/x/my_model.onnx"], "digests": ["0" * 16]}
    bad = {
        "ranking.json": ({"split": "PublicTest", "ranking": []}, "not a report of `ferkit evaluate` (no model,"),
        "ensemble.json": ({**head, "checkpoints": ["a.onnx", "b.onnx"]}, "an ensemble of 2 models, not of one"),
        "other.json": ({**head, **other}, f"the report of runs/x/my_model.onnx, not of {onnx}"),
        "subset.json": ({**head, "n": 21}, "21 PrivateTest images, another report has 28"),
        "limit.json": ({**head, "limit": 5, "n": 5}, "the report of a 5-image subset of PrivateTest, not of the whole"),
        "old.json": ({k: v for k, v in head.items() if k != "digests"}, "(an older report, which names no model dig"),
        "public.json": ({**head, "split": "PublicTest"}, "the card's headline (the first report) must be on Priv"),
    }
    for name, (report, message) in bad.items():
        (tmp_path / name).write_text(json.dumps(report))
        paths = [tmp_path / name] if name == "public.json" else [reports[0], tmp_path / name]
        with pytest.raises(ValueError, match=re.escape(message)):
            render_model_card(trained_run, onnx, paths, "x", "y")
    # the card and the README are both checked before either is written
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    argv = [
        "card",
        "--run",
        str(trained_run),
        "--onnx",
        str(onnx),
        "--reports",
        *map(str, reports),
        "--command",
        "x",
        "--hardware",
        "y",
    ]
    assert main([*argv, "--out", str(tmp_path / "CARD.md"), "--readme", str(readme)]) == 2
    assert "no <!-- results:start -->" in capsys.readouterr().err and not (tmp_path / "CARD.md").exists()


def test_model_card_of_a_run_without_epochs_is_an_error(trained_run, reports, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes((trained_run / "best.pt").read_bytes())
    (run / "metrics.csv").write_text("epoch,val_acc\n")
    with pytest.raises(ValueError, match="metrics.csv: no epochs recorded"):
        render_model_card(run, reports[0].parent / "my_model.onnx", reports, "ferkit train", "a test machine")


def test_model_card_of_a_run_whose_checkpoints_are_gone_reads_its_config_yaml(trained_run, reports, tmp_path):
    """Training writes config.yaml beside its logs: the card of a run kept without checkpoints is the same."""
    import shutil

    from ferkit.export import export_onnx

    onnx = export_onnx(trained_run / "best.pt", tmp_path / "my_model.onnx")
    logs_only = tmp_path / "logs_only"
    logs_only.mkdir()
    shutil.copy(trained_run / "metrics.csv", logs_only)
    with pytest.raises(ValueError, match="none of config.yaml, best.pt"):
        render_model_card(logs_only, onnx, reports, "ferkit train --x", "a test machine")
    shutil.copy(trained_run / "config.yaml", logs_only)
    card = render_model_card(logs_only, onnx, reports, "ferkit train --x", "a test machine")
    same = render_model_card(trained_run, onnx, reports, "ferkit train --x", "a test machine")
    assert card == same.replace(f"--run {trained_run}`", f"--run {logs_only}`")  # the header names the folder read
    # config.yaml is the recipe of the run's latest start (a resume to more epochs), best.pt's may be older
    resumed = tmp_path / "resumed"
    shutil.copytree(trained_run, resumed)
    text = (resumed / "config.yaml").read_text()
    (resumed / "config.yaml").write_text(text.replace("epochs: 2\n", "epochs: 9\n", 1))
    assert "| epochs | `9` |" in render_model_card(resumed, onnx, reports, "ferkit train --x", "a test machine")
    # a run from an older ferkit, whose config has a field this one no longer knows, still gets its card
    with open(logs_only / "config.yaml", "a", encoding="utf-8") as f:
        f.write("a_removed_option: 3\n")
    assert render_model_card(logs_only, onnx, reports, "ferkit train --x", "a test machine") == card
    # and one written before a field existed gets that field's default
    lines = (logs_only / "config.yaml").read_text().splitlines()
    (logs_only / "config.yaml").write_text("\n".join(x for x in lines if not x.startswith("sampler:")) + "\n")
    assert render_model_card(logs_only, onnx, reports, "ferkit train --x", "a test machine") == card
    (logs_only / "config.yaml").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="config.yaml: expected a mapping of config fields"):
        render_model_card(logs_only, onnx, reports, "ferkit train --x", "a test machine")
    (logs_only / "config.yaml").write_text("epochs: 2\nepochs: 3\n")  # read as training reads it
    with pytest.raises(ValueError, match="'epochs' given twice"):
        render_model_card(logs_only, onnx, reports, "ferkit train --x", "a test machine")
    (logs_only / "config.yaml").write_text("epochs: 2\n")
    with pytest.raises(ValueError, match="config.yaml: not a training config"):
        render_model_card(logs_only, onnx, reports, "ferkit train --x", "a test machine")


def test_model_card_says_when_the_class_weights_were_undone(trained_run, synthetic_cache, reports, tmp_path):
    """... and refuses a power other than the run's: the card said the copy divided out the weights of a loss
    trained with its power, beside a table of the run's options that showed another."""
    from ferkit.export import export_onnx, undo_class_weights

    onnx = export_onnx(trained_run / "best.pt", tmp_path / "plain" / "my_model.onnx")
    assert "undo-class-weights" not in render_model_card(trained_run, onnx, reports, "x", "y")
    for power in (0.5, 0.75):  # the run's class_weight_power, another
        undone = undo_class_weights(onnx, tmp_path / str(power) / "my_model.onnx", [4, 1, 4, 7, 5, 3, 5], power)
        evaluate_tta([undone], synthetic_cache, "PrivateTest", tmp_path / str(power), ("none",), device="cpu")
        report = [tmp_path / str(power) / "PrivateTest.json"]
        if power == 0.5:
            card = render_model_card(trained_run, undone, report, "x", "y")
            assert "the Training class counts to the power 0.5 (`ferkit export --undo-class-weights 0.5`)" in card
        else:
            with pytest.raises(ValueError, match="undone with power 0.75, but the run was weighted with power 0.5"):
                render_model_card(trained_run, undone, report, "x", "y")


def test_model_card_gives_the_fitted_prior_offsets(trained_run, synthetic_cache, reports, tmp_path):
    from ferkit.export import export_onnx, fit_prior, read_metadata

    onnx = export_onnx(trained_run / "best.pt", tmp_path / "plain" / "my_model.onnx")
    assert "--fit-prior" not in render_model_card(trained_run, onnx, reports, "x", "y")
    labels = np.arange(70) % 7
    probs = np.full((70, 7), 0.1)
    probs[np.arange(70), labels] = 0.4  # the model's answers do not matter here, only the offsets fit to them
    probs[:, 1] /= 4  # a tilt against disgust: its offset is the largest
    fitted = fit_prior(onnx, tmp_path / "fit" / "my_model.onnx", probs, labels, "PublicTest")
    evaluate_tta([fitted], synthetic_cache, "PrivateTest", tmp_path / "fit", ("none",), device="cpu")
    card = render_model_card(trained_run, fitted, [tmp_path / "fit" / "PrivateTest.json"], "x", "y")
    offsets = read_metadata(fitted)["prior_fitted"]["offsets"]
    assert offsets.index(0.0) == 1
    assert "At export its logits were shifted by one offset per class, fit on PublicTest (`ferkit export " in card
    assert ", ".join(f"{b:+.2f}" for b in offsets) + "." in card


def test_results_table_of_a_report_without_roc_curves(reports):
    report = json.loads(reports[0].read_text())
    table = results_table([{**report, "macro_auc": None}], label="m")  # evaluate writes null: no class had a curve
    assert "| m | " in table and "| – |" in table


def test_the_card_refuses_an_onnx_file_of_another_model(trained_run, synthetic_cache, reports, tmp_path):
    """The card described the run's ferkit_small for any ONNX file given (the shipped VGG, say)."""
    from ferkit.inference import DEFAULT_MODEL

    vgg = tmp_path / "vgg.onnx"
    vgg.write_bytes(DEFAULT_MODEL.read_bytes())
    evaluate_tta([vgg], synthetic_cache, "PrivateTest", tmp_path / "vgg", ("none",), device="cpu")
    with pytest.raises(ValueError, match=r"vgg\.onnx: a model ferkit_vgg .*, not the run's ferkit_small"):
        render_model_card(trained_run, vgg, [tmp_path / "vgg" / "PrivateTest.json"], "x", "y")


def test_the_card_refuses_an_export_of_another_run_of_the_same_network(trained_run, reports, tmp_path):
    """An ONNX file of run A given with run B's folder made a card of B's training with A's results."""
    import shutil

    import torch

    from ferkit.checkpoint import load_checkpoint, save_checkpoint, slim_checkpoint
    from ferkit.export import export_onnx, read_metadata

    mine = export_onnx(trained_run / "best.pt", tmp_path / "mine.onnx")
    assert read_metadata(mine)["weights_digest"]
    other = tmp_path / "other_run"
    shutil.copytree(trained_run, other)
    state = load_checkpoint(other / "best.pt")
    for weights in (state["state_dict"], state.get("ema_state_dict") or {}):
        for name, t in weights.items():
            if t.is_floating_point() and "running_var" not in name:  # a negative variance gives NaN scores
                t.add_(torch.randn_like(t))
    save_checkpoint(other / "best.pt", state)
    with pytest.raises(ValueError, match=re.escape(f"mine.onnx: exported from other weights than {other / 'best.pt'}")):
        render_model_card(other, mine, reports, "ferkit train --x", "a test machine")
    slim_checkpoint(trained_run / "best.pt", tmp_path / "half.pt", half=True)  # the run's own, slimmed to float16
    (tmp_path / "half.pt").replace(other / "best.pt")
    assert "## Results" in render_model_card(other, mine, reports, "ferkit train --x", "a test machine")
