"""Model card and README results table, generated from evaluation JSON (never typed by hand)."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

from .config import WEIGHTS_DIR, TrainConfig, run_options
from .data import CLASSES, SPLIT_SIZES
from .fileio import read_model_report

REFERENCE = (
    "Keras ResNet50V2 (the seed, as the project's brief reports it; not run here): 65.2% validation accuracy, "
    "weighted F1 0.65, disgust F1 0.51, surprise F1 0.77"
)
RESULTS_START, RESULTS_END = "<!-- results:start -->", "<!-- results:end -->"


def _load(paths: list[Path], model: Path) -> list[dict[str, Any]]:
    """``ferkit evaluate`` reports of the file ``model`` on whole splits, checked: the card and the README
    must not quote a ranking, an ensemble's numbers, another model's or a subset's as this one's."""
    reports, first, digest = [], {}, None
    for path in paths:
        r = read_model_report(path, model, digest)
        digest = r["digests"][0]  # checked to be the model's: not computed again for the next report
        if r["limit"]:
            raise ValueError(f"{path}: the report of a {r['n']}-image subset of {r['split']}, not of the whole split")
        other = first.setdefault(r["split"], r)
        if other["n"] != r["n"]:
            raise ValueError(f"{path}: {r['n']} {r['split']} images, another report has {other['n']}")
        if r.get("images") and other.get("images") and r["images"] != other["images"]:  # recorded since 2026-11-29
            raise ValueError(f"{path}: other {r['split']} images than another report's (another data file?)")
        if any((o["split"], o["tta"]) == (r["split"], r["tta"]) for o in reports):  # a copy: a row twice
            raise ValueError(f"{path}: a second report of {r['split']} with TTA {r['tta']}")
        reports.append(r)
    return reports


def results_table(reports: list[dict[str, Any]], label: str | None = None) -> str:
    """One row per evaluation: model (``label`` if given), split, TTA, accuracy (on all images, and on those that
    are not copies of Training images), macro/weighted F1, macro AUC, disgust and surprise F1."""
    lines = [
        "| model | split | TTA | accuracy | not in Training | macro F1 | weighted F1 | macro AUC | disgust F1 | "
        "surprise F1 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in reports:
        rep, unseen = r["report"], r.get("unseen")  # reports before 2026-11-28 lack it
        lines.append(
            f"| {label or r['model']} | {r['split']} | {r['tta']} | {r['accuracy']:.2%} | "
            f"{'–' if unseen is None else format(unseen['accuracy'], '.2%')} | {r['macro_f1']:.3f} | "
            f"{r['weighted_f1']:.3f} | {'–' if r['macro_auc'] is None else format(r['macro_auc'], '.3f')} | "
            f"{rep['disgust']['f1-score']:.3f} | "
            f"{rep['surprise']['f1-score']:.3f} |"
        )
    return "\n".join(lines)


def per_class_table(r: dict[str, Any]) -> str:
    lines = ["| class | precision | recall | F1 | AUC | support |", "|---|---:|---:|---:|---:|---:|"]
    for c in CLASSES:
        rep, auc = r["report"][c], r["roc"].get(c, {}).get("auc", float("nan"))
        lines.append(
            f"| {c} | {rep['precision']:.3f} | {rep['recall']:.3f} | {rep['f1-score']:.3f} | {auc:.3f} | "
            f"{int(rep['support'])} |"
        )
    return "\n".join(lines)


def _run_summary(run_dir: Path) -> dict[str, Any]:
    with open(run_dir / "metrics.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{run_dir / 'metrics.csv'}: no epochs recorded")
    best = max(rows, key=lambda r: float(r["val_acc"]))
    return {
        "epochs": len(rows),
        "best_epoch": int(best["epoch"]),
        "best_val_acc": float(best["val_acc"]),
        "train_minutes": sum(float(r["epoch_time_s"]) for r in rows) / 60,
        "img_per_s": sum(float(r["img_per_s"]) for r in rows) / len(rows),
    }


def _run_config(run_dir: Path) -> dict[str, Any]:
    """A run's training config: the ``config.yaml`` training wrote beside its logs (or its ``best.pt``'s), read
    as written (a field this ferkit no longer knows is kept, one the run predates takes its default)."""
    path, cfg = run_options(run_dir, ("config.yaml", "best.pt"))
    if "model" not in cfg:
        raise ValueError(f"{path}: not a training config (a mapping with a model)")
    return {**TrainConfig().to_dict(), **cfg}


def _copies(report: dict[str, Any]) -> str:
    """What the card says of the test images that are copies of Training images, from its headline report."""
    if "unseen" not in report:
        return "Some test images of FER-2013 are copies of Training images; this report predates counting them."
    if (unseen := report["unseen"]) is None:
        return f"Every one of the {report['n']:,} {report['split']} images is a Training image."
    return (
        f"{report['n'] - unseen['n']} of the {report['n']:,} {report['split']} images are copies, pixel for pixel, "
        f"of Training images, which the model has\n  learnt: on the other {unseen['n']:,} its accuracy is "
        f'{unseen["accuracy"]:.2%} (the column "not in Training").\n  Published results count every image, as the '
        "accuracy column does."
    )


def _images(limit: int, whole: int) -> str:
    """How many images of a split a run used: all of FER-2013's, or its ``train_limit``/``val_limit``."""
    return f"a {limit:,}-image subset of its {whole:,}" if 0 < limit < whole else f"{whole:,} images"


def _check_of_run(onnx_path: Path, info: dict[str, Any], cfg: dict[str, Any]) -> None:
    """Refuse an ONNX file (its ferkit metadata ``info``) that is not the run's (``cfg``) model, or whose class
    weights were undone with a power other than the run's (1 after the balanced sampler)."""
    exported = (info.get("architecture"), info.get("model_kwargs") or {})
    if exported != (cfg["model"], cfg["model_kwargs"] or {}):
        raise ValueError(f"{onnx_path}: a model {exported[0]} {exported[1]}, not the run's {cfg['model']} "
                         f"{cfg['model_kwargs'] or {}}")  # fmt: skip
    if undone := info.get("class_weights_undone"):
        power = 1 if cfg["sampler"] == "balanced" else cfg["class_weight_power"] if cfg["class_weights"] else None
        if undone["power"] != power:
            raise ValueError(
                f"{onnx_path}: its class weights were undone with power {undone['power']:g}, but the run "
                + ("had no class weights" if power is None else f"was weighted with power {power:g}")
            )


CARD_OPTIONS = (
    "model", "model_kwargs", "epochs", "batch_size", "optimizer", "lr", "weight_decay", "schedule", "warmup_epochs",
    "label_smoothing", "class_weights", "class_weight_power", "sampler", "augment", "mixup", "cutmix", "ema", "seed",
)  # fmt: skip


def _options_shown(cfg: dict[str, Any]) -> list[str]:
    """The training options the card's table shows: :data:`CARD_OPTIONS`, and the others where a run used them."""
    keys = list(CARD_OPTIONS)
    if cfg.get("init_weights"):
        keys.insert(2, "init_weights")
    if cfg.get("teacher"):
        keys += ["teacher", "distill_alpha", "distill_temperature", "distill_cache"]
    keys += ["geometry"] if cfg.get("geometry", 1.0) != 1.0 else []
    return keys + [k for k in ("sam_rho", "train_limit", "val_limit") if cfg.get(k)]


def render_model_card(run_dir: Path, onnx_path: Path, report_paths: list[Path], command: str, hardware: str) -> str:
    """Markdown model card from a run folder (``metrics.csv``, the config of ``best.pt`` or ``config.yaml``)
    and evaluation JSONs."""
    from .models import build_model, describe

    reports = _load(report_paths, onnx_path)
    head = reports[0]
    if head["split"] != "PrivateTest":
        raise ValueError(f"{report_paths[0]}: the card's headline (the first report) must be on PrivateTest")
    cfg = _run_config(run_dir)
    size = describe(build_model(cfg["model"], **cfg["model_kwargs"]))
    run = _run_summary(run_dir)
    keys = _options_shown(cfg)
    started = (
        f" Started from the weights in `{cfg['init_weights']}`, whose own training is not counted here."
        if cfg.get("init_weights")
        else ""
    )
    kwargs = f" {cfg['model_kwargs']}" if cfg["model_kwargs"] else ""
    from .export import read_metadata

    info = read_metadata(onnx_path)
    _check_of_run(onnx_path, info, cfg)
    if (digest := info.get("weights_digest")) and (run_dir / "best.pt").is_file():  # exports before 2026-11-29: none
        from .checkpoint import model_from_checkpoint, weights_digest

        if weights_digest(model_from_checkpoint(run_dir / "best.pt")[0]) != digest:
            raise ValueError(f"{onnx_path}: exported from other weights than {run_dir / 'best.pt'}: the card would "
                             "describe another run's training; give the run it was exported from")  # fmt: skip
    precision = info.get("quantization") or info.get("precision") or "float32"
    modes = " ".join(dict.fromkeys(r["tta"] for r in reports))
    reproduce = (
        f"ferkit evaluate {onnx_path.as_posix()} --data data/fer2013.npz --split PrivateTest --tta {modes} "
        f"--out reports/{onnx_path.stem}"
    )
    config_rows = "\n".join(f"| {k} | `{cfg[k]}` |" for k in keys)
    undone = info.get("class_weights_undone")
    output = (
        f" At export its probabilities were multiplied by the Training class counts to the power "
        f"{undone['power']:g} (`ferkit export --undo-class-weights {undone['power']:g}`), which divides out the "
        f"class weights of a loss trained with class_weight_power {undone['power']:g} (the table below says how "
        "this one was)."
        if undone
        else ""
    )
    if fitted := info.get("prior_fitted"):
        output += (
            f" {'Then its' if undone else 'At export its'} logits were shifted by one offset per class, fit on "
            f"{fitted['split']} (`ferkit export --fit-prior`: the least log-loss, at which each class's mean "
            f"probability is its frequency there): {', '.join(f'{b:+.2f}' for b in fitted['offsets'])}."
        )
    name = onnx_path.stem
    train_images = _images(cfg["train_limit"], SPLIT_SIZES["Training"])
    val_images = _images(cfg["val_limit"], SPLIT_SIZES["PublicTest"])
    shipped = " (shipped default)" if onnx_path.resolve().parent == WEIGHTS_DIR.resolve() else ""
    source = f"`ferkit card --run {run_dir}` from the evaluation JSON in `{report_paths[0].parent}`"
    return f"""# Model card: {name}{shipped}

*Generated by {source}; do not edit by hand.*

## Model
- Architecture: `{cfg["model"]}`{kwargs} — {size["params_m"]:.2f} M parameters,
  {size["mflops"]:.0f} MFLOPs per 48x48 face. See `src/ferkit/models.py`.
- File: `{onnx_path.as_posix()}` ({onnx_path.stat().st_size / 2**20:.1f} MiB, ONNX, {precision}, dynamic batch);
  class names and preprocessing are stored in its metadata.
- Input: a face crop, grayscale, 48x48, pixels / 255 in [0, 1]. Output: probabilities of
  {", ".join(CLASSES)}.{output}

## Training
- Data: FER-2013 Training split ({train_images}); model selection on PublicTest
  ({val_images}); numbers below on PrivateTest ({reports[0]["n"]:,} images), which was not
  used for any choice.
- Command: `{command}`
- Hardware: {hardware}. {run["epochs"]} epochs, {run["train_minutes"]:.1f} minutes in training epochs
  (PublicTest checks and checkpoints excluded),
  {run["img_per_s"]:.0f} img/s on average. Best PublicTest accuracy {run["best_val_acc"]:.2%} at epoch
  {run["best_epoch"]} (this checkpoint).{started}

| option | value |
|---|---|
{config_rows}

## Results on PrivateTest
Reproduce (on the shipped file): `{reproduce}`,
and the same with `--split PublicTest`.

{results_table(reports, name)}

Per class ({name}, TTA `{head["tta"]}`):

{per_class_table(head)}

Reference to beat: {REFERENCE}.

## Limitations
- FER-2013 faces are low-resolution web images with label noise (human accuracy is about 65±5%: Goodfellow et al. 2013,
  "Challenges in Representation Learning");
  per-class quality differs a lot (see the table): disgust is rare (1.5% of the data).
- {_copies(head)}
- Faces are found by the bundled CenterFace detector (trained on WIDER FACE), from 48 px by default
  (`--min-face`); the model was trained on FER-2013's near-frontal faces, so scores for strongly turned,
  covered or tiny faces are less reliable.
- Expression is not emotion: the model scores facial expressions as labelled in FER-2013 and must not be
  used to make decisions about people.
"""


def readme_with_results(readme: Path, reports: list[Path], model: Path) -> str:
    """``readme``'s text with the block between the results markers replaced by a table of ``reports`` (of the
    model file ``model``, labelled by its stem)."""
    text = readme.read_text(encoding="utf-8")
    block = f"{RESULTS_START}\n{results_table(_load(reports, model), model.stem)}\n{RESULTS_END}"
    pattern = re.compile(re.escape(RESULTS_START) + ".*?" + re.escape(RESULTS_END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{readme}: no {RESULTS_START} ... {RESULTS_END} block to update")
    return pattern.sub(lambda _: block, text)
