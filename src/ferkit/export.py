"""ONNX export of any checkpoint, with class names and preprocessing in the model's metadata, an
agreement check against torch, and an int8 (static, QDQ) quantized variant."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import model_from_checkpoint, weights_digest
from .config import CHECK_TOLERANCE, IMAGE_SIZE
from .data import model_input
from .fileio import (
    atomic_write,
    check_writable,
    not_a_file,
    parse_model_metadata,
    read_model_report,
    refuse_folder,
    refuse_input,
    staging_folder,
)
from .runtime import cpu_session

PREPROCESSING = (
    "RGB -> grayscale (ITU-R 601 luma), a square face crop (the detector's box widened by ferkit's --margin) "
    f"resized to {IMAGE_SIZE}x{IMAGE_SIZE}, "
    f"float32 pixels / 255 in [0, 1], shape (N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}); output: softmax probabilities (N, 7)"
)


def read_metadata(model: str | Path | Any) -> dict[str, Any]:
    """The ferkit metadata (name, classes, preprocessing, metrics, ...) of an ONNX file or loaded model."""
    import onnx

    source = model if isinstance(model, (str, Path)) else "ONNX model"
    if isinstance(model, (str, Path)):
        if problem := not_a_file(model, "ONNX model file"):
            raise FileNotFoundError(f"{model}: {problem}")
        try:
            model = onnx.load(str(model), load_external_data=False)
        except Exception as e:  # onnx raises protobuf's DecodeError and others for a damaged file
            raise ValueError(f"{model}: not a readable ONNX model ({e})") from e
    return parse_model_metadata({p.key: p.value for p in model.metadata_props}.get("ferkit"), source)


def _set_metadata(path: Path, info: dict[str, Any], out: Path | None = None) -> None:
    """Write ``path`` with ``info`` as its ferkit metadata to ``out`` (default: in place), atomically; the
    metadata names the model by the file it is written to."""
    import onnx

    _save_with_metadata(onnx.load(str(path)), info, Path(out or path))


def _save_with_metadata(model: Any, info: dict[str, Any], out: Path) -> None:
    """Write the in-memory ONNX ``model`` to ``out`` atomically, with ``info`` (named after ``out``, and with
    this ferkit's preprocessing text: an older file's named a crop margin) as its ferkit metadata."""
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    info = {"name": out.stem, **{k: v for k, v in info.items() if k != "name"}, "preprocessing": PREPROCESSING}
    entry.key, entry.value = "ferkit", json.dumps(info)
    name = info["name"].encode("utf-8", "backslashreplace").decode()  # a file name not in UTF-8: protobuf's are
    model.doc_string = f"ferkit {name}: {PREPROCESSING}"
    atomic_write(out, lambda f: f.write(model.SerializeToString()))


def with_metrics(onnx_path: str | Path, out: str | Path, metrics: dict[str, Any]) -> Path:
    """A copy of an exported model, graph and weights untouched, named ``out`` in its metadata and with
    ``metrics`` there: the file that was evaluated is the file that ships with its evaluation."""
    out = Path(out)
    info = read_metadata(onnx_path)
    if not info.get("classes"):
        raise ValueError(f"{onnx_path}: not a ferkit ONNX export (no ferkit metadata)")
    _set_metadata(Path(onnx_path), {**_without_metrics(info), **metrics}, out)  # no metric of an older report
    return out


# the evaluation results an export may carry in its metadata (``--report``); a changed model drops them
METRIC_KEYS = ("accuracy", "macro_f1", "weighted_f1", "split", "tta")


def _without_metrics(info: dict[str, Any]) -> dict[str, Any]:
    """Metadata for a changed model (quantized, converted, corrected): the source's, less its evaluation."""
    return {k: v for k, v in info.items() if k not in METRIC_KEYS}


def undo_class_weights(onnx_path: str | Path, out: str | Path, counts: np.ndarray, power: float) -> Path:
    """A copy of an exported model whose probabilities are multiplied by ``counts ** power`` (renormalised):
    ``power · log(count)`` is added to the logits before the final softmax. With the Training class counts
    and the ``class_weight_power`` the model was trained with, this divides out the class weights of its loss
    (``count ** -power``), so that its probabilities follow the Training prior again: exactly for a loss of
    weighted cross-entropy alone. A distilled run learnt part of its targets from its teacher, unweighted, so
    this over-corrects it (a teacher that follows the prior: the rare classes' probabilities come out about
    halved); :func:`fit_prior` measures the offsets instead. The correction is kept in the metadata (asking
    twice is refused) and the source's measured metrics are not: they were not measured on this model."""
    info = _correctable(onnx_path, out)
    if "class_weights_undone" in info:
        raise ValueError(f"{onnx_path}: its class weights are already undone ({info['class_weights_undone']})")
    if "prior_fitted" in info:  # the fit took the tilt out already: undoing now would tilt it the other way
        raise ValueError(f"{onnx_path}: its prior is fitted; undo the class weights before --fit-prior, not after")
    if not (math.isfinite(power) and power > 0):
        raise ValueError(f"power {power}: expected a positive number (the run's class_weight_power)")
    counts = np.asarray(counts, dtype=np.float64)
    if counts.shape != (len(info["classes"]),) or (counts <= 0).any():
        raise ValueError(f"class counts {counts.tolist()}: need one positive count per class of {onnx_path}")
    undone = {"power": power, "training_counts": counts.astype(int).tolist()}
    return _shift_logits(onnx_path, out, power * np.log(counts / counts.max()), {"class_weights_undone": undone})


def fit_log_offsets(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The offsets ``b`` (one per class, the largest 0) that minimise the mean negative log-likelihood of
    ``softmax(log(probs) + b)`` on ``labels``: a convex fit, at whose optimum the mean probability of each
    class equals its frequency in ``labels``. Every class must occur."""
    from scipy.optimize import minimize
    from scipy.special import log_softmax, softmax

    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    k = probs.shape[1]
    freq = np.bincount(labels, minlength=k) / len(labels)
    if (freq == 0).any():
        missing = ", ".join(str(c) for c in np.flatnonzero(freq == 0))
        raise ValueError(f"no example of class {missing} to fit its offset on")
    logp = np.log(np.clip(probs, 1e-12, None))
    rows = np.arange(len(labels))

    def nll(b: np.ndarray) -> tuple[float, np.ndarray]:
        z = logp + b
        return -float(log_softmax(z, axis=1)[rows, labels].mean()), softmax(z, axis=1).mean(0) - freq

    b = minimize(nll, np.zeros(k), jac=True, method="L-BFGS-B", options={"gtol": 1e-9}).x
    return b - b.max()


def fit_prior(onnx_path: str | Path, out: str | Path, probs: np.ndarray, labels: np.ndarray, split: str) -> Path:
    """A copy of an exported model with :func:`fit_log_offsets` of its probabilities ``probs`` on ``split``'s
    ``labels`` added to its logits before the final softmax (to offsets it has already, where
    :func:`undo_class_weights` put some): its probabilities then follow the class frequencies of ``split``,
    whatever the loss tilted them by. Kept in the metadata (asking twice is refused)."""
    info = _correctable(onnx_path, out)
    if "prior_fitted" in info:
        raise ValueError(f"{onnx_path}: its prior is already fitted ({info['prior_fitted']})")
    if probs.shape != (len(labels), len(info["classes"])):
        raise ValueError(f"probabilities of shape {probs.shape}: need one row of {len(info['classes'])} per label")
    if missing := [c for i, c in enumerate(info["classes"]) if not (np.asarray(labels) == i).any()]:
        raise ValueError(f"{split} has no {', '.join(missing)} image: every class must occur to fit its offset")
    offsets = fit_log_offsets(probs, labels)
    fitted = {"split": split, "n": int(len(labels)), "offsets": [round(float(b), 4) for b in offsets]}
    return _shift_logits(onnx_path, out, offsets, {"prior_fitted": fitted})


def check_fit_prior(onnx_path: str | Path, out: str | Path) -> dict[str, Any]:
    """The metadata of ``onnx_path`` if :func:`fit_prior` may write its copy to ``out``, else a ValueError
    (checked before the model runs over a split for the probabilities to fit)."""
    info = _correctable(onnx_path, out)
    if "prior_fitted" in info:
        raise ValueError(f"{onnx_path}: its prior is already fitted ({info['prior_fitted']})")
    return info


def _correctable(onnx_path: str | Path, out: str | Path) -> dict[str, Any]:
    """The metadata of a ferkit ONNX export whose logits may be shifted into ``out``."""
    refuse_input(out, onnx_path, "the model", "another file for the corrected copy")  # the original would be lost
    info = read_metadata(onnx_path)
    if not info.get("classes"):
        raise ValueError(f"{onnx_path}: not a ferkit ONNX export (no ferkit metadata)")
    if info.get("precision") == "float16":
        raise ValueError(f"{onnx_path}: a float16 copy; correct the float32 or int8 export")
    return info


OFFSETS = "class_log_prior_offsets"  # the initializer added to the logits before the final softmax


def _shift_logits(onnx_path: str | Path, out: str | Path, offsets: np.ndarray, note: dict[str, Any]) -> Path:
    """Write ``out``: ``onnx_path`` with ``offsets`` added to the logits of its final softmax (to the
    offsets an earlier correction added, if any), ``note`` added to its metadata and its metrics dropped."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(onnx_path))
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    if len(softmaxes) != 1 or softmaxes[0].output[0] != model.graph.output[0].name:
        raise ValueError(f"{onnx_path}: no single final Softmax whose logits to correct")
    softmax = softmaxes[0]
    offsets = np.asarray(offsets, dtype=np.float32)
    if earlier := next((t for t in model.graph.initializer if t.name == OFFSETS), None):
        earlier.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(earlier) + offsets, OFFSETS))
    else:
        logits, shifted = softmax.input[0], softmax.input[0] + "_prior_corrected"
        model.graph.initializer.append(numpy_helper.from_array(offsets, OFFSETS))
        add = helper.make_node("Add", [logits, OFFSETS], [shifted])
        model.graph.node.insert(list(model.graph.node).index(softmax), add)
        softmax.input[0] = shifted
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ValueError(f"{onnx_path}: its graph cannot take the correction ({e})") from e
    out = Path(out)
    _save_with_metadata(model, {**_without_metrics(read_metadata(onnx_path)), **note}, out)
    return out


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide torch's exporter chatter that is about torch itself, not the model: deprecation warnings from
    its internals and notes on torchvision operators it skips; errors still propagate."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def export_onnx(
    checkpoint: str | Path, out: str | Path, metrics: dict[str, Any] | None = None, opset: int = 18
) -> Path:
    """Export ``checkpoint`` (EMA weights when present) to ``out`` with a dynamic batch size.

    ``metrics`` (e.g. from an evaluation JSON: accuracy, macro_f1, ...) is stored in the metadata so
    that apps can show the model's measured accuracy."""
    out = refuse_folder(out)  # before the export, whose own error named a temporary file
    model, state = model_from_checkpoint(checkpoint)
    net = nn.Sequential(model, nn.Softmax(dim=1)).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    with staging_folder(out) as tmp:
        tmp_path = tmp / out.name
        with _quiet_exporter():
            torch.onnx.export(
                net,
                (torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE),),
                str(tmp_path),
                input_names=["image"],
                output_names=["probs"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        info = {
            "architecture": state["model"],
            "model_kwargs": state["model_kwargs"],
            "classes": state["classes"],
            "input_size": IMAGE_SIZE,
            "preprocessing": PREPROCESSING,
            "checkpoint": Path(checkpoint).name,
            "weights_digest": weights_digest(model),  # which run's weights: `ferkit card` checks it
            **(metrics or {}),
        }
        _set_metadata(tmp_path, info)
        tmp_path.replace(out)
    return out


def max_abs_diff(onnx_path: str | Path, checkpoint: str | Path, images: np.ndarray) -> float:
    """Largest absolute difference between ONNX Runtime and torch probabilities on uint8 ``images``."""
    model, _ = model_from_checkpoint(checkpoint)
    x = model_input(images)
    with torch.no_grad():
        ref = torch.softmax(model(torch.from_numpy(x)), 1).numpy()
    sess = cpu_session(onnx_path, None, "ONNX model")
    return float(np.abs(sess.run(None, {"image": x})[0] - ref).max())


CALIBRATION_IMAGES = 512  # Training faces int8 is calibrated on and --check compares ONNX with torch on


def calibration_sample(images: np.ndarray, n: int = CALIBRATION_IMAGES, seed: int = 0) -> np.ndarray:
    """``n`` of ``images`` (uint8 faces) drawn at random with ``seed``: those an export calibrates int8 on and
    checks ONNX against torch on (the benchmark of int8 draws them the same way)."""
    return images[np.random.default_rng(seed).permutation(len(images))[:n]]


def copy_path(out: str | Path, precision: str) -> Path:
    """Where an export to ``out`` writes its ``fp16`` or ``int8`` copy: ``OUT_fp16.onnx``, ``OUT_int8.onnx``."""
    out = Path(out)
    return out.with_name(f"{out.stem}_{precision}.onnx")


class Exported(NamedTuple):
    """What :func:`export_all` wrote (``out`` first), and its check: the largest |ONNX - torch| difference of
    the probabilities (None: not checked) on ``checked`` images."""

    files: list[Path]
    diff: float | None
    checked: int


def check_outputs(out: str | Path, fp16: bool = False, int8: bool = False) -> list[Path]:
    """The files :func:`export_all` would write (``out`` first), each checked to be writable."""
    out = Path(out)
    finals = [out, *(copy_path(out, p) for p, want in (("fp16", fp16), ("int8", int8)) if want)]
    for path in finals:
        check_writable(path)
    return finals


def export_all(
    checkpoint: str | Path,
    out: str | Path,
    metrics: dict[str, Any] | None = None,
    images: np.ndarray | None = None,
    check: bool = False,
    fp16: bool = False,
    int8: bool = False,
) -> Exported:
    """Export ``checkpoint`` to ``out`` and, as asked, its ``fp16`` and ``int8`` copies beside it
    (:func:`copy_path`): all made and checked in a staging folder, then renamed into place one after another
    (a failure or Ctrl-C before that leaves the old set whole; an older copy not asked for is left as it is).
    ``check`` (and ``int8``) compares ONNX with torch on a :func:`calibration_sample` of ``images`` (uint8
    Training faces; random pixels when None, which int8 refuses: they ruin its calibration), a difference over
    CHECK_TOLERANCE an error."""
    out = Path(out)
    if int8 and images is None:
        raise ValueError("int8 needs Training faces (--data): it is calibrated on them (random images ruin it)")
    if images is not None and len(images) == 0:
        raise ValueError("no Training images to check and calibrate on")
    finals = check_outputs(out, fp16, int8)  # before the export and the calibration run: they failed after
    if images is None:
        images = np.random.default_rng(0).integers(0, 256, (64, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    sample, diff = calibration_sample(images), None
    out.parent.mkdir(parents=True, exist_ok=True)
    with staging_folder(out) as tmp:
        staged = [export_onnx(checkpoint, tmp / out.name, metrics)]
        if check or int8:
            diff = max_abs_diff(staged[0], checkpoint, sample)
            if not diff <= CHECK_TOLERANCE:  # NaN too
                raise ValueError(f"{checkpoint}: its ONNX export's probabilities differ from its own by {diff:.2e}, "
                                 f"over {CHECK_TOLERANCE:g} (on {len(sample)} images): the export is wrong (an "
                                 f"operator computed otherwise?); {out} not written")  # fmt: skip
        if fp16:
            staged.append(convert_fp16(staged[0], tmp / copy_path(out, "fp16").name))
        if int8:
            staged.append(quantize_int8(staged[0], tmp / copy_path(out, "int8").name, sample))
        for file, final in zip(staged, finals, strict=True):
            file.replace(final)
    return Exported(finals, diff, len(sample) if diff is not None else 0)


def quantize_int8(onnx_path: str | Path, out: str | Path, calibration: np.ndarray) -> Path:
    """Static int8 quantization (QDQ, per-channel 7-bit weights, uint8 activations) calibrated on uint8
    face crops (N, 48, 48). The 7-bit weights (``reduce_range``) keep ONNX Runtime's u8s8 kernels on CPUs
    without VNNI from saturating their 16-bit sums of two products (255 * 64 * 2 < 2^15); on FER-2013 they
    cost nothing measurable (reports/runs.md)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(
                [{"image": model_input(calibration[i : i + 64])} for i in range(0, len(calibration), 64)]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    out = Path(out)
    with staging_folder(out) as tmp:
        pre = tmp / "pre.onnx"
        quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
        import onnx

        # the final softmax stays in float: quantized, probabilities would come in steps of 1/255
        softmax = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Softmax"]
        staged = tmp / out.name
        quantize_static(
            str(pre),
            str(staged),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            reduce_range=True,
            nodes_to_exclude=softmax,
        )

        _set_metadata(staged, {**_without_metrics(read_metadata(onnx_path)), "quantization": "int8 static QDQ"})
        staged.replace(out)
    return out


def convert_fp16(onnx_path: str | Path, out: str | Path) -> Path:
    """A float16 copy of an fp32 export (half the file size); input and output stay float32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(onnx_path))
    info = read_metadata(model)
    half = convert_float_to_float16(model, keep_io_types=True)
    out = Path(out)
    with staging_folder(out) as tmp:
        staged = tmp / out.name
        onnx.save(half, str(staged))
        _set_metadata(staged, {**_without_metrics(info), "precision": "float16"})
        staged.replace(out)
    return out


def report_metrics(path: str | Path, model: str | Path) -> dict[str, Any]:
    """The metrics an export carries from ``ferkit evaluate``'s report at ``path``: the PrivateTest accuracy
    (what the app and the API show as the model's) of the export's input file ``model`` (its network and
    weights), with any TTA (predict and serve run them all); never an ensemble's, another model's or another split's."""
    report = read_model_report(path, model)
    if report["split"] != "PrivateTest" or report["limit"]:
        raise ValueError(f"{path}: not a report on the whole PrivateTest split (the accuracy a model carries)")
    return {k: report[k] for k in METRIC_KEYS if k in report}
