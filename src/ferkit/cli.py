"""The ``ferkit`` command line: prepare, train, evaluate, select-ensemble, card, models, slim, export, predict,
serve."""

from __future__ import annotations

import _thread
import argparse
import contextlib
import dataclasses
import io
import json
import os
import shlex
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from .config import (
    CHECK_TOLERANCE,
    DETECTOR,
    HOST,
    MARGIN,
    MAX_PIXELS,
    MAX_THREADS,
    MIN_FACE,
    PORT,
    RESUMABLE_CHANGES,
    TTA,
    TTA_MODES,
    VIDEO_EVERY,
    AppSettings,
    TrainConfig,
)
from .data import SPLITS

if TYPE_CHECKING:
    from .media import Record


def _yaml_mapping(text: str) -> dict:
    """An argparse type: a YAML mapping such as ``{width: 0.5, dropout: 0.4}``."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"not valid YAML: {text!r}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a YAML mapping such as '{{width: 0.5}}', got {text!r}")
    if any(v is None for v in value.values()):
        raise argparse.ArgumentTypeError(f"{text!r} has a key without a value; write 'key: value', with a space")
    return value


def _count(minimum: int, maximum: int | None = None):
    """An argparse type: an integer of at least ``minimum`` (and at most ``maximum``)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _positive(text: str) -> float:
    """An argparse type: a number greater than 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


_positive.__name__ = "number"


def _camera(text: str) -> int | str:
    """An argparse type: a camera number (digits; at least 0: OpenCV crashed on -1), else a device path or a
    stream URL, kept as text."""
    return _count(0)(text) if text.lstrip("-").isdigit() else text


_camera.__name__ = "camera"


def _threads(text: str) -> int | None:
    """An argparse type: a thread count, 0 for the default (None), as ``train --threads 0`` means."""
    return _count(0, MAX_THREADS)(text) or None


_threads.__name__ = "number"  # argparse then says "invalid number value: 'x'"


def _add_evaluation_options(p: argparse.ArgumentParser) -> None:
    """``--cache`` and ``--no-progress``, which ``evaluate`` and ``select-ensemble`` share."""
    p.add_argument(
        "--cache",
        metavar="DIR",
        help="keep each model's probabilities in DIR, keyed by the SHA-256 of its file and of the images, "
        "and reuse them (a later ensemble or select-ensemble runs no model twice); clear DIR after changing "
        "ferkit's TTA or preprocessing code",
    )
    _add_no_progress(p)


def _add_no_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_image_options(p: argparse.ArgumentParser) -> None:
    """The face, crop and image-size options that ``predict`` and ``serve`` share."""
    p.add_argument(
        "--detector",
        default=DETECTOR,
        help="centerface (shipped), haar, a CenterFace or YuNet .onnx file or a Haar .xml cascade "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--margin",
        type=float,
        default=MARGIN,
        help="crop margin around each face box, a fraction of its side (default: %(default)s)",
    )
    p.add_argument(
        "--tta",
        default=TTA,
        choices=TTA_MODES,
        help="flip: average each face with its mirror; crops: ten-crop, 5x flip's model time (default: %(default)s)",
    )
    p.add_argument(
        "--min-face", type=_count(1), default=MIN_FACE, help="smallest face side in pixels (default: %(default)s)"
    )
    p.add_argument(
        "--max-pixels",
        type=_count(1),
        default=MAX_PIXELS,
        help="largest image in pixels, w x h; larger ones are refused (default: %(default)s)",
    )


def _add_config_options(p: argparse.ArgumentParser) -> None:
    """One ``--option`` per :class:`TrainConfig` field, with its help text; defaults come from the config."""
    for f in dataclasses.fields(TrainConfig):
        flags = [*(["-o"] if f.name == "out" else []), "--" + f.name.replace("_", "-")]  # -o as every command's
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        bounds = f"; in {f.metadata['bounds']}" if "bounds" in f.metadata else ""
        help_ = f"{f.metadata['help']} (default: {default!r}{bounds})"
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_}
        if f.type in ("bool", bool):
            p.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        elif f.type in ("dict", dict):
            p.add_argument(*flags, type=_yaml_mapping, metavar="YAML", **kw)
        elif f.type in ("list", list):
            p.add_argument(*flags, nargs="*", **kw)
        else:
            typ = {"int": int, "float": float, "str": str}[str(f.type)]
            p.add_argument(*flags, type=typ, choices=f.metadata.get("choices"), **kw)


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data import prepare

    data = prepare(args.src, args.out, progress=not args.no_progress)
    counts = data.counts()
    print(f"wrote {args.out}: {len(data)} images")
    for split, c in counts.items():
        print(f"  {split:<12}{sum(c.values()):>7}  " + "  ".join(f"{k} {v}" for k, v in c.items()))
    if empty := [split for split, c in counts.items() if not sum(c.values())]:  # a test/ folder left out, say
        print(f"ferkit prepare: warning: no {' or '.join(empty)} images in {args.src} (training needs Training "
              "images and PublicTest ones to pick its best epoch; PrivateTest gives the headline numbers)",
              file=sys.stderr)  # fmt: skip
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .training import train

    overrides = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    own = Path(overrides.get("out", TrainConfig().out)) / "config.yaml"
    if args.config:
        cfg = TrainConfig.from_yaml(args.config, options=overrides, **overrides)
    elif args.resume and (own.is_file() or (own.parent / "last.pt").is_file()):  # the run's own recipe
        cfg, dropped = TrainConfig.of_run(own.parent, ("last.pt", "config.yaml"), options=overrides, **overrides)
        if dropped:
            print(f"ferkit train: {own.parent}: ignoring {', '.join(dropped)} (no longer training options)",
                  file=sys.stderr)  # fmt: skip
    elif args.resume and "data" not in overrides:
        raise ValueError(
            f"no run to resume in {own.parent} (no config.yaml or last.pt there); give --data to start one"
        )
    else:
        cfg = TrainConfig.from_dict(overrides, options=overrides)
    if not cfg.data:
        raise ValueError("--data is required (or set `data:` in the --config file)")
    result = train(cfg, resume=args.resume)
    if result["evaluation"] is not None:
        _print_reports([result["evaluation"]])
    return 0


def _print_reports(reports: Iterable[dict[str, Any]]) -> None:
    """Each evaluation report's summary, and the file it was written to."""
    from .evaluate import format_summary

    for report in reports:
        print(f"{report['model']} on {report['split']} (TTA: {report['tta']})")
        print(format_summary(report))
        if "report_json" in report:
            print(f"report: {report['report_json']}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_tta, report_folder
    from .fileio import model_files

    checkpoints = model_files(*args.checkpoint, *(args.ensemble or []))
    out = Path(args.out) if args.out else report_folder(checkpoints)
    reports = evaluate_tta(checkpoints, args.data, args.split, out, args.tta, args.device, limit=args.limit,
                           cache=args.cache, progress=not args.no_progress)  # fmt: skip
    _print_reports(reports.values())
    return 0


def cmd_select_ensemble(args: argparse.Namespace) -> int:
    from .evaluate import select_ensemble
    from .fileio import atomic_write, check_writable, model_files

    if args.out:  # before any model runs: it failed after
        check_writable(args.out)
    candidates = [str(p) for p in model_files(*args.checkpoint)]
    rows = select_ensemble(
        candidates,
        args.data,
        args.tta,
        args.max_size,
        args.top,
        args.device,
        limit=args.limit,
        cache=args.cache,
        progress=not args.no_progress,
    )
    print(f"{'rank':>4}{'PublicTest':>12}{'macro-F1':>10}  {'TTA':<6}models")
    for i, row in enumerate(rows, 1):
        print(f"{i:>4}{row['accuracy']:>12.4f}{row['macro_f1']:>10.4f}  {row['tta']:<6}{' '.join(row['checkpoints'])}")
    best = rows[0]
    command = ["ferkit", "evaluate", *best["checkpoints"], "--data", args.data, "--split", "PrivateTest"]
    print(f"report the choice on PrivateTest with: {shlex.join([*command, '--tta', best['tta']])}")
    if args.out:
        ranked = {"split": "PublicTest", "limit": args.limit, "candidates": candidates, "ranking": rows}
        payload = json.dumps(ranked, indent=1)
        print(f"wrote {atomic_write(args.out, lambda f: f.write(payload.encode()))}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import MODELS, build_model, describe

    if args.checkpoint:
        from .checkpoint import model_from_checkpoint

        rows = []
        for path in args.checkpoint:
            model, state = model_from_checkpoint(path, finite=False)  # a diverged run's size is its size
            kwargs = " ".join(f"{k}={v}" for k, v in state["model_kwargs"].items())
            rows.append((path, f"{state['model']} {kwargs}".strip(), model))
    else:
        rows = [(name, name, build_model(name)) for name in MODELS]
    width = max(16, *(len(r[0]) + 2 for r in rows))
    print(f"{'model':<{width}}{'params (M)':>12}{'MFLOPs':>10}" + ("  architecture" if args.checkpoint else ""))
    for label, arch, model in rows:
        d = describe(model)
        print(f"{label:<{width}}{d['params_m']:>12.2f}{d['mflops']:>10.0f}" + (f"  {arch}" if args.checkpoint else ""))
    if not args.checkpoint:
        print(f"{'timm:<arch>':<{width}}any timm architecture (pip install timm), e.g. timm:resnet18")
    return 0


def cmd_slim(args: argparse.Namespace) -> int:
    from .checkpoint import slim_checkpoint

    out = slim_checkpoint(args.checkpoint, args.out, half=args.half)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import report_metrics

    if Path(args.out).suffix.lower() != ".onnx":  # `-o runs/x/last.pt` wrote ONNX bytes over a run's checkpoint
        raise ValueError(f"{args.out}: name the output *.onnx")
    if args.report and (correction := _correction(args)):
        raise ValueError(
            f"--report with {correction}: the corrected copy is another model; evaluate it, then copy it "
            "with its report (`ferkit export COPY.onnx -o SHIPPED.onnx --report REPORT.json`)"
        )
    if args.data and not (args.check or args.int8 or _correction(args)):  # it was ignored
        raise ValueError("--data is read only by --check, --int8, --undo-class-weights and --fit-prior")
    metrics = report_metrics(args.report, args.checkpoint) if args.report else {}
    if Path(args.checkpoint).suffix.lower() == ".onnx":
        _copy_onnx(args, metrics)
    else:
        _export_checkpoint(args, metrics)
    return 0


def _correction(args: argparse.Namespace) -> str | None:
    """The option of ``export`` that corrects an .onnx input's probabilities, if one is given."""
    if args.undo_class_weights is not None and args.fit_prior:
        raise ValueError("--undo-class-weights and --fit-prior: one correction at a time (--fit-prior can follow)")
    return "--undo-class-weights" if args.undo_class_weights is not None else "--fit-prior" if args.fit_prior else None


def _copy_onnx(args: argparse.Namespace, metrics: dict[str, Any]) -> None:
    """``export MODEL.onnx``: a copy with a report's metrics, or with its class weights undone or its prior fitted."""
    from .data import CLASSES, load_dataset
    from .export import check_fit_prior, fit_prior, read_metadata, undo_class_weights, with_metrics
    from .fileio import check_writable

    correction = _correction(args)
    if args.check or args.int8 or args.fp16 or not (args.report or correction):
        raise ValueError(
            "an .onnx input takes only --report (its metrics go into a copy's metadata), "
            "--undo-class-weights or --fit-prior (with --data)"
        )
    if args.report:  # cmd_export refused it with a correction
        out = with_metrics(args.checkpoint, args.out, metrics)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): {args.checkpoint} with the metrics of {args.report}")
        return
    if not args.data:
        what = "its PublicTest split" if args.fit_prior else "the class counts of its Training split"
        raise ValueError(f"{correction} needs --data: {what}")
    if (classes := read_metadata(args.checkpoint).get("classes")) and list(classes) != list(CLASSES):
        raise ValueError(f"{args.checkpoint}: classes {classes}, not in FER-2013's order (that of the data)")
    check_writable(args.out)  # before the model runs over PublicTest
    if args.fit_prior:
        from .evaluate import split_probabilities

        check_fit_prior(args.checkpoint, args.out)
        probs, labels = split_probabilities(args.checkpoint, args.data, "PublicTest", progress=not args.no_progress)
        out = fit_prior(args.checkpoint, args.out, probs, labels, "PublicTest")
        fitted = read_metadata(out)["prior_fitted"]
        print(f"wrote {out}: {args.checkpoint} with logit offsets {fitted['offsets']} fit on PublicTest")
        return
    labels = load_dataset(args.data, progress=not args.no_progress).split("Training")[1]
    counts = np.bincount(labels, minlength=len(CLASSES))
    out = undo_class_weights(args.checkpoint, args.out, counts, args.undo_class_weights)
    print(f"wrote {out}: {args.checkpoint} with its class weights undone (power {args.undo_class_weights})")


def _export_checkpoint(args: argparse.Namespace, metrics: dict[str, Any]) -> None:
    """``export CHECKPOINT.pt``: its ONNX file (with ``metrics``), checked against torch, and its fp16/int8 copies."""
    from .data import load_dataset
    from .export import check_outputs, copy_path, export_all

    if correction := _correction(args):
        raise ValueError(f"{correction} takes an exported .onnx: export the checkpoint first")
    if args.int8 and not args.data:
        raise ValueError("--int8 needs --data: int8 is calibrated on FER-2013 Training faces (random images ruin it)")
    check_outputs(args.out, args.fp16, args.int8)  # before minutes of decoding the data
    images = None
    if args.data and (args.check or args.int8):  # read before anything is written
        images, _ = load_dataset(args.data, progress=not args.no_progress).split("Training")
        if len(images) == 0:
            raise ValueError(f"{args.data}: no Training images to check and calibrate on")
    done = export_all(args.checkpoint, args.out, metrics, images, args.check, args.fp16, args.int8)
    if done.diff is not None:
        print(f"max |onnx - torch| on {done.checked} images: {done.diff:.2e}")
    for final in done.files:
        print(f"wrote {final} ({final.stat().st_size / 1e6:.2f} MB)")
    for precision, wanted in (("fp16", args.fp16), ("int8", args.int8)):
        if not wanted and (old := copy_path(args.out, precision)).exists():  # of other weights than OUT's now
            print(f"ferkit export: note: {old} is an earlier export's, not rewritten (without --{precision})",
                  file=sys.stderr)  # fmt: skip


def _print_records(records: Iterable[Record], fmt: str, classes: Sequence[str]) -> bool:
    """Print prediction records as a table, JSON lines or CSV (a column per class); returns whether any
    input failed."""
    import csv
    import itertools

    records = iter(records)
    first = next(records, None)  # a camera that cannot open fails here, before a header is printed
    records = itertools.chain([first] if first is not None else [], records)
    failed = False
    writer = csv.writer(sys.stdout) if fmt == "csv" else None
    face_columns = ["face", "x", "y", "w", "h", "emotion", "confidence", "whole_image", *classes]
    if writer:
        writer.writerow(["source", "frame", "time_s", *face_columns, "error"])
    elif fmt == "table":
        print(f"{'source':<40} {'frame':>6} {'face':>4}  {'box (x,y,w,h)':<24} {'emotion':<9} {'conf':>5}")
    for r in records:
        failed |= r.error is not None
        if fmt == "jsonl":
            print(_json(r.to_dict()), flush=True)
            continue
        frame = "" if r.frame is None else r.frame
        where = [r.source, frame, "" if r.time_s is None else f"{r.time_s:.3f}"]
        if writer and not r.faces:  # one row with the face columns blank, for an error or no face
            writer.writerow([*where, *[""] * len(face_columns), r.error or ""])
        elif r.error is not None:  # to stderr, as other tools' (`predict photos/ > table.txt` showed none)
            where = r.source + ("" if r.frame is None else f" frame {r.frame}")
            said = r.error if r.error.startswith(f"{r.source}:") else f"{where}: {r.error}"
            print(f"ferkit predict: error: {said}", file=sys.stderr, flush=True)
        elif not r.faces:
            print(f"{r.source:<40} {frame!s:>6} {'-':>4}  no face found")
        for i, f in enumerate(r.faces):  # none when r.error is set
            if writer:
                scores = (f"{f.scores[c]:.4f}" for c in classes)
                whole = int(f.whole_image)  # 1: no face found, the whole image classified (--fallback)
                writer.writerow([*where, i, *f.box, f.emotion, f"{f.confidence:.4f}", whole, *scores, ""])
            else:
                box = str(f.box) if not f.whole_image else "whole image"
                print(f"{r.source:<40} {frame!s:>6} {i:>4}  {box:<24} {f.emotion:<9} {f.confidence:>5.2f}")
        sys.stdout.flush()  # each image's or frame's rows as they come: a webcam's piped to another program
    return failed


def cmd_predict(args: argparse.Namespace) -> int:
    from .inference import EmotionRecognizer
    from .media import predict_camera, predict_paths

    if args.webcam is None and not args.paths:
        args.usage_error("give image/video/folder paths, or --webcam N|PATH|URL")
    if args.webcam is not None and (args.paths or args.annotate):
        args.usage_error("--webcam reads the camera only: it takes no paths and no --annotate")
    rec = EmotionRecognizer(
        args.model,
        backend=args.backend,
        detector=args.detector,
        margin=args.margin,
        threads=args.threads,
        max_pixels=args.max_pixels,
        tta=args.tta,
        min_face=args.min_face,
    )
    if args.webcam is not None:
        records = predict_camera(rec, args.webcam, args.every, args.fallback)
    else:
        records = predict_paths(
            rec, args.paths, args.every, args.annotate, args.fallback, progress=not args.no_progress
        )
    return 1 if _print_records(records, args.format, rec.classes) else 0


def cmd_card(args: argparse.Namespace) -> int:
    from .card import readme_with_results, render_model_card
    from .fileio import atomic_write, refuse_repeats

    reports = [Path(r) for r in args.reports]
    refuse_repeats(reports, "report")  # a row twice in the card's table
    text = render_model_card(Path(args.run), Path(args.onnx), reports, args.train_command, args.hardware)
    readme = readme_with_results(Path(args.readme), reports, Path(args.onnx)) if args.readme else None
    atomic_write(args.out, lambda f: f.write(text.encode()))  # both checked before either is written
    print(f"wrote {args.out}")
    if readme is not None:
        atomic_write(args.readme, lambda f: f.write(readme.encode()))
        print(f"updated the results table in {args.readme}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .app import serve
    except ImportError as e:
        raise ImportError(f"{e.name or e}: the web app needs its extra: pip install 'ferkit[app]'") from e

    fields = {f.name for f in dataclasses.fields(AppSettings)} - {"model", "ui"}  # each a flag's dest
    settings = AppSettings(
        model=args.model[0] if args.model and len(args.model) == 1 else args.model,
        ui=not args.no_ui,
        **{k: v for k, v in vars(args).items() if k in fields},
    )
    serve(settings, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="ferkit", description="Facial expression recognition on FER-2013.")
    parser.add_argument("--version", action="version", version=f"ferkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_prepare(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_select_ensemble(sub)
    _add_card(sub)
    _add_models(sub)
    _add_slim(sub)
    _add_export(sub)
    _add_predict(sub)
    _add_serve(sub)
    for command in sub.choices.values():  # a command's own usage errors name it and show its usage
        command.set_defaults(usage_error=command.error)
    return parser


def _add_prepare(sub: Any) -> None:
    p = sub.add_parser(
        "prepare",
        help="decode FER-2013 once into a .npz cache",
        description="Decode fer2013.csv or the Kaggle image folders into one .npz cache.",
    )
    p.add_argument("src", help="fer2013.csv, or the folder holding train/ and test/")
    p.add_argument("-o", "--out", default="data/fer2013.npz", help="cache file to write (default: %(default)s)")
    _add_no_progress(p)
    p.set_defaults(func=cmd_prepare)


def _add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a model",
        description="Train a model on FER-2013. Options "
        "override the --config YAML, which overrides the defaults shown.",
    )
    p.add_argument("--config", help="YAML file of training options (see configs/)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/last.pt if it exists, with the run's own settings (without --config: those in "
        f"OUT/last.pt, else OUT/config.yaml; only {', '.join(k.replace('_', '-') for k in RESUMABLE_CHANGES)} "
        "may change)",
    )
    _add_config_options(p)
    p.set_defaults(func=cmd_train)


def _add_evaluate(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate checkpoints on a split",
        description="Accuracy, classification report, confusion matrix, ROC/AUC and plots.",
    )
    p.add_argument(
        "checkpoint",
        nargs="+",
        help="checkpoints (.pt) or exported models (.onnx); several are averaged (an ensemble), and a folder stands "
        "for the .onnx files in it",
    )
    p.add_argument("--ensemble", nargs="*", help="more checkpoints to average with the first")
    p.add_argument("--data", required=True, help="FER-2013 cache, CSV or image folder")
    p.add_argument(
        "--split",
        default="PrivateTest",
        choices=SPLITS,
        help="split to evaluate (default: %(default)s; select models on PublicTest)",
    )
    p.add_argument(
        "--tta",
        nargs="+",
        default=["none"],
        choices=TTA_MODES,
        help="test-time augmentation mode(s), each reported separately (default: none)",
    )
    p.add_argument(
        "-o",
        "--out",
        help="report folder (default beside the model: eval/ for a best.pt, eval_NAME_onnx/ for NAME.onnx and "
        "likewise for any other file, eval_ensemble_HASH/ for several, named for the set of them; in the current "
        "folder for a model of the package, such as the shipped one)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--limit", type=_count(0), default=0, help="evaluate a fixed random subset of N images (0 = all)")
    _add_evaluation_options(p)
    p.set_defaults(func=cmd_evaluate)


def _add_select_ensemble(sub: Any) -> None:
    p = sub.add_parser(
        "select-ensemble",
        help="choose an ensemble (models and TTA) on PublicTest",
        description="Run each candidate once on PublicTest, score every subset under every TTA mode by the "
        "accuracy of its mean probabilities, and print the best (ties: fewer models, cheaper TTA). "
        "PrivateTest is not read: report the winner on it with `ferkit evaluate`.",
    )
    p.add_argument(
        "checkpoint", nargs="+", help="candidate checkpoints (.pt) or exported models (.onnx), or folders of them"
    )
    p.add_argument("--data", required=True, help="FER-2013 cache, CSV or image folder")
    p.add_argument("--tta", nargs="+", default=["none"], choices=TTA_MODES, help="TTA modes to try (default: none)")
    p.add_argument("--max-size", type=_count(0), default=0, help="largest ensemble to consider (0 = all candidates)")
    p.add_argument("--top", type=_count(1), default=10, help="rows to print and save (default: %(default)s)")
    p.add_argument("-o", "--out", help="JSON file for the ranking")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument(
        "--limit", type=_count(0), default=0, help="use a fixed random subset of N PublicTest images (0 = all)"
    )
    _add_evaluation_options(p)
    p.set_defaults(func=cmd_select_ensemble)


def _add_card(sub: Any) -> None:
    p = sub.add_parser(
        "card",
        help="write the model card (and README results) from evaluation JSON",
        description="Write MODEL_CARD.md for a shipped ONNX model from its training run and the JSON reports of "
        "`ferkit evaluate` (each checked to be of that model), and optionally regenerate a README's results table.",
    )
    p.add_argument("--run", required=True, help="the training run folder (metrics.csv, and best.pt or config.yaml)")
    p.add_argument("--onnx", required=True, help="the shipped ONNX file")
    p.add_argument("--reports", nargs="+", required=True, help="evaluation JSON files, the headline first")
    p.add_argument("--command", dest="train_command", required=True, help="the training command, quoted in the card")
    p.add_argument("--hardware", required=True, help="where it was trained (e.g. '1x H100 80GB'), quoted in the card")
    p.add_argument("-o", "--out", default="MODEL_CARD.md", help="card to write (default: %(default)s)")
    p.add_argument("--readme", help="README whose results block to regenerate")
    p.set_defaults(func=cmd_card)


def _add_models(sub: Any) -> None:
    p = sub.add_parser(
        "models",
        help="list the model registry with params and MFLOPs",
        description="The registry's models, or the given checkpoints' (their architecture and options), "
        "with parameters and forward MFLOPs for one 48x48 face.",
    )
    p.add_argument("checkpoint", nargs="*", help="checkpoints (.pt) to describe instead of the registry")
    p.set_defaults(func=cmd_models)


def _add_slim(sub: Any) -> None:
    p = sub.add_parser(
        "slim",
        help="keep only a checkpoint's prediction weights (EMA if any), optionally float16",
        description="Write a small checkpoint for shipping or carrying: the weights the model predicts with "
        "(the EMA weights when the run kept them), its config and metrics, no optimiser state.",
    )
    p.add_argument("checkpoint", help="a .pt checkpoint from `ferkit train`")
    p.add_argument("-o", "--out", required=True, help="the .pt file to write")
    p.add_argument("--half", action="store_true", help="store the weights as float16 (half the size)")
    p.set_defaults(func=cmd_slim)


def _add_export(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX (optionally int8)",
        description="Write an ONNX model with class names and preprocessing in its metadata.",
    )
    p.add_argument(
        "checkpoint",
        help="a .pt checkpoint from `ferkit train`, or an exported .onnx to copy with --report's metrics or to "
        "correct with --undo-class-weights or --fit-prior",
    )
    p.add_argument("-o", "--out", required=True, help="the .onnx file to write")
    p.add_argument(
        "--report",
        help="the input model's PrivateTest report (`ferkit evaluate`), whose accuracy/F1 to store in OUT's "
        "metadata (not in the _int8/_fp16 copies: other models, to evaluate on their own)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help=f"print the max |ONNX - torch| difference of the probabilities; over {CHECK_TOLERANCE:g} is an error",
    )
    p.add_argument("--int8", action="store_true", help="also write OUT_int8.onnx (static int8, calibrated)")
    p.add_argument("--fp16", action="store_true", help="also write OUT_fp16.onnx (float16 weights, half the size)")
    p.add_argument(
        "--undo-class-weights",
        type=float,
        metavar="POWER",
        help="(an .onnx input) multiply its probabilities by the Training class counts of --data to the POWER: "
        "with the run's class_weight_power (1 after --sampler balanced) this divides out the class weights it was "
        "trained with (exactly for a run without a teacher; a distilled run is over-corrected: use --fit-prior)",
    )
    p.add_argument(
        "--fit-prior",
        action="store_true",
        help="(an .onnx input) shift its logits by one offset per class, fit on PublicTest of --data (the least "
        "log-loss), so that its mean probabilities match the class frequencies, whatever its loss tilted them by",
    )
    p.add_argument(
        "--data",
        help="FER-2013 data: int8 calibration (needed by --int8), --check images (default: random) and the "
        "class counts of --undo-class-weights, PublicTest of --fit-prior",
    )
    _add_no_progress(p)
    p.set_defaults(func=cmd_export)


MODEL_HELP = (
    "an .onnx or .pt model; repeat for an ensemble, or name a folder: the .onnx files in it, averaged "
    "(default: the shipped model)"
)


def _add_predict(sub: Any) -> None:
    p = sub.add_parser(
        "predict",
        help="find faces and their emotions in images, folders, videos or a webcam",
        description="Detect every face and score the 7 emotions. A bad input is reported and "
        "the rest still processed; the exit code is 1 if any input failed.",
    )
    p.add_argument("paths", nargs="*", help="images, folders (searched recursively) and video files; - for an image "
                   "on standard input")  # fmt: skip
    p.add_argument(
        "--webcam",
        type=_camera,
        metavar="N|PATH|URL",
        help="read a camera instead of files: its number, a device path (/dev/video2) or a stream URL "
        "(rtsp://..., http://...); Ctrl-C stops",
    )
    p.add_argument(
        "--model",
        action="append",
        help=MODEL_HELP,
    )
    p.add_argument(
        "--backend", default="auto", choices=["auto", "onnx", "torch"], help="inference runtime (default: %(default)s)"
    )
    _add_image_options(p)
    p.add_argument(
        "--every", type=_count(1), default=VIDEO_EVERY, help="video: use every N-th frame (default: %(default)s)"
    )
    p.add_argument("--fallback", action="store_true", help="when no face is found, classify the whole image")
    p.add_argument(
        "--format", default="table", choices=["table", "jsonl", "csv"], help="output format (default: %(default)s)"
    )
    p.add_argument("--annotate", metavar="DIR", help="write annotated images/videos into DIR")
    p.add_argument("--threads", type=_threads, help="onnxruntime threads (default, or 0: all cores)")
    _add_no_progress(p)
    p.set_defaults(func=cmd_predict)


def _add_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the web app: UI at /, JSON API at /api/v1/predict, docs at /docs",
        description="Serve the Gradio UI and the JSON API (POST /api/v1/predict, GET /api/v1/model, GET /healthz, "
        "/docs) with uvicorn. Needs the app extra: pip install 'ferkit[app]'.",
    )
    p.add_argument("--host", default=HOST, help="address to listen on; 0.0.0.0 for all (default: %(default)s)")
    p.add_argument("--port", type=_count(1, 65535), default=PORT, help="port (default: %(default)s)")
    p.add_argument(
        "--model",
        action="append",
        help=MODEL_HELP,
    )
    d = AppSettings()
    p.add_argument(
        "--max-upload-mb", type=_positive, default=d.max_upload_mb, help="largest upload in MiB (default: %(default)s)"
    )
    _add_image_options(p)
    limits = [  # flag, the AppSettings field it sets, its type and metavar, help
        ("--concurrency", "max_concurrency", _count(1), "N", "inferences at once"),
        ("--queue", "max_queue", _count(0), "N", "requests that may wait; more get 503"),
        ("--queue-timeout", "queue_timeout_s", _positive, "S", "seconds a request may wait, then 503"),
        ("--timeout", "timeout_s", _positive, "S", "seconds one inference may take, then 504"),
        ("--upload-timeout", "upload_timeout_s", _positive, "S", "seconds to receive an upload, then 408"),
        ("--keep-files", "keep_files_s", _positive, "S", "seconds the UI's uploaded photos and results stay"),
    ]
    for flag, dest, typ, metavar, help_ in limits:
        default = getattr(d, dest)
        help_ += f" (default: {default:g})"
        p.add_argument(flag, dest=dest, metavar=metavar, type=typ, default=default, help=help_)
    threads_help = "onnxruntime threads per inference (default, or 0: cores / concurrency)"
    p.add_argument("--threads", type=_threads, help=threads_help)
    p.add_argument("--no-ui", action="store_true", help="serve the API only, without the Gradio UI")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


TRAIN_EXTRA = {"torch", "sklearn", "matplotlib", "onnx", "onnxscript"}  # pyproject's train extra, as imported


class _Terminated(SystemExit):
    """SIGTERM, raised where the program is, so that it unwinds (cleaning up) before the process ends by it."""


def _terminated(signum: int, frame: Any) -> None:
    raise _Terminated(128 + signum)


def _raise_again(hook: Callable[[Any], object]) -> Callable[[Any], None]:
    """A ``sys.unraisablehook`` that delivers a SIGTERM again which Python dropped: raised inside a weakref
    callback or ``__del__``, it was printed and the command ran on (3 of 16 kills of an evaluation)."""

    def handle(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, _Terminated):  # a moment later: outside the callback, most likely
            threading.Timer(0.01, _thread.interrupt_main, (signal.SIGTERM,)).start()
        else:
            hook(unraisable)

    return handle


def _one_line(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> str:
    return f"warning: {message}\n"


@contextlib.contextmanager
def _as_a_command() -> Iterator[None]:
    """While a command runs: SIGTERM (kill, a scheduler's stop) unwinds as Ctrl-C does, so that no temp file or
    partial video stays behind (not under torchrun, whose SIGTERM to one process while another waits in a
    collective must end it), and warnings are one line each, without the source line that raised them."""
    catch = threading.current_thread() is threading.main_thread() and "LOCAL_RANK" not in os.environ
    hook, formatwarning = sys.unraisablehook, warnings.formatwarning
    previous = signal.signal(signal.SIGTERM, _terminated) if catch else None
    if catch:
        sys.unraisablehook = _raise_again(hook)
    warnings.formatwarning = _one_line
    try:
        yield
    finally:
        sys.unraisablehook, warnings.formatwarning = hook, formatwarning
        if catch and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _ended(command: str, code: int) -> int:
    """``code``; a failed training process of a torchrun job exits with it at once: unwinding its error freed the
    DistributedDataParallel model while the other processes waited in a collective, which could block for
    good (3 of 27 tries), so that torchrun never saw the failure and the job hung until gloo's 30-minute timeout."""
    if command == "train" and "LOCAL_RANK" in os.environ and os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown and hasattr(args, "paths") and not any(u.startswith("-") and u != "-" for u in unknown):
        args.paths += unknown  # paths after an option (`predict a.jpg --every 2 b.jpg`): argparse stops at one
        unknown = []
    if unknown:  # said by the command's parser: the top-level one said "ferkit: error:" with ferkit's usage
        args.usage_error(f"unrecognized arguments: {' '.join(unknown)}")
    for stream in (sys.stdout, sys.stderr):  # a file name that is not valid UTF-8 is printed escaped, every command
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    with _as_a_command():
        try:
            return args.func(args)
        except BrokenPipeError:  # `ferkit predict ... | head -1`: the reader has all it wanted; no error to show
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit would fail
            return 1
        except (ValueError, OSError, ImportError, RuntimeError) as e:
            hint = ""
            if isinstance(e, ImportError) and e.name in TRAIN_EXTRA and "ferkit[train]" not in str(e):  # bare install
                hint = " (training, evaluation, export and .pt models need the train extra: "
                hint += "pip install 'ferkit[train]'; in a clone, for CPU torch: "
                hint += "pip install torch==2.13.0 -e '.[train]')"
            print(f"ferkit {args.command}: error: {e}{hint}", file=sys.stderr)
            return _ended(args.command, 2)
        except KeyboardInterrupt:
            print(f"ferkit {args.command}: interrupted", file=sys.stderr)
            return _ended(args.command, 130)
        except _Terminated:  # unwound: now end by the signal, as the process would have without the handler
            print(f"ferkit {args.command}: terminated", file=sys.stderr)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            raise


def _json(obj: Any) -> str:
    return json.dumps(obj, default=str)
