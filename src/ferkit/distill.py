"""Knowledge distillation: the teachers' softened probabilities as targets, computed on each batch, once per
training image (``distill_cache``, kept in the run's ``teacher_probs.npz``) or read from another run's targets
file, and the distillation loss."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .config import EVAL_BATCH_SIZE, TrainConfig
from .data import CLASSES
from .evaluate import load_for_evaluation, predict_proba_modes
from .fileio import atomic_write, bytes_digest, file_digest, not_a_file, read_npz

log = logging.getLogger("ferkit.train")


class _Tempered(nn.Module):
    """A model whose logits are divided by ``temperature`` (softened probabilities after a softmax)."""

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        self.model, self.temperature = model, temperature
        self.train(model.training)  # so that evaluating the wrapper leaves the teacher as it was

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float() / self.temperature


def teacher_probs(teachers: list[nn.Module], x: torch.Tensor, temperature: float) -> torch.Tensor:
    """The mean of the teachers' softened probabilities for the batch ``x``."""
    with torch.no_grad():
        return sum(torch.softmax(_Tempered(t, temperature)(x), 1) for t in teachers) / len(teachers)


def images_key(images: np.ndarray) -> str:
    """The count and digest of training images: what a targets file and a resumable run record of them."""
    return f"n={len(images)} sha256={bytes_digest(np.ascontiguousarray(images).data)}"


def _targets_key(images: np.ndarray, temperature: float, teachers: Sequence[str] = ()) -> list[str]:
    """What a targets file records of how it was made: its teachers' files (name and digest), the temperature,
    and the training images."""
    return [*(f"{name} sha256={file_digest(name)}" for name in teachers), f"T={temperature}", images_key(images)]


def is_targets_file(teacher: str) -> bool:
    """Whether a ``teacher`` entry is a targets file (another run's ``teacher_probs.npz``), not a model."""
    return Path(teacher).suffix.lower() == ".npz"


def load_targets_file(path: str | Path, images: np.ndarray, temperature: float) -> np.ndarray:
    """The per-image targets that a run with ``distill_cache`` wrote (``teacher_probs.npz``), checked to be
    for these training images and this temperature: teachers too big to move to a machine teach through it."""
    if problem := not_a_file(path, "file"):
        raise ValueError(f"distillation targets {path}: {problem}")
    try:
        f = read_npz(path, ["key", "probs"])
    except ValueError as e:
        raise ValueError(f"distillation targets {path}: not a teacher_probs.npz of a run ({e.__cause__})") from e
    key, probs = [str(k) for k in f["key"]], f["probs"]
    if len(key) < 3:
        raise ValueError(f"distillation targets {path}: not a teacher_probs.npz of a run (its key: {key})")
    t, images_now = _targets_key(images, temperature)
    if key[-2] != t:
        raise ValueError(f"distillation targets {path}: computed at {key[-2]}, this run's distill_temperature is "
                         f"{temperature}")  # fmt: skip
    if key[-1] != images_now or probs.shape != (len(images), len(CLASSES)):
        raise ValueError(f"distillation targets {path}: computed on other training images ({key[-1]}) than "
                         f"this run's ({images_now})")  # fmt: skip
    return probs


def cached_teacher_probs(
    cfg: TrainConfig,
    teachers: list[nn.Module],
    images: np.ndarray,
    device: torch.device,
    path: Path,
    rank: int = 0,
    world: int = 1,
) -> torch.Tensor:
    """The teachers' softened probabilities for each training image, averaged with its mirror image,
    computed once and kept in ``path`` (reused when the teachers' files, the temperature and the images match).
    Under torchrun process r computes images r, r+W, ... and the processes gather the whole."""
    key = np.asarray(_targets_key(images, cfg.distill_temperature, cfg.teacher))
    cached = None
    try:
        f = read_npz(path, ["key", "probs"]) if path.exists() else None
    except ValueError:  # a damaged cache is computed again
        f = None
    if f is not None and np.array_equal(f["key"], key) and f["probs"].shape == (len(images), len(CLASSES)):
        cached = f["probs"]
    if world > 1:  # all processes must take the same branch, or some would wait forever in the gather
        found = torch.tensor([int(cached is not None)], device=device)
        dist.all_reduce(found, op=dist.ReduceOp.MIN)
        cached = cached if found.item() else None
    if cached is not None:
        return torch.from_numpy(cached).to(device)
    shard = images[rank::world]
    probs = torch.zeros((len(shard), len(CLASSES)), device=device)
    for i, (t, name) in enumerate(zip(teachers, cfg.teacher, strict=True)):
        t0 = time.perf_counter()
        label = f"teacher {i + 1}/{len(teachers)} {name}" if cfg.progress and rank == 0 else None  # minutes on a CPU
        tempered = _Tempered(t, cfg.distill_temperature)
        p = predict_proba_modes(tempered, shard, device, batch_size=EVAL_BATCH_SIZE, modes=("flip",), progress=label)[
            "flip"
        ]
        probs += torch.from_numpy(p).to(device)
        log.info(
            "teacher targets %d/%d: %s on %d images x 2 (flip)%s, %.0f s",
            i + 1,
            len(teachers),
            name,
            len(images),
            f", a share in each of {world} processes" if world > 1 else "",
            time.perf_counter() - t0,
        )
    probs /= len(teachers)
    if world > 1:
        padded = torch.zeros((-(-len(images) // world), len(CLASSES)), device=device)  # all_gather needs one shape
        padded[: len(shard)] = probs
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        probs = torch.empty((len(images), len(CLASSES)), device=device)
        for r, part in enumerate(parts):
            probs[r::world] = part[: len(probs[r::world])]
    if rank == 0:
        out = probs.cpu().numpy()
        atomic_write(path, lambda f: np.savez(f, key=key, probs=out))
    return probs


def distill_loss(logits: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s distillation term: T^2 * KL(target || student) at temperature T, ``target`` being
    the teachers' softened probabilities."""
    log_p = torch.log_softmax(logits.float() / temperature, 1)
    return nn.functional.kl_div(log_p, target, reduction="batchmean") * temperature**2


def distill_targets(
    cfg: TrainConfig,
    device: torch.device,
    images: np.ndarray,
    out: Path,
    rank: int,
    world: int,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]:
    """A function of (indices, augmented batch) giving the teachers' targets for it: cached per image
    (``distill_cache``, or a targets file given as the teacher), computed on the batch itself, or None when
    there are no teachers. Call it under the student's autocast."""
    if cfg.teacher and is_targets_file(cfg.teacher[0]):  # _check_config: then it is the only teacher
        targets = torch.from_numpy(load_targets_file(cfg.teacher[0], images, cfg.distill_temperature)).to(device)
        log.info("distillation targets: %s", cfg.teacher[0])
        return lambda idx, x: targets[idx]
    teachers = []
    for t in cfg.teacher:
        try:
            teachers.append(load_for_evaluation(t)[0].to(device))
        except (ValueError, OSError) as e:  # a missing or broken file: say it is a teacher the config names
            hint = " (train or export it first, or change --teacher)" if not Path(t).exists() else ""
            raise ValueError(f"distillation teacher: {e}{hint}") from e
    if not teachers:
        return lambda idx, x: None
    if cfg.distill_cache:
        cached = cached_teacher_probs(cfg, teachers, images, device, out / "teacher_probs.npz", rank, world)
        return lambda idx, x: cached[idx]

    return lambda idx, x: teacher_probs(teachers, x, cfg.distill_temperature)
