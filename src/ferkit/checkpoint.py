"""Checkpoints and weight files: written atomically, read with a clear error when a file is missing or corrupt;
initial weights (e.g. ImageNet) loaded into a model by name and shape."""

from __future__ import annotations

import contextlib
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .config import IMAGE_SIZE
from .data import scores_shape_problem
from .fileio import atomic_write, not_a_file, refuse_input
from .models import build_model

FORMAT = "ferkit-checkpoint/1"


class CheckpointError(ValueError):
    """A file that is not a usable ferkit checkpoint; the message names it."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Save ``state`` (which must hold model, model_kwargs, classes and state_dict) atomically."""
    return atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; ``mmap``: map its tensors instead of reading them
    (to read its config or metrics alone)."""
    path = Path(path)
    if problem := not_a_file(path, "checkpoint"):
        raise CheckpointError(f"{path}: {problem}")
    if path.suffix.lower() == ".onnx":
        raise CheckpointError(f"{path}: an ONNX model; this takes a .pt checkpoint (evaluate/predict/serve take both)")
    if problem := _not_torch_zip(path):  # torch's own errors for these read "pop from empty list"
        raise CheckpointError(f"{path}: not a readable ferkit checkpoint ({problem})")
    state = _torch_load(path, "ferkit checkpoint", CheckpointError, mmap)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a ferkit checkpoint (no '{FORMAT}' marker)")
    return state


def _not_torch_zip(path: Path, older_tried: bool = False) -> str | None:
    """What ``path`` is instead of the zip file ``torch.save`` writes, or None; ``older_tried``: torch's older
    format failed to read it as well."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        return None
    if not head:
        return "an empty file"
    return "not the zip file torch.save writes" + (", nor in its older format" if older_tried else "")


def _damaged_member(path: Path) -> str | None:
    """What fails its CRC-32 in the zip file of ``path`` (``torch.save``'s), or None: no damage found, or not a
    zip (torch's own errors tell those). Members that record no CRC (0: torch's set_crc32_options(False)) are not
    checked."""
    try:
        with zipfile.ZipFile(path) as z:
            for member in (m for m in z.infolist() if m.CRC):
                try:
                    with z.open(member) as f:  # zipfile compares the CRC-32 as the member is read to its end
                        while f.read(1 << 24):
                            pass
                except zipfile.BadZipFile:
                    return f"{member.filename} fails its checksum"
    except zipfile.BadZipFile:
        return None
    except Exception as e:  # cut short (zlib or EOF)
        return f"{type(e).__name__}: {e}"
    return None


def _torch_load(path: Path, what: str, error: type[ValueError], mmap: bool = False) -> Any:
    """``torch.load`` with ``weights_only`` (no code runs from the file); its many failures on truncated or
    foreign files raised as one ``error`` naming the file and ``what`` it should have been."""
    if not mmap and (damage := _damaged_member(path)):  # torch.load does not check: it read damaged weights
        raise error(f"{path}: a damaged {what} ({damage}); use another copy")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # torch's advice (weights_only=False) would run the file's code: not given
        if "Unsupported global" in str(e):  # refused for the Python objects in it, not for being garbage
            raise error(f"{path}: not a {what} (it holds Python objects, left unread)") from e
        raise error(f"{path}: not a readable {what} (not a torch file)") from e
    except Exception as e:
        lines = str(e).strip().splitlines()
        why = _not_torch_zip(path, older_tried=True) or f"{type(e).__name__}: {lines[0] if lines else ''}"
        raise error(f"{path}: not a readable {what} ({why})") from e


def _model_state(path: str | Path) -> dict[str, Any]:
    """:func:`load_checkpoint`, with the fields that rebuild its model checked: present and of their types."""
    state = load_checkpoint(path)
    missing = [k for k in ("model", "model_kwargs", "classes", "state_dict") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")

    def weights(value: Any) -> bool:
        return isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values())

    wrong = [
        k
        for k, ok in [
            ("model", isinstance(state["model"], str)),
            ("model_kwargs", isinstance(state["model_kwargs"], dict)),
            (
                "classes",
                isinstance(state["classes"], (list, tuple)) and all(isinstance(c, str) for c in state["classes"]),
            ),
            ("state_dict", weights(state["state_dict"])),
            ("ema_state_dict", state.get("ema_state_dict") is None or weights(state["ema_state_dict"])),
        ]
        if not ok
    ]
    if wrong:
        raise CheckpointError(f"{path}: a damaged checkpoint ({', '.join(wrong)} of the wrong type)")
    return state


def model_from_checkpoint(path: str | Path, ema: bool = True, finite: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint in eval mode; uses the EMA weights when present and ``ema``; refuses
    weights that give NaN or infinite scores unless not ``finite`` (to count parameters, say)."""
    state = _model_state(path)
    try:
        model = build_model(state["model"], num_classes=len(state["classes"]), **state["model_kwargs"])
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    weights = state.get("ema_state_dict") if ema and state.get("ema_state_dict") else state["state_dict"]
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()})
    except RuntimeError as e:
        msg = " ".join(str(e).split())
        raise CheckpointError(f"{path}: weights do not fit model {state['model']!r} ({msg})") from e
    _check_model(model.eval(), path, len(state["classes"]), finite)
    return model, state


def weights_digest(model: nn.Module) -> str:
    """A digest of a model's weights, taken as float16 so that a checkpoint and its float16 slim copy agree:
    what an export records of the weights it was made from."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        h.update(name.encode())
        h.update((t.half() if t.is_floating_point() else t).contiguous().numpy().tobytes())
    return h.hexdigest()


def run_name(path: str | Path, state: dict[str, Any]) -> str:
    """What a checkpoint is called in reports and the API: a run's ``best.pt`` by its run (the folder its config
    wrote to, wherever the file lies now; ``last.pt`` as ``<run>/last``), any other file by its name."""
    stem = Path(path).stem
    if stem not in ("best", "last"):
        return stem
    out = (state.get("config") or {}).get("out")
    run = Path(out).name if isinstance(out, str) and Path(out).name else Path(path).resolve().parent.name
    return run if stem == "best" else f"{run}/last"


def _check_model(model: nn.Module, path: str | Path, n_classes: int, finite: bool = True) -> None:
    """Refuse a model that does not map (N, 1, 48, 48) images to ``n_classes`` scores (one per class name),
    finite ones if ``finite``."""
    try:
        with torch.inference_mode():
            out = model(torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE))
    except RuntimeError as e:
        msg = " ".join(str(e).split())
        raise CheckpointError(f"{path}: not a ferkit emotion model (fails on a (N, 1, 48, 48) input: {msg})") from e
    if problem := scores_shape_problem(tuple(out.shape), 2, n_classes):
        raise CheckpointError(f"{path}: not a ferkit emotion model ({problem})")
    if finite and not torch.isfinite(out).all():  # NaN scores: "angry" at NaN confidence, NaN in JSON
        raise CheckpointError(f"{path}: its weights give NaN or infinite scores (a run that diverged?)")


def slim_checkpoint(path: str | Path, out: str | Path, half: bool = False) -> Path:
    """Write only what a checkpoint predicts with (its EMA weights when present, else its weights),
    without optimiser state, optionally as float16: for shipping and carrying between machines."""
    refuse_input(out, path, "the checkpoint", "another file for the slimmed one")  # last.pt is what --resume needs
    if Path(out).suffix.lower() not in (".pt", ".pth"):  # `-o model.onnx` wrote a checkpoint under an ONNX name
        raise ValueError(f"{out}: name the output *.pt (`ferkit export` writes ONNX)")
    if Path(out).is_file():  # another run's last.pt: that run could no longer resume
        with contextlib.suppress(CheckpointError):
            if "optimizer" in load_checkpoint(out, mmap=True):
                raise ValueError(f"{out}: a run's checkpoint to resume from; write the slimmed copy elsewhere")
    state = _model_state(path)
    weights = state.get("ema_state_dict") or state["state_dict"]
    if half:
        weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    keep = {k: state[k] for k in ("model", "model_kwargs", "classes", "input_size", "config", "metrics") if k in state}
    return save_checkpoint(out, {**keep, "state_dict": weights, "ema_state_dict": None})


Weights = dict[str, torch.Tensor]


def load_init_weights(
    model: nn.Module, path: str | Path, layout: Callable[[Weights], Weights] | None = None
) -> tuple[int, int, int]:
    """Load initial weights (e.g. ImageNet) from a local ``.pt``/``.pth``/``.safetensors`` file or a ferkit
    checkpoint (its EMA weights when it has them, the ones it was evaluated with).

    Tensors are matched by name (a ``net.`` prefix is tried for timm models), or, where that fits less, by the
    names ``layout`` gives the file's (another library's layout of the same network: models.FOREIGN_LAYOUTS);
    an RGB first convolution is summed over its input channels to take grayscale input; tensors whose shapes
    still differ (usually the classifier) are skipped. A file that fits less than half of the model's tensors
    is refused: it is for another architecture or layout. Returns the number of tensors loaded, of the file's
    left unused and of the model's left as initialised (BatchNorm's step counters not counted)."""
    path = Path(path)
    if problem := not_a_file(path, "initial weights file"):
        raise FileNotFoundError(f"{path}: {problem}")
    if path.suffix.lower() == ".onnx":
        raise ValueError(f"{path}: an ONNX model; initial weights come from a .pt, .pth or .safetensors file")
    safetensors = path.suffix.lower() == ".safetensors"
    state = _safetensors(path) if safetensors else _torch_load(path, "weights file", ValueError)
    source = ""  # what a ferkit checkpoint says it holds
    if isinstance(state, dict) and state.get("format") == FORMAT:
        source = f" (it is a ferkit checkpoint of {state.get('model')} {state.get('model_kwargs') or ''}".rstrip()
        source += ": give that model and those options)"
        state = state.get("ema_state_dict") or state.get("state_dict")
    elif isinstance(state, dict):
        state = state.get("state_dict", state.get("model", state))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a weights file (expected a mapping of names to tensors)")
    if state and all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    counted = [k for k in own if not k.endswith("num_batches_tracked")]
    loaded = _matching(state, own)
    if layout is not None and len(loaded) < len(own):
        converted = layout(state)  # (a vgg16_bn file's conv biases are folded into its BatchNorms)
        if len(other := _matching(converted, own)) > len(loaded):
            state, loaded = converted, other
    fits = sum(k in loaded for k in counted)
    used = sum(not k.endswith("num_batches_tracked") for k in loaded)
    unused = sum(not k.endswith("num_batches_tracked") for k in state) - used
    other = (
        "weights of another architecture or layer naming (ImageNet files fit timm:<arch> models, and vgg16 and "
        "resnet50v2 take vgg16_bn's and timm's resnetv2_50's; ferkit's own models take ferkit checkpoints)"
    )
    if fits < len(counted) / 2:
        raise ValueError(f"{path}: only {fits} of the model's {len(counted)} tensors match it by name and shape: "
                         f"{other}{source}")  # fmt: skip
    if unused > used:  # a few shapes shared by chance (BatchNorms', 3x3 convolutions'): not this network's file
        raise ValueError(f"{path}: {unused} of its tensors fit none of the model's, more than the {used} that do: "
                         f"{other}{source}")  # fmt: skip
    no_stats = [k for k in loaded if k.endswith(".weight") and k.replace(".weight", ".running_mean") in own
                and k.replace(".weight", ".running_mean") not in loaded]  # fmt: skip
    if no_stats:  # another normalisation (GroupNorm's, BiT's) in the same shapes, its convolutions for it too
        raise ValueError(f"{path}: {len(no_stats)} of the model's BatchNorms ({no_stats[0]}, ...) would take "
                         f"weights without running statistics, of another kind of normalisation: {other}")  # fmt: skip
    model.load_state_dict(loaded, strict=False)
    return used, unused, len(counted) - fits


def _safetensors(path: Path) -> Weights:
    """The tensors of a ``.safetensors`` file."""
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise ValueError(f"{path}: reading .safetensors files needs `pip install safetensors` ({e})") from e
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own errors and OSError for truncated or foreign files
        raise ValueError(f"{path}: not a readable weights file ({type(e).__name__}: {' '.join(str(e).split())})") from e


def _matching(state: Weights, own: Weights) -> Weights:
    """The tensors of ``state`` that fit ``own`` by name (or ``net.`` + name) and shape, an RGB first
    convolution summed to one input channel."""
    loaded = {}
    for key, value in state.items():
        target = key if key in own else f"net.{key}"
        if target not in own:
            continue
        if value.ndim == 4 and value.shape[1] == 3 and own[target].shape[1] == 1:
            value = value.sum(dim=1, keepdim=True)
        if value.shape == own[target].shape:
            loaded[target] = value
    return loaded
