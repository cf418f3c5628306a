"""Evaluation: probabilities (with optional test-time augmentation and ensembles), metrics, plots, JSON."""

from __future__ import annotations

import json
import re
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import EVAL_BATCH_SIZE, TTA_MODES, WEIGHTS_DIR
from .data import CLASSES, model_input, stratified_subset, tta_views
from .fileio import (
    atomic_write,
    bytes_digest,
    check_writable,
    model_digest,
    model_name,
    read_npz,
    refuse_file,
    refuse_repeats,
    refuse_same_weights,
)
from .runtime import progress_bar, resolve_device

# Part of every prediction cache entry's name: raise it when a change to the code (TTA views, preprocessing)
# changes the probabilities a model file gives, so that older entries are no longer read.
CACHE_VERSION = 2  # 2: vgg16's pools round up (its last row and column were dropped at 48x48)


class OnnxModule(nn.Module):
    """An exported ``.onnx`` model (ONNX Runtime, CPU) behind the module interface evaluation uses. It
    returns log-probabilities (the export ends in a softmax), so a softmax gives its probabilities back."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        from .inference import OnnxBackend

        self.backend = OnnxBackend(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.backend(np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32))
        return torch.from_numpy(probs).to(x.device).clamp_min(1e-12).log()


def load_for_evaluation(path: str | Path) -> tuple[nn.Module, str]:
    """A model and its name from a training checkpoint (``.pt``) or an exported ``.onnx`` file."""
    from .checkpoint import model_from_checkpoint, run_name

    if Path(path).suffix.lower() == ".onnx":
        model, name = OnnxModule(path), Path(path).stem
        classes = model.backend.info.get("classes", list(CLASSES))
    else:
        model, state = model_from_checkpoint(path)
        name, classes = run_name(path, state), state["classes"]
    if list(classes) != list(CLASSES):
        raise ValueError(f"{path}: its classes {', '.join(classes)} are not FER-2013's ({', '.join(CLASSES)})")
    return model, name


def predict_proba(
    model: nn.Module,
    images: np.ndarray,
    device: torch.device | str = "cpu",
    batch_size: int = EVAL_BATCH_SIZE,
    tta: str = "none",
) -> np.ndarray:
    """Class probabilities (N, 7) for uint8 images (N, 48, 48), averaged over TTA views."""
    return predict_proba_modes(model, images, device, batch_size, (tta,))[tta]


@torch.no_grad()
def predict_proba_modes(
    model: nn.Module,
    images: np.ndarray,
    device: torch.device | str = "cpu",
    batch_size: int = EVAL_BATCH_SIZE,
    modes: Sequence[str] = ("none",),
    progress: str | None = None,
) -> dict[str, np.ndarray]:
    """:func:`predict_proba` for several TTA modes at the cost of the widest: its views hold the others'
    (the first view is the image, the one half-way along its mirror). ``progress``: the label of a
    progress bar over the batches (none when None)."""
    for mode in modes:
        if mode not in TTA_MODES:
            raise ValueError(f"unknown TTA mode {mode!r}; choose one of {', '.join(TTA_MODES)}")
    widest = max(modes, key=TTA_MODES.index)
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out: dict[str, list[np.ndarray]] = {mode: [] for mode in modes}
    starts = range(0, len(images), batch_size)
    for i in progress_bar(starts, enabled=progress is not None, desc=progress, unit="batch"):
        views = tta_views(model_input(images[i : i + batch_size]), widest)
        probs = [F.softmax(model(torch.from_numpy(v).to(device)).float(), dim=1) for v in views]
        picks = {"none": [0], "flip": [0, len(views) // 2], "crops": range(len(views))}
        for mode in modes:
            out[mode].append((sum(probs[j] for j in picks[mode]) / len(picks[mode])).cpu().numpy())
    model.train(was_training)
    empty = np.zeros((0, len(CLASSES)), dtype=np.float32)
    return {mode: np.concatenate(p) if p else empty for mode, p in out.items()}


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The mean F1 of the classes in the labels or the predictions (a class in neither has no F1 to count):
    the one macro-F1 of ``evaluate``'s reports and ``select-ensemble``'s ranking."""
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def compute_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Accuracy, classification report, confusion matrix (counts and row-normalised) and one-vs-rest
    ROC curves with AUC, as plain JSON-able values."""
    from sklearn.metrics import auc, classification_report, confusion_matrix, roc_curve

    labels = list(range(len(CLASSES)))
    y_pred = probs.argmax(1)
    report = classification_report(
        y_true, y_pred, labels=labels, target_names=list(CLASSES), output_dict=True, zero_division=0
    )
    present = sorted(set(y_true.tolist()) | set(y_pred.tolist()))  # macro averages over these, as macro_f1's
    rows = [report[CLASSES[i]] for i in present]
    report["macro avg"] |= {k: float(np.mean([r[k] for r in rows])) for k in ("precision", "recall", "f1-score")}
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    roc: dict[str, Any] = {}
    for i, name in enumerate(CLASSES):
        positives = y_true == i
        if positives.all() or not positives.any():
            continue
        fpr, tpr, _ = roc_curve(positives, probs[:, i])
        roc[name] = {"auc": float(auc(fpr, tpr)), "fpr": fpr.round(5).tolist(), "tpr": tpr.round(5).tolist()}
    return {
        "n": int(len(y_true)),
        "accuracy": float((y_pred == y_true).mean()),
        "macro_f1": report["macro avg"]["f1-score"],  # = macro_f1(y_true, y_pred)
        "weighted_f1": report["weighted avg"]["f1-score"],
        "macro_auc": float(np.mean([r["auc"] for r in roc.values()])) if roc else None,  # null: no class has a curve
        **calibration(y_true, probs),
        "report": report,
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalized": (cm / np.maximum(cm.sum(1, keepdims=True), 1)).round(4).tolist(),
        "roc": roc,
    }


def unseen_metrics(y_true: np.ndarray, probs: np.ndarray, seen: np.ndarray) -> dict[str, Any] | None:
    """Accuracy and macro-F1 on the images that are not copies of a Training image (``seen``: those that are;
    see :meth:`FERData.seen_in_training`), with their number ``n``; None when every image is one."""
    if seen.all():
        return None
    y_true, y_pred = y_true[~seen], probs[~seen].argmax(1)
    return {"n": int(len(y_true)), "accuracy": float((y_pred == y_true).mean()), "macro_f1": macro_f1(y_true, y_pred)}


def calibration(y_true: np.ndarray, probs: np.ndarray, bins: int = 15) -> dict[str, Any]:
    """How far the probabilities can be taken at their word: log-loss (``nll``), expected calibration error of the
    top class over ``bins`` equal-width confidence bins (``ece``), and each class's mean probability over its
    frequency in the labels (``prior_ratio``: 1 where the model's prior is the data's; null for an absent class)."""
    from sklearn.metrics import log_loss

    summed = probs / probs.sum(1, keepdims=True, dtype=np.float64)  # float32 rows sum to 1 only roughly
    conf, right = summed.max(1), summed.argmax(1) == y_true
    where = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    ece = sum(abs(right[where == b].mean() - conf[where == b].mean()) * (where == b).mean() for b in np.unique(where))
    freq = np.bincount(y_true, minlength=len(CLASSES)) / len(y_true)
    ratio = {c: float(summed[:, i].mean() / freq[i]) if freq[i] else None for i, c in enumerate(CLASSES)}
    return {
        "nll": float(log_loss(y_true, summed, labels=range(len(CLASSES)))),
        "ece": float(ece),
        "prior_ratio": ratio,
    }


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm: np.ndarray, path: Path, normalized: bool, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1 if normalized else None)
    ax.set(
        xticks=range(len(CLASSES)),
        yticks=range(len(CLASSES)),
        xticklabels=CLASSES,
        yticklabels=CLASSES,
        xlabel="predicted",
        ylabel="true",
        title=title,
    )
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    threshold = cm.max() / 2
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(
                j,
                i,
                f"{cm[i, j]:.2f}" if normalized else int(cm[i, j]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if cm[i, j] > threshold else "black",
            )
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def plot_roc(roc: dict[str, Any], path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5.5))
    for name, r in roc.items():
        ax.plot(r["fpr"], r["tpr"], label=f"{name} (AUC {r['auc']:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def plot_training_curves(metrics_csv: Path, path: Path) -> None:
    """Loss and accuracy per epoch (train vs PublicTest) from a run's ``metrics.csv``."""
    import csv

    needed = ("epoch", "train_loss", "val_loss", "train_acc", "val_acc")
    try:
        with open(metrics_csv, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        col = {k: [float(r[k]) for r in rows] for k in needed}
    except (KeyError, TypeError, ValueError, csv.Error):  # not a ferkit run's file, or not text: no plot
        print(f"{metrics_csv}: not a ferkit run's metrics (columns {', '.join(needed)}); no training curves",
              file=sys.stderr)  # fmt: skip
        return
    if not rows:
        return
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(col["epoch"], col["train_loss"], label="train")
    a1.plot(col["epoch"], col["val_loss"], label="PublicTest")
    a1.set(xlabel="epoch", ylabel="loss", title="loss")
    a2.plot(col["epoch"], col["train_acc"], label="train")
    a2.plot(col["epoch"], col["val_acc"], label="PublicTest")
    a2.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for a in (a1, a2):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs: 1, 2, 3, not 1.5 on a short run
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def write_report(metrics: dict[str, Any], out: Path, name: str, meta: dict[str, Any]) -> Path:
    """Write ``{name}.json`` and the confusion-matrix and ROC PNGs into ``out``; returns the JSON path."""
    out.mkdir(parents=True, exist_ok=True)
    subset = f", a {meta['limit']}-image subset" if meta.get("limit") else ""
    title = textwrap.fill(f"{meta.get('model', 'model')} on {meta.get('split', '')}{subset}, TTA {meta.get('tta')}", 60)
    plot_confusion(np.array(metrics["confusion_matrix"]), out / f"{name}_confusion.png", False, title)
    plot_confusion(
        np.array(metrics["confusion_matrix_normalized"]), out / f"{name}_confusion_norm.png", True, title + " (recall)"
    )
    if metrics["roc"]:
        plot_roc(metrics["roc"], out / f"{name}_roc.png", title)
    payload = json.dumps({**meta, **metrics}, indent=1).encode()
    return atomic_write(out / f"{name}.json", lambda f: f.write(payload))


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def format_summary(metrics: dict[str, Any]) -> str:
    """A short text table: accuracy, F1s and per-class precision/recall/F1/AUC."""
    rep = metrics["report"]
    lines = [
        f"accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  "
        f"weighted-F1 {metrics['weighted_f1']:.4f}  macro-AUC {_num(metrics['macro_auc'])}  (n={metrics['n']})"
    ]
    if unseen := metrics.get("unseen"):
        copies = metrics["n"] - unseen["n"]
        rest = {0: "none is a copy of a Training image", 1: "the other 1 is a copy of a Training image"}
        lines.append(
            f"not in Training: accuracy {unseen['accuracy']:.4f}  macro-F1 {unseen['macro_f1']:.4f}  "
            f"(n={unseen['n']}; {rest.get(copies, f'the other {copies} are copies of Training images')})"
        )
    lines += [
        f"log-loss {metrics['nll']:.4f}  ECE {metrics['ece']:.4f}  mean probability / frequency: "
        + " ".join(f"{c} {'-' if r is None else f'{r:.2f}'}" for c, r in metrics["prior_ratio"].items()),
        f"{'class':<10}{'precision':>10}{'recall':>8}{'F1':>8}{'AUC':>8}{'support':>9}",
    ]
    for c in CLASSES:
        r, a = rep[c], metrics["roc"].get(c, {}).get("auc")
        auc = "-" if a is None else f"{a:.3f}"
        scores = [f"{r[k]:.3f}" if r["support"] else "-" for k in ("precision", "recall", "f1-score")]  # absent
        lines.append(f"{c:<10}{scores[0]:>10}{scores[1]:>8}{scores[2]:>8}{auc:>8}{int(r['support']):>9}")
    return "\n".join(lines)


def _probabilities(
    checkpoints: Sequence[str | Path],
    data_path: str | Path,
    split: str,
    modes: Sequence[str],
    device: str,
    batch_size: int,
    limit: int,
    cache: str | Path | None = None,
    progress: bool = True,
    what: str = "ensemble member",
    digests: Sequence[str] | None = None,
) -> tuple[np.ndarray, list[tuple[str, dict[str, np.ndarray]]], bool, np.ndarray, str]:
    """The labels of ``split`` (``limit`` of them when that is fewer), for each model in turn its name and
    probabilities per TTA mode (with a progress bar: ten-crop views of a large model take minutes on a CPU),
    whether the images are a subset of the split, which are copies of Training images, and the images' digest.
    ``digests``: the models' (fileio.model_digest: an ONNX file's weights beside it too), taken before; a model
    whose file changes meanwhile is refused, its numbers being another's. With a ``cache`` folder, each model's
    probabilities are kept there under its digest and the images', and reused (see :data:`CACHE_VERSION`; writing
    an entry deletes that model's entries of older versions)."""
    from .checkpoint import weights_digest
    from .data import load_dataset

    digests = list(digests) if digests is not None else [model_digest(ck) for ck in checkpoints]

    if cache is not None:
        refuse_file(cache, "--cache")
    dev = resolve_device(device)
    data = load_dataset(data_path, progress=progress)
    every = data.split(split)
    images, labels = stratified_subset(*every, limit)
    if len(images) == 0:
        raise ValueError(f"{data_path}: no {split} images to evaluate on")
    images_key = bytes_digest(np.ascontiguousarray(images).data)
    per_model = []
    keys = [f"{digest}-{images_key}-{dev.type}" for digest in digests]
    paths = [None if cache is None else Path(cache) / f"{key}-v{CACHE_VERSION}.npz" for key in keys]
    cached = [_read_cached(path, modes, len(images)) for path in paths]
    if missing := next((p for p, c in zip(paths, cached, strict=True) if p is not None and c is None), None):
        check_writable(missing)  # before any model runs; a cache that holds every entry may be read-only
    weights = []  # the trained weights each model holds: two files of one model's are refused as two ``what``s
    for k, (ck, digest, key, path, probs) in enumerate(zip(checkpoints, digests, keys, paths, cached, strict=True), 1):
        model, name = load_for_evaluation(ck)
        if len(checkpoints) > 1:
            weights.append(model.backend.trained_weights() if isinstance(model, OnnxModule) else weights_digest(model))
            refuse_same_weights(checkpoints[:k], weights, what)
        if probs is None:
            label = f"{split} {k}/{len(checkpoints)} {ck}" if progress else None
            narrower = TTA_MODES[: max(map(TTA_MODES.index, modes)) + 1]  # free with the widest mode's views
            probs = predict_proba_modes(model.to(dev), images, dev, batch_size, narrower, label)
            if model_digest(ck) != digest:  # replaced meanwhile (a best.pt a run rewrites): which was loaded?
                raise ValueError(f"{ck}: the file changed while it was evaluated (a training still writing it?); "
                                 "evaluate it again")  # fmt: skip
            if not all(np.isfinite(p).all() for p in probs.values()):  # sklearn's words: "Input contains NaN."
                raise ValueError(f"{ck}: its probabilities are NaN or infinite on some {split} images (diverged?)")
            if path is not None:
                kept = _read_cached(path, (), len(images)) or {}
                atomic_write(path, lambda f, p=probs, kept=kept: np.savez(f, **{**kept, **p}))
                for stale in _older_versions(path.parent, key):
                    stale.unlink(missing_ok=True)
            probs = {mode: probs[mode] for mode in modes}
        per_model.append((name, probs))
    return labels, per_model, len(labels) < len(every[1]), data.seen_in_training(images), images_key


def _older_versions(folder: Path, key: str) -> list[Path]:
    """The cache entries of ``key`` (a model, images and device) written under an older :data:`CACHE_VERSION`,
    or before entries had one; a newer version's entry (a newer ferkit sharing the folder) is left alone."""
    older = []
    for path in folder.glob(f"{key}*.npz"):
        m = re.fullmatch(rf"{re.escape(key)}(?:-v(\d+))?\.npz", path.name)
        if m and (m[1] is None or int(m[1]) < CACHE_VERSION):
            older.append(path)
    return older


def _read_cached(path: Path | None, modes: Sequence[str], n: int) -> dict[str, np.ndarray] | None:
    """The probabilities of ``modes`` kept in ``path`` (all it holds when ``modes`` is empty), or None when
    the file is absent, unreadable, lacks one of them or holds values no model gives (NaN: the entry, not the
    model, is damaged; a model's own are refused before they are kept)."""
    if path is None or not path.exists():
        return None
    try:
        kept = read_npz(path, list(modes) or None)
    except ValueError:  # a damaged entry (bad zip, bad deflate stream, ...) is computed again
        return None
    if any(p.shape != (n, len(CLASSES)) or not np.isfinite(p).all() for p in kept.values()):
        return None
    return kept


def _mean_probs(per_model: Sequence[dict[str, np.ndarray]], mode: str) -> np.ndarray:
    """The ensemble's probabilities: the models' mean, summed in their order (so a subset ranked by
    :func:`select_ensemble` scores exactly as :func:`evaluate_tta` scores it)."""
    total = np.zeros_like(per_model[0][mode], dtype=np.float64)
    for p in per_model:
        total += p[mode]
    return total / len(per_model)


def split_probabilities(
    checkpoint: str | Path,
    data_path: str | Path,
    split: str,
    tta: str = "none",
    device: str = "auto",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """One model's probabilities (N, 7) on all of ``split``, and the split's labels."""
    labels, [(_, probs)], *_ = _probabilities(
        [checkpoint], data_path, split, [tta], device, EVAL_BATCH_SIZE, 0, progress=progress
    )
    return probs[tta], labels


def evaluate_checkpoints(
    checkpoints: list[str | Path],
    data_path: str | Path,
    split: str = "PrivateTest",
    out: str | Path | None = None,
    tta: str = "none",
    device: str = "auto",
    batch_size: int = EVAL_BATCH_SIZE,
    limit: int = 0,
) -> dict[str, Any]:
    """Evaluate one checkpoint (``.pt``, or an exported ``.onnx`` model), or an ensemble (mean of
    probabilities) of several, on ``split``.

    Writes ``{split}[_limit{N}][_tta-{mode}].json`` with confusion-matrix/ROC PNGs (and the training curves of a
    single checkpoint's run when its ``metrics.csv`` is beside it) into ``out``."""
    return evaluate_tta(checkpoints, data_path, split, out, (tta,), device, batch_size, limit)[tta]


def report_folder(models: Sequence[str | Path]) -> Path:
    """Where ``ferkit evaluate`` writes the reports of ``models`` without ``--out``: a run's best.pt into its
    ``eval/``; any other file into its own folder beside it (m.pt and m.onnx: ``eval_m_pt/``, ``eval_m_onnx/``);
    an ensemble into one named for its members, in any order (never another ensemble's). A file of the installed
    package (the shipped model) reports into the current folder, not into the package."""
    first = Path(models[0])
    if len(models) > 1:
        members = sorted(str(Path(m).resolve()) for m in models)
        name = "eval_ensemble_" + bytes_digest("\n".join(members).encode())[:8]
    else:
        name = "eval" if first.name == "best.pt" else "eval_" + first.name.replace(".", "_")
    home = Path.cwd() if first.resolve().parent == WEIGHTS_DIR.resolve() else first.parent
    return home / name


def evaluate_tta(
    checkpoints: list[str | Path],
    data_path: str | Path,
    split: str = "PrivateTest",
    out: str | Path | None = None,
    modes: Sequence[str] = ("none",),
    device: str = "auto",
    batch_size: int = EVAL_BATCH_SIZE,
    limit: int = 0,
    cache: str | Path | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """:func:`evaluate_checkpoints` for several TTA modes, each model run once over the widest mode's views
    (or its probabilities taken from the ``cache`` folder, see :func:`_probabilities`)."""
    if out is not None:
        refuse_file(out, "--out")  # before any model runs: it failed after
        check_writable(Path(out) / f"{split}.json")
    digests = _distinct_models(checkpoints, "ensemble member")  # what a report's numbers are of
    if out is not None:
        _refuse_other_models(Path(out), checkpoints, digests)
    labels, per_model, subset, seen, images = _probabilities(
        checkpoints, data_path, split, modes, device, batch_size, limit, cache, progress, digests=digests
    )
    names = [name for name, _ in per_model]
    results = {}
    for mode in modes:
        probs = _mean_probs([p for _, p in per_model], mode)
        metrics = {**compute_metrics(labels, probs), "unseen": unseen_metrics(labels, probs, seen)}
        meta = {"model": model_name(names), "checkpoints": [str(c) for c in checkpoints], "digests": digests}
        meta |= {"split": split, "tta": mode, "images": images}  # which images: `ferkit card` compares them
        meta["limit"] = limit if subset else 0  # the report of a subset says so, whatever its file is named
        if out is not None:
            # a subset's report never takes the place of the whole split's
            name = split + (f"_limit{limit}" if subset else "") + ("" if mode == "none" else f"_tta-{mode}")
            meta["report_json"] = str(write_report(metrics, Path(out), name, meta))
        results[mode] = {**meta, **metrics}
    run_metrics = Path(checkpoints[0]).parent / "metrics.csv"
    if out is not None and len(checkpoints) == 1 and run_metrics.exists():
        plot_training_curves(run_metrics, Path(out) / "training_curves.png")
    return results


def _distinct_models(checkpoints: Sequence[str | Path], what: str) -> list[str]:
    """The digests of ``checkpoints`` (fileio.model_digest), refusing one file given twice or copied: it would
    count several times in an ensemble (:func:`_probabilities` refuses exports of one run's weights as it loads)."""
    refuse_repeats(checkpoints, what)
    digests = [model_digest(c) for c in checkpoints]
    if len(set(digests)) < len(digests):
        twice = [str(c) for c, d in zip(checkpoints, digests, strict=True) if digests.count(d) > 1]
        raise ValueError(f"{' and '.join(twice)}: one model in several files (it would count several times)")
    return digests


def rank_ensembles(
    per_model: Sequence[dict[str, np.ndarray]], labels: np.ndarray, max_size: int = 0
) -> list[dict[str, Any]]:
    """Every non-empty subset of the models (up to ``max_size`` of them; 0 = any size) under every TTA
    mode, scored by the accuracy of its mean probabilities: best first, then fewer models, then the
    cheaper TTA mode. Rows hold the models' indices, the mode and the accuracy."""
    from itertools import combinations

    n = len(per_model)
    sizes = range(1, (max_size or n) + 1)
    modes = list(per_model[0])
    rows = []
    for k in sizes:
        for subset in combinations(range(n), k):
            for mode in modes:
                pred = _mean_probs([per_model[i] for i in subset], mode).argmax(1)
                rows.append({"models": list(subset), "tta": mode, "accuracy": float((pred == labels).mean())})
    rows.sort(key=lambda r: (-r["accuracy"], len(r["models"]), TTA_MODES.index(r["tta"])))
    return rows


MAX_CANDIDATES = 14


def _refuse_other_models(out: Path, checkpoints: Sequence[str | Path], digests: list[str]) -> None:
    """Refuse an ``--out`` folder that holds reports of other models: theirs and these would mix, each file
    replaced on its own, the rest left. Other models are other weights in files of other names: the same
    weights elsewhere, or a file retrained (a resumed run's best.pt, moved or not), are the same model's."""
    mine = sorted(Path(c).name for c in checkpoints)  # an ensemble's members in any order
    for report in sorted(out.glob("*.json")) if out.is_dir() else []:
        try:
            old = json.loads(report.read_text(encoding="utf-8"))
            theirs = old.get("checkpoints")
        except (OSError, ValueError, AttributeError):
            continue  # not a report
        if not isinstance(theirs, list) or not all(isinstance(c, str) for c in theirs):
            continue
        if sorted(old.get("digests") or []) == sorted(digests):
            continue
        if sorted(Path(c).name for c in theirs) != mine:
            raise ValueError(f"--out {out}: holds {report.name}, a report of {', '.join(theirs)}; another model's "
                             "reports would mix with it: choose another --out")  # fmt: skip


def select_ensemble(
    checkpoints: Sequence[str | Path],
    data_path: str | Path,
    modes: Sequence[str] = ("none",),
    max_size: int = 0,
    top: int = 10,
    device: str = "auto",
    batch_size: int = EVAL_BATCH_SIZE,
    limit: int = 0,
    cache: str | Path | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Choose an ensemble on PublicTest: each model runs once, then every subset and TTA mode is
    scored (:func:`rank_ensembles`). Returns the ``top`` rows, naming their checkpoints, with the
    macro-F1 too. PrivateTest is never read, so the choice can be reported on it honestly. ``cache``: as
    for :func:`evaluate_tta`, so that candidates already evaluated on PublicTest are not run again."""
    if not 1 <= len(checkpoints) <= MAX_CANDIDATES:
        raise ValueError(f"give 1 to {MAX_CANDIDATES} candidate models (got {len(checkpoints)})")
    digests = _distinct_models(checkpoints, "candidate")  # it would be ranked as two models
    labels, per_model, *_ = _probabilities(
        checkpoints, data_path, "PublicTest", modes, device, batch_size, limit, cache, progress, "candidate", digests
    )
    probs = [p for _, p in per_model]
    rows = rank_ensembles(probs, labels, max_size)[:top]
    for row in rows:
        pred = _mean_probs([probs[i] for i in row["models"]], row["tta"]).argmax(1)
        row["macro_f1"] = macro_f1(labels, pred)
        row["checkpoints"] = [str(checkpoints[i]) for i in row.pop("models")]
    return rows
