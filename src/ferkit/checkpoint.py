"""Checkpoints: written atomically, read with a clear error when a file is missing or corrupt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .data import scores_shape_problem
from .fileio import atomic_write
from .models import build_model

FORMAT = "ferkit-checkpoint/1"


class CheckpointError(ValueError):
    """A file that is not a usable ferkit checkpoint; the message names it."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Save ``state`` (which must hold model, model_kwargs, classes and state_dict) atomically."""
    return atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # no code runs from the file
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a ferkit checkpoint (no '{FORMAT}' marker)")
    return state


def model_from_checkpoint(path: str | Path, ema: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint in eval mode; uses the EMA weights when present and ``ema``."""
    state = load_checkpoint(path)
    missing = [k for k in ("model", "model_kwargs", "classes", "state_dict") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
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
    _check_model(model.eval(), path, len(state["classes"]))
    return model, state


def _check_model(model: nn.Module, path: str | Path, n_classes: int) -> None:
    """Refuse a model that does not map (N, 1, 48, 48) images to ``n_classes`` scores (one per class name)."""
    try:
        with torch.inference_mode():
            out = model(torch.zeros(2, 1, 48, 48))
    except RuntimeError as e:
        msg = " ".join(str(e).split())
        raise CheckpointError(f"{path}: not a ferkit emotion model (fails on a (N, 1, 48, 48) input: {msg})") from e
    if problem := scores_shape_problem(tuple(out.shape), 2, n_classes):
        raise CheckpointError(f"{path}: not a ferkit emotion model ({problem})")


def slim_checkpoint(path: str | Path, out: str | Path, half: bool = False) -> Path:
    """Write only what a checkpoint predicts with (its EMA weights when present, else its weights),
    without optimiser state, optionally as float16: for shipping and carrying between machines."""
    state = load_checkpoint(path)
    weights = state.get("ema_state_dict") or state["state_dict"]
    if half:
        weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    keep = {k: state[k] for k in ("model", "model_kwargs", "classes", "input_size", "config", "metrics") if k in state}
    return save_checkpoint(out, {**keep, "state_dict": weights, "ema_state_dict": None})
