"""The training loop: CPU or CUDA, single process or torchrun/DDP.

The training set lives on the device as uint8; each batch is gathered, augmented and fed to the
model there, so no DataLoader workers are needed. Every epoch ends with a PublicTest evaluation,
a metrics row, and atomic ``last.pt``/``best.pt`` checkpoints; ``resume=True`` continues from
``last.pt`` exactly (bitwise on the same device and thread count): batch order, augmentation and dropout are
seeded from (seed, epoch).
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .augment import PRESETS, AugmentConfig, augment, class_weights, mix, sample_weights
from .checkpoint import CheckpointError, load_checkpoint, load_init_weights, save_checkpoint
from .config import EVAL_BATCH_SIZE, IMAGE_SIZE, RESUMABLE_CHANGES, TrainConfig
from .data import CLASSES, SPLITS, load_dataset, stratified_subset
from .distill import distill_loss, distill_targets, images_key, is_targets_file
from .evaluate import evaluate_tta, predict_proba
from .fileio import LOCK_NAME, atomic_write, exclusive_folder, file_digest, refuse_file, stale_temp_files
from .models import FOREIGN_LAYOUTS, build_model
from .runtime import progress_bar, resolve_device

log = logging.getLogger("ferkit.train")
RUN_IN_PROGRESS = (
    "another training is writing to this folder (the run still going, or another started there); stop it "
    "before resuming, or give another --out"
)


def _cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX), by torch's private probes;
    assumed so where a torch version lacks them."""
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return not any(probes) or any(probe() for probe in probes if probe)


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype. On CUDA ``auto`` means bf16 where the GPU has it (Ampere and later), else fp16. On a
    CPU only an explicit ``bf16`` turns it on (about twice as fast on CPUs with AVX512-BF16 or AMX, see the
    README); ``auto`` stays float32 there, so CPU runs repeat exactly."""
    if cfg.amp == "none":
        return None
    if device.type == "cuda":
        # torch's default counts emulated bf16 as supported: a V100 or T4 would train in it, slowly
        if cfg.amp == "fp16" or (cfg.amp == "auto" and not torch.cuda.is_bf16_supported(including_emulation=False)):
            return torch.float16
        return torch.bfloat16
    if cfg.amp == "fp16":
        raise ValueError("fp16 autocast needs CUDA; on a CPU use --amp bf16 (or none)")
    if cfg.amp == "bf16":
        if not _cpu_has_native_bf16():
            log.warning("this CPU has no native bfloat16 (AVX512-BF16 or AMX): --amp bf16 will be emulated and slow")
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to ``dtype`` on ``device`` (from :func:`amp_dtype`); a no-op when it is None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def batch_indices(
    n: int, batch_size: int, seed: int, epoch: int, weights: np.ndarray | None = None, rank: int = 0, world: int = 1
) -> Iterator[torch.Tensor]:
    """Index batches for one epoch (full batches only). ``weights``: sample with replacement (balanced
    sampler). Under DDP each process takes every ``world``-th index of each global batch."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if weights is None:
        order = torch.randperm(n, generator=g)
    else:
        order = torch.multinomial(torch.as_tensor(weights), n, replacement=True, generator=g)
    for i in range(n // batch_size):
        yield order[i * batch_size : (i + 1) * batch_size][rank::world]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum or AdamW; no weight decay on norms and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


class WeightedSmoothedCE(nn.Module):
    """Cross-entropy against labels smoothed uniformly over the classes, each image weighted by its class's
    weight (a weighted mean over the batch). ``nn.CrossEntropyLoss(weight, label_smoothing)`` instead weights
    the smoothing term's class c by ``weight[c]``, which teaches every image a share of the rare classes
    (about 5% disgust for a happy face with FER-2013's square-root weights)."""

    def __init__(self, weight: torch.Tensor | None, smoothing: float) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(logits.float(), 1)
        nll = -log_p.gather(1, labels[:, None]).squeeze(1)
        loss = (1 - self.smoothing) * nll - self.smoothing * log_p.mean(1)
        if self.weight is None:
            return loss.mean()
        w = self.weight[labels]
        return (w * loss).sum() / w.sum()


def make_criterion(cfg: TrainConfig, labels: np.ndarray, device: torch.device) -> WeightedSmoothedCE:
    """Cross-entropy with label smoothing and, if ``cfg.class_weights``, dynamic class weights from ``labels``
    (not with the balanced sampler, which already shows every class equally often)."""
    weights = None
    if cfg.class_weights and cfg.sampler != "balanced":
        if absent := [c for i, c in enumerate(CLASSES) if not (labels == i).any()]:
            subset = f" in the {len(labels)}-image subset (train_limit)" if cfg.train_limit else ""
            raise ValueError(f"no Training images of {', '.join(absent)}{subset}: class weights need every class "
                             "(raise --train-limit, or --no-class-weights)")  # fmt: skip
        w = class_weights(labels, len(CLASSES), cfg.class_weight_power, cfg.class_weight_cap or None)
        weights = torch.tensor(w, dtype=torch.float32, device=device)
    return WeightedSmoothedCE(weights, cfg.label_smoothing).to(device)


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the peak LR at optimiser step ``step`` (per-step schedules)."""
    epoch = step / steps_per_epoch
    if cfg.schedule in ("constant", "plateau"):
        return 1.0
    if epoch < cfg.warmup_epochs:
        return min(1.0, (step + 1) / (cfg.warmup_epochs * steps_per_epoch))
    if cfg.schedule == "exponential":
        return cfg.decay_rate ** (epoch - cfg.warmup_epochs)
    if cfg.schedule == "cosine":
        t = (epoch - cfg.warmup_epochs) / max(1e-8, cfg.epochs - cfg.warmup_epochs)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def ema_update(decay: float, step: Callable[[], int]) -> Callable[..., None]:
    """An EMA update for ``AveragedModel`` whose decay warms up as ``min(decay, (1 + t) / (10 + t))`` at
    optimiser step ``t`` (as TensorFlow's ExponentialMovingAverage), so that the early averages are not
    dominated by the random initialisation. Integer buffers (BatchNorm's counts) take the model's value."""

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], _num_averaged: torch.Tensor) -> None:
        t = step()
        d = min(decay, (1 + t) / (10 + t))
        if torch.is_floating_point(ema_params[0]):
            torch._foreach_lerp_(ema_params, params, 1 - d)
        else:
            torch._foreach_copy_(ema_params, params)

    return update


@torch.no_grad()
def sam_perturb(params: list[nn.Parameter], rho: float) -> list[torch.Tensor]:
    """SAM's ascent step (Foret et al. 2021): move the weights by ``rho * g / ||g||``, ``g`` being their
    current gradient and the norm taken over all of them; returns the moves for :func:`sam_restore`."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    moves = [g * (rho / (norm + 1e-12)) for g in grads]
    torch._foreach_add_(params, moves)
    return moves


@torch.no_grad()
def sam_restore(params: list[nn.Parameter], moves: list[torch.Tensor]) -> None:
    """Undo :func:`sam_perturb`."""
    torch._foreach_sub_(params, moves)


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise by batch statistics but leave their running statistics alone (SAM's
    second pass sees the same batch again and must not count it twice)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def _setup_distributed(device_name: str) -> tuple[int, int, int]:
    """Initialise torch.distributed when launched by torchrun; returns (rank, world, local_rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_nccl = torch.cuda.is_available() and not device_name.startswith("cpu")
    if not dist.is_initialized():
        # torch.distributed.nn.functional's functions take group.WORLD as a default argument, bound at its first
        # import. Imported after init (DDP's constructor imports it through torch._dynamo), they keep the group
        # alive past destroy_process_group, and gloo's threads run into interpreter shutdown (where a rank once
        # aborted: "terminate called without an active exception"). Imported first, they bind None.
        from torch.distributed.nn import functional  # noqa: F401

        dist.init_process_group("nccl" if use_nccl else "gloo")
    return dist.get_rank(), world, local_rank


def _close_log() -> None:
    """Close the log's handlers (a previous run's train.log) and remove them; between runs the log is an
    ordinary one again, passing its messages to the application's handlers."""
    for h in log.handlers:
        h.close()
    log.handlers.clear()
    log.propagate = True
    log.setLevel(logging.NOTSET)


def _setup_logging(out: Path, rank: int) -> None:
    """The run's log to ``out/train.log`` and the console on rank 0, nowhere on the others."""
    _close_log()
    log.setLevel(logging.INFO)
    log.propagate = False
    if rank == 0:
        for h in (logging.FileHandler(out / "train.log"), logging.StreamHandler()):
            h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
            log.addHandler(h)


def _tensorboard(out: Path) -> Any:
    """A TensorBoard writer into ``out/tb`` when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tb"))


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def _check_config(cfg: TrainConfig, world: int, device: torch.device) -> nn.Module:
    """Refuse option combinations that cannot work, before any data is loaded; returns the run's model, freshly
    initialised on the CPU (:func:`new_model`: building it checks the model and its options)."""
    # fp16 exists only on CUDA (also --amp auto on a GPU without bf16). Not asked about bf16 on a CPU here,
    # where amp_dtype would log its emulation warning a second time.
    if cfg.amp == "fp16" or device.type == "cuda":
        fp16 = amp_dtype(cfg, device) == torch.float16  # refuses fp16 on a CPU
        if fp16 and cfg.sam_rho:
            raise ValueError("SAM (sam_rho) does not work with fp16 loss scaling; use --amp bf16 or none")
    files = [t for t in cfg.teacher if is_targets_file(t)]
    if files and len(cfg.teacher) > 1:
        raise ValueError(f"teacher: a targets file ({files[0]}) teaches alone, without other teachers")
    if cfg.distill_cache and not cfg.teacher:  # it was ignored
        raise ValueError("distill_cache keeps the targets of --teacher models: give them, or leave it out")
    if (cfg.distill_cache or files) and (cfg.mixup or cfg.cutmix):
        raise ValueError("distill_cache or a targets file cannot teach mixed images (mixup/cutmix): its targets "
                         "are per image")  # fmt: skip
    if cfg.sync_bn and world > 1 and device.type != "cuda":
        raise ValueError("sync_bn synchronises BatchNorm across CUDA processes only (torch's SyncBatchNorm)")
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {world} processes")
    if world > 1 and device.type == "cuda" and cfg.device not in ("auto", "cuda"):
        raise ValueError(f"device {cfg.device}: every process would use that one GPU; under torchrun use auto "
                         "or cuda (each process takes the GPU of its LOCAL_RANK)")  # fmt: skip
    return new_model(cfg, torch.device("cpu"))


def _load_splits(cfg: TrainConfig, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training and PublicTest images and labels (subsets when ``train_limit``/``val_limit`` say so)."""
    data = load_dataset(cfg.data, progress=cfg.progress and rank == 0)
    x, y = stratified_subset(*data.split("Training"), cfg.train_limit)
    xv, yv = stratified_subset(*data.split("PublicTest"), cfg.val_limit)
    if len(xv) == 0:
        raise ValueError(f"{cfg.data}: no PublicTest images; they are needed to select the best epoch")
    if len(x) == 0:
        raise ValueError(f"{cfg.data}: no Training images to train on")
    if len(x) < cfg.batch_size:
        raise ValueError(f"{cfg.data}: {len(x)} Training images, fewer than one batch of {cfg.batch_size}")
    if cfg.evaluate and cfg.epochs and not (data.splits == SPLITS.index("PrivateTest")).any():  # before training
        raise ValueError(f"{cfg.data}: no PrivateTest images for the final evaluation (--no-evaluate: none)")
    return x, y, xv, yv


def new_model(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The run's model, freshly initialised from its seed, on ``device`` (channels_last on CUDA if asked)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes=len(CLASSES), **cfg.model_kwargs)
    try:  # arguments that build a model for other images fail here, not at the first batch
        with torch.no_grad():
            model.eval()(torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE))
    except (RuntimeError, AssertionError, TypeError, ValueError) as e:  # timm's ViTs assert their input size
        resizes = cfg.model.startswith("timm:") and "pre_size" not in cfg.model_kwargs
        hint = "; give it {pre_size: N} to resize the faces to its size" if resizes else ""
        model_name = f"{cfg.model} {cfg.model_kwargs}" if cfg.model_kwargs else cfg.model
        raise ValueError(f"model {model_name}: cannot take FER-2013's images: "
                         f"{' '.join(str(e).split()).rstrip('.')}{hint}") from e  # fmt: skip
    return placed(model.train(), cfg, device)


def placed(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """``model`` on ``device`` (channels_last on CUDA if ``cfg`` asks)."""
    model = model.to(device)
    if device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def augmentation(cfg: TrainConfig) -> AugmentConfig:
    """The run's augmentation: its preset, with its mixup and CutMix."""
    return replace(PRESETS[cfg.augment], mixup=cfg.mixup, cutmix=cfg.cutmix, geometry=cfg.geometry)


def mixed_correct(logits: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor, lam: float) -> torch.Tensor:
    """How many of a batch's predictions are right, a mixed image (mixup/CutMix) counting by each of its two
    labels' share, ``lam`` and ``1 - lam``, as its loss does (it counted against ``ya`` alone)."""
    pred = logits.argmax(1)
    return lam * (pred == ya).sum() + (1 - lam) * (pred == yb).sum()


def augmented_batch(x_train: torch.Tensor, idx: torch.Tensor, aug: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """The training images ``idx`` (uint8 on the device) as an augmented float batch (N, 1, 48, 48) in [0, 1]."""
    return augment(x_train[idx].unsqueeze(1).float().div_(255), aug, g)


class _Run:
    """What a run updates and checkpoints: the model (``net``: wrapped for DDP/compile), the EMA of its
    weights, the optimizer, LR schedules, loss scaler and the state that ``last.pt`` resumes; and what
    each epoch reuses: the loss, augmentation and (balanced sampler) sample weights."""

    def __init__(
        self,
        cfg: TrainConfig,
        device: torch.device,
        world: int,
        labels: np.ndarray,
        steps_per_epoch: int,
        resuming: bool = False,
        model: nn.Module | None = None,
    ) -> None:
        """``model``: the run's freshly initialised model (:func:`new_model`), made now if not given."""
        self.cfg, self.device = cfg, device
        model = new_model(cfg, device) if model is None else placed(model, cfg, device)
        if cfg.init_weights and not resuming:  # a resumed run's weights come from its checkpoint
            counts = load_init_weights(model, cfg.init_weights, FOREIGN_LAYOUTS.get(cfg.model))
            log.info("initial weights %s: %d tensors loaded, %d of the file's unused, %d of the model's left as "
                     "initialised", cfg.init_weights, *counts)  # fmt: skip
        if world > 1 and cfg.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = self.net = model
        self.state: dict[str, Any] = dict(epoch=0, step=0, best_acc=-1.0, best_epoch=-1, bad_epochs=0, history=[])
        self.ema = None
        if cfg.ema:
            from torch.optim.swa_utils import AveragedModel

            self.ema = AveragedModel(
                model, multi_avg_fn=ema_update(cfg.ema, lambda: self.state["step"]), use_buffers=True
            )
        self.optimizer = make_optimizer(model, cfg)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(cfg, s, steps_per_epoch))
        self.plateau = (
            torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="max", factor=0.5, patience=cfg.plateau_patience, threshold=0
            )  # improvement as record() counts it: any higher PublicTest accuracy
            if cfg.schedule == "plateau"
            else None
        )
        self.dtype = amp_dtype(cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.criterion = make_criterion(cfg, labels, device)
        self.aug = augmentation(cfg)
        self.sampler_w = sample_weights(labels, len(CLASSES)) if cfg.sampler == "balanced" else None

    def resume(self, path: Path, ck: dict[str, Any]) -> None:
        """Continue from ``ck``, the ``last.pt`` at ``path`` written by :meth:`save`."""
        if "optimizer" not in ck or "train_state" not in ck:
            raise ValueError(f"{path}: no optimizer state to resume from (best.pt and slimmed files cannot resume)")
        self.model.load_state_dict(ck["state_dict"])  # the same model: _check_resumed_config compared them
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        if self.plateau is not None:
            self.plateau.load_state_dict(ck["plateau"])
        else:  # this step's LR on the run's schedule now (a longer cosine's), not the one saved with the step
            sched = self.scheduler
            for group, base, factor in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
                group["lr"] = base * factor(sched.last_epoch)
        if ck["scaler"]:  # empty where the run had no fp16 scaler (a CPU's): a GPU's fp16 starts it afresh
            self.scaler.load_state_dict(ck["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(ck["ema_module"])
        self.state = ck["train_state"]

    def wrap(self, world: int) -> None:
        """Wrap the model for DDP (under torchrun) and torch.compile, as the config says."""
        if world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if self.cfg.compile:
            self.net = torch.compile(self.net)

    def loss(
        self, x: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor, lam: float, target: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and the loss of one batch: labels (mixed by ``lam``), plus distillation towards
        ``target`` when there are teachers."""
        cfg = self.cfg
        with autocast(self.device, self.dtype):
            logits = self.net(x)
            loss = self.criterion(logits, ya)
            if lam < 1.0:
                loss = lam * loss + (1 - lam) * self.criterion(logits, yb)
            if target is not None:
                loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * distill_loss(
                    logits, target, cfg.distill_temperature
                )
        return logits, loss

    def step(
        self, x: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor, lam: float, target: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a batch (with SAM's second pass when ``sam_rho``); returns its logits and loss."""
        self.optimizer.zero_grad(set_to_none=True)
        logits, loss = self.loss(x, ya, yb, lam, target)
        self.scaler.scale(loss).backward()
        if self.cfg.sam_rho:  # step with the gradient at the worst weights within rho of the current ones
            moves = sam_perturb(self.params, self.cfg.sam_rho)
            self.optimizer.zero_grad(set_to_none=True)
            with frozen_batchnorm_stats(self.model):
                self.loss(x, ya, yb, lam, target)[1].backward()
            sam_restore(self.params, moves)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None  # fp16: a host sync per step
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if scale is not None and self.scaler.get_scale() < scale:  # inf/NaN gradients: the optimizer did not step
            return logits, loss  # nor do the LR schedule, the EMA and the step count (torch warned of the schedule)
        if self.plateau is None:  # LambdaLR.step() would reset the LR that ReduceLROnPlateau lowered
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.state["step"] += 1
        return logits, loss

    def validate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """PublicTest loss and accuracy of the EMA weights (or the model's without EMA)."""
        probs = predict_proba(
            self.ema.module if self.ema is not None else self.model, x, device=self.device, batch_size=EVAL_BATCH_SIZE
        )
        return float(-np.log(probs[np.arange(len(y)), y] + 1e-12).mean()), float((probs.argmax(1) == y).mean())

    def record(self, row: dict[str, Any]) -> bool:
        """Add an epoch's metrics row to the state; True when its PublicTest accuracy is the best so far."""
        state = self.state
        state["history"].append(row)
        state["epoch"] = row["epoch"]
        improved = row["val_acc"] > state["best_acc"]
        if improved:
            state.update(best_acc=row["val_acc"], best_epoch=row["epoch"], bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        return improved

    def save(self, out: Path, improved: bool) -> None:
        """Write ``last.pt`` (everything :meth:`resume` needs), then, when ``improved``, ``best.pt``: a kill in
        between leaves a best.pt older than last.pt's best epoch, which :meth:`repair_best` rewrites, never a
        best.pt of an epoch that last.pt (and so a resumed run) does not have."""
        resumable = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "plateau": self.plateau.state_dict() if self.plateau is not None else None,
            "scaler": self.scaler.state_dict(),
            "ema_module": self.ema.state_dict() if self.ema is not None else None,
            "train_state": self.state,
        }
        save_checkpoint(out / "last.pt", {**self._weights(), **resumable})
        if improved:
            save_checkpoint(out / "best.pt", self._weights())

    def repair_best(self, out: Path) -> None:
        """After a resume: rewrite ``best.pt`` if a kill came between last.pt and it (the best epoch is the
        last one, whose weights the run has)."""
        best, epoch = out / "best.pt", self.state["best_epoch"]
        if epoch < 1 or epoch != self.state["epoch"]:
            return
        try:
            saved = load_checkpoint(best, mmap=True).get("metrics", {}).get("epoch") if best.exists() else None
        except CheckpointError:  # damaged: rewritten too
            saved = None
        if saved != epoch:
            log.info("%s: rewriting it with epoch %d, the best (the run was stopped before writing it)", best, epoch)
            save_checkpoint(best, self._weights())

    def _weights(self) -> dict[str, Any]:
        """What every checkpoint holds: the model, its weights (and EMA's), config and latest metrics row."""
        return {
            "model": self.cfg.model,
            "model_kwargs": self.cfg.model_kwargs,
            "classes": list(CLASSES),
            "input_size": IMAGE_SIZE,
            "config": self.cfg.to_dict(),
            "state_dict": self.model.state_dict(),
            "ema_state_dict": self.ema.module.state_dict() if self.ema is not None else None,
            "metrics": self.state["history"][-1] if self.state["history"] else {},
        }


def _train_epoch(
    run: _Run,
    epoch: int,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    targets: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None],
    rank: int,
    world: int,
) -> dict[str, float]:
    """One pass over the training set: gather, augment and mix each batch on the device, step; returns
    the epoch's training loss and accuracy (over all processes), its time and img/s."""
    cfg, device, aug = run.cfg, run.device, run.aug
    epoch_seed = cfg.seed * 1_000_003 + epoch + 100_003 * rank  # each process its own random stream
    torch.manual_seed(epoch_seed)  # dropout
    g = torch.Generator(device).manual_seed(epoch_seed)  # augmentation
    rng = np.random.default_rng([cfg.seed, epoch, rank])
    run.net.train()
    t0, seen = time.perf_counter(), 0
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    steps = len(x_train) // cfg.batch_size
    batches = batch_indices(len(x_train), cfg.batch_size, cfg.seed, epoch, run.sampler_w, rank, world)
    bar = None
    if cfg.progress and rank == 0:
        bar = progress_bar(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch")
    for i, idx in enumerate(batches):
        idx = idx.to(device, non_blocking=True)
        x = augmented_batch(x_train, idx, aug, g)
        x, ya, yb, lam = mix(x, y_train[idx], aug, g, rng)
        if device.type == "cuda" and cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, run.dtype):  # teachers run as the student does
            target = targets(idx, x)
        lr = run.optimizer.param_groups[0]["lr"]  # this step's: the scheduler sets the next one in it
        logits, loss = run.step(x, ya, yb, lam, target)
        seen += len(idx)
        loss_sum += loss.detach() * len(idx)
        correct += mixed_correct(logits, ya, yb, lam)
        last = bool(cfg.max_steps) and run.state["step"] >= cfg.max_steps
        if bar is not None:  # counted here, not by wrapping the batches: that left max_steps' last one out
            bar.update()
            if i % 10 == 0 or i == steps - 1 or last:
                bar.set_postfix(
                    loss=f"{loss_sum.item() / seen:.3f}",
                    acc=f"{correct.item() / seen:.3f}",
                    lr=f"{lr:.2e}",
                    img_s=f"{seen * world / (time.perf_counter() - t0):.0f}",
                    refresh=False,  # shown at the bar's next draw: a draw of its own each time filled logs
                )
        if last:
            break
    if bar is not None:
        bar.close()
    train_time = time.perf_counter() - t0
    if world > 1:  # report the loss and accuracy over the global batch, not this process's share
        dist.all_reduce(loss_sum)
        dist.all_reduce(correct)
        seen *= world
    return {
        "train_loss": loss_sum.item() / max(1, seen),
        "train_acc": correct.item() / max(1, seen),
        "epoch_time_s": train_time,
        "img_per_s": seen / train_time,
    }


def _config_changes(saved: dict[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """The settings of ``cfg`` that differ from a run's ``saved`` config: ``{name: (saved, now)}``. A setting newer
    than the run, which its config lacks, was trained at its default (``geometry`` 1.0 was every run's before it)."""
    now = cfg.to_dict()
    saved = {**TrainConfig().to_dict(), **saved}
    return {k: (v, now[k]) for k, v in saved.items() if k in now and v != now[k]}


def _check_resumed_config(path: Path, saved: dict[str, Any], cfg: TrainConfig) -> None:
    """Refuse to resume the run of ``path`` with settings other than its own (but RESUMABLE_CHANGES)."""
    if wrong := {k: c for k, c in _config_changes(saved, cfg).items() if k not in RESUMABLE_CHANGES}:
        diff = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in wrong.items())
        raise ValueError(
            f"{path}: this run was trained with other settings ({diff}); resume it without changing them "
            f"(with no --config, --resume reads them from {path})"
        )


def train(cfg: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train a model as ``cfg`` says, then (``cfg.evaluate``, on rank 0) evaluate its best.pt on PrivateTest into
    ``out/eval``; returns the final training state (best accuracy, epochs, paths) with that report as
    ``"evaluation"`` (None when not evaluated: no epoch trained, or another rank). An error of the evaluation
    propagates; the run's checkpoints are written by then."""
    owned = not dist.is_initialized()
    rank, world, local_rank = _setup_distributed(cfg.device)
    try:
        with contextlib.ExitStack() as held:  # the run folder's lock, while the run lasts
            result = _train(cfg, resume, rank, world, local_rank, held)
    finally:  # a process that exits with the group alive can abort in gloo's threads ("terminate called ...")
        _close_log()  # train.log closed: the next run's messages went into it (the Python API, run after run)
        if owned and dist.is_initialized():
            dist.destroy_process_group()
    result["evaluation"] = None
    if cfg.evaluate and result["history"] and rank == 0:
        out = Path(cfg.out) / "eval"
        reports = evaluate_tta([result["best"]], cfg.data, "PrivateTest", out, [cfg.tta], cfg.device,
                               progress=cfg.progress)  # fmt: skip
        result["evaluation"] = reports[cfg.tta]
    return result


def _resumable(cfg: TrainConfig, resume: bool) -> dict[str, Any] | None:
    """The ``last.pt`` of the run in ``cfg.out`` to continue, checked against ``cfg``, or None for a new run;
    refuses an ``--out`` that is a file or holds a run without ``--resume``, and teacher or initial-weights
    files that are missing (before the data is read)."""
    out = Path(cfg.out)
    refuse_file(out, "--out")
    held = [name for name in ("last.pt", "best.pt") if (out / name).exists()]
    if held and not resume:
        raise ValueError(f"{out} already holds a run ({held[0]}): --resume continues it, another --out starts anew")
    if held == ["best.pt"]:
        raise ValueError(f"{out} holds a best.pt but no last.pt to resume from (best.pt keeps no optimizer state): "
                         "another --out starts anew")  # fmt: skip
    wanted = [*(("teacher", t) for t in cfg.teacher), *([("init-weights", cfg.init_weights)] if not held else [])]
    if missing := [(option, path) for option, path in wanted if path and not Path(path).is_file()]:
        option, path = missing[0]
        hint = "train or export it first, or change it" if option == "teacher" else "nothing is downloaded"
        if held and not Path(path).is_absolute():  # the run's teacher, recorded as given: a path from where it began
            hint = "the run was given it relative to the folder it started in: resume it from there"
        problem = "a folder, not a file" if Path(path).is_dir() else "no such file"
        raise FileNotFoundError(f"--{option} {path}: {problem} ({hint})")
    if not held:
        return None
    last = load_checkpoint(out / "last.pt")
    _check_resumed_config(out / "last.pt", last.get("config") or {}, cfg)
    if cfg.epochs < (done := last.get("train_state", {}).get("epoch", 0)):
        raise ValueError(f"{out / 'last.pt'}: the run has trained {done} epochs, more than --epochs {cfg.epochs}")
    return last


def _lock_run(out: Path, held: contextlib.ExitStack) -> bool:
    """Lock the run folder ``out`` until ``held`` closes (the run's end): another training there is refused;
    False where its file system takes no locks."""
    return held.enter_context(exclusive_folder(out, RUN_IN_PROGRESS))


def _start(
    cfg: TrainConfig, resume: bool, rank: int, world: int, local_rank: int, held: contextlib.ExitStack
) -> tuple[_Run, tuple[np.ndarray, ...], Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]]:
    """Check the options, load the data, build (or resume) the run and its teachers' targets; ``held`` keeps
    the run folder locked (rank 0) until the run ends."""
    device = _use_device(cfg, local_rank)
    out = Path(cfg.out)
    model = _check_config(cfg, world, device)
    locked = _lock_run(out, held) if rank == 0 and out.is_dir() else None  # before its last.pt is read
    last = _resumable(cfg, resume)
    x_np, y_np, xv_np, yv_np = _load_splits(cfg, rank)
    images = images_key(x_np)
    if last is not None and last.get("train_state", {}).get("train_images", images) != images:
        raise ValueError(  # its schedule counts steps of an epoch of those images (runs before this check: not)
            f"{out / 'last.pt'}: this run trained on other images ({last['train_state']['train_images']}) than "
            f"{cfg.data} holds ({images}); --data may change on resuming only to where the same data lies, in the "
            "same order (the CSV and the image folders list FER-2013 in different orders)"
        )
    new_folder = not out.exists()
    out.mkdir(parents=True, exist_ok=True)  # once the options and the data passed
    if rank == 0:
        locked = _take_run_folder(out, locked, last is not None, held)
    _setup_logging(out, rank)
    if locked is False:
        log.warning("%s: its file system takes no locks: make sure no other training writes there", out)
    try:
        run = _Run(cfg, device, world, y_np, len(x_np) // cfg.batch_size, resuming=last is not None, model=model)
        targets = distill_targets(cfg, device, x_np, out, rank, world)
    except BaseException:  # a model, initial weights or targets that fail: no run folder with only its log left
        if new_folder and rank == 0:
            _remove_failed_start(out)
        raise
    changes = _resume(run, cfg, last, rank) if last is not None else {}
    if last is None and resume:
        log.info("no %s to resume from; starting a new run", out / "last.pt")
    run.state["train_images"] = images
    teachers = [file_digest(t) for t in cfg.teacher]  # what taught it: a resume may go on with retrained ones
    if last is not None and run.state.get("teachers", teachers) != teachers:
        log.warning("the --teacher files changed since this run last started: its next epochs learn other targets")
    run.state["teachers"] = teachers
    run.state.setdefault("starts", []).append(  # what a bitwise repeat needs beyond config.yaml, per (re)start
        {
            "epoch": run.state["epoch"],
            "changes": changes,
            "torch": str(torch.__version__),  # a TorchVersion: weights_only loading refuses that class
            "device": str(device),
            "threads": torch.get_num_threads(),
            "processes": world,
        }
    )
    if rank == 0:  # the recipe beside the run's logs (once a resume has succeeded), even where no checkpoint is kept
        cfg.to_yaml(out / "config.yaml")
    run.wrap(world)
    if run.state["epoch"] == 0 and rank == 0:
        _log_new_run(run, device, world, len(x_np), len(xv_np))
    return run, (x_np, y_np, xv_np, yv_np), targets


def _use_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    """This process's torch device (``cfg.device``, the local GPU under torchrun), and ``cfg.threads``."""
    device = resolve_device(cfg.device, local_rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives run on the current device
        torch.backends.cudnn.benchmark = True  # full batches only: every step has the same shapes
    return device


def _take_run_folder(out: Path, locked: bool | None, resuming: bool, held: contextlib.ExitStack) -> bool:
    """Lock the run folder ``out`` (rank 0) if that was not done before it existed, and sweep what a killed write
    left; returns whether it is locked (False: its file system takes no locks)."""
    if locked is None:  # a folder made now, or by another process since this one looked
        locked = _lock_run(out, held)
        if not resuming and any((out / name).exists() for name in ("last.pt", "best.pt")):
            raise RuntimeError(f"{out}: {RUN_IN_PROGRESS}")
    for stale in stale_temp_files(out):
        stale.unlink(missing_ok=True)
    return locked


def _remove_failed_start(out: Path) -> None:
    """Remove the run folder ``out`` that a start which failed made, if it holds only its log and lock file."""
    if {p.name for p in out.iterdir()} - {LOCK_NAME} == {"train.log"}:
        _close_log()
        for name in ("train.log", LOCK_NAME):
            (out / name).unlink(missing_ok=True)
        out.rmdir()


def _resume(run: _Run, cfg: TrainConfig, last: dict[str, Any], rank: int) -> dict[str, tuple[Any, Any]]:
    """Continue ``run`` from its ``last`` checkpoint; returns the settings changed since (RESUMABLE_CHANGES)."""
    out = Path(cfg.out)
    run.resume(out / "last.pt", last)
    log.info("resumed from %s at epoch %d", out / "last.pt", run.state["epoch"])
    changes = _config_changes(last.get("config") or {}, cfg)  # the allowed ones, logged now
    for k, (old, new) in changes.items():
        log.info("resuming with %s %r instead of %r", k, new, old)
    if rank == 0:  # what a kill after last.pt's write left unwritten
        _write_metrics(out / "metrics.csv", run.state["history"])
        run.repair_best(out)
    return changes


def _log_new_run(run: _Run, device: torch.device, world: int, n_train: int, n_val: int) -> None:
    """What a new run trains, and the settings worth a look (a warm-up longer than the run, the class weights)."""
    cfg = run.cfg
    log.info(
        "training %s on %s (%d processes): %d train / %d PublicTest images, %d steps/epoch",
        *(cfg.model, device, world, n_train, n_val, n_train // cfg.batch_size),
    )
    if cfg.warmup_epochs > cfg.epochs:
        log.warning("warmup_epochs %g is longer than the run (%d epochs): the LR never reaches --lr %g",
                    cfg.warmup_epochs, cfg.epochs, cfg.lr)  # fmt: skip
    if (weights := run.criterion.weight) is not None:
        log.info("class weights: %s", {c: round(w, 3) for c, w in zip(CLASSES, weights.tolist(), strict=True)})
    elif cfg.class_weights and cfg.sampler == "balanced":
        log.info("class weights: none (the balanced sampler shows every class equally often)")


def _stopped(cfg: TrainConfig, state: dict[str, Any], rank: int) -> bool:
    """Whether the run is over before its next epoch: ``max_steps`` reached, or early stopping."""
    if cfg.max_steps and state["step"] >= cfg.max_steps:
        if rank == 0:
            log.info("max_steps %d reached: training stops (a larger --max-steps goes on)", cfg.max_steps)
        return True
    if cfg.patience and state["bad_epochs"] >= cfg.patience:  # also a resumed run that had stopped
        if rank == 0:
            log.info("early stopping: no PublicTest improvement for %d epochs", cfg.patience)
        return True
    return False


def _validate_on_rank0(run: _Run, xv: np.ndarray, yv: np.ndarray, rank: int, world: int) -> tuple[float, float]:
    """PublicTest loss and accuracy. Under DDP the processes' BatchNorm statistics differ: all of them decide
    (best epoch, plateau, early stopping) on rank 0's numbers, those of the weights it saves."""
    val_loss, val_acc = run.validate(xv, yv) if rank == 0 else (0.0, 0.0)
    if world > 1:
        shared = torch.tensor([val_loss, val_acc], dtype=torch.float64, device=run.device)
        dist.broadcast(shared, src=0)
        val_loss, val_acc = shared.tolist()
    return val_loss, val_acc


def _report_epoch(out: Path, run: _Run, row: dict[str, Any], improved: bool, tb: Any) -> None:
    """The epoch's log line, metrics.csv and TensorBoard scalars (rank 0)."""
    log.info(
        "epoch %d: train loss %.4f acc %.4f | PublicTest loss %.4f acc %.4f%s | %.0f img/s",
        *(row["epoch"], row["train_loss"], row["train_acc"], row["val_loss"], row["val_acc"]),
        *(" (best)" if improved else "", row["img_per_s"]),
    )
    _write_metrics(out / "metrics.csv", run.state["history"])
    if tb is not None:
        for key, value in row.items():
            tb.add_scalar(key, value, row["epoch"])
        tb.flush()


def _train(
    cfg: TrainConfig, resume: bool, rank: int, world: int, local_rank: int, held: contextlib.ExitStack
) -> dict[str, Any]:
    run, (x_np, y_np, xv_np, yv_np), targets = _start(cfg, resume, rank, world, local_rank, held)
    out = Path(cfg.out)
    x_train, y_train = torch.from_numpy(x_np).to(run.device), torch.from_numpy(y_np).to(run.device)
    tb = _tensorboard(out) if rank == 0 else None
    for epoch in range(run.state["epoch"], cfg.epochs):
        if _stopped(cfg, run.state, rank):
            break
        lr = run.optimizer.param_groups[0]["lr"]  # the epoch's first step's (after it: the next epoch's)
        fit = _train_epoch(run, epoch, x_train, y_train, targets, rank, world)
        if not math.isfinite(fit["train_loss"]):  # the same in every process (all-reduced); nothing saved
            raise ValueError(f"training diverged: train loss {fit['train_loss']} in epoch {epoch + 1} (try a lower "
                             f"--lr than {cfg.lr:g}); the checkpoints of earlier epochs are kept")  # fmt: skip
        val_loss, val_acc = _validate_on_rank0(run, xv_np, yv_np, rank, world)
        if run.plateau is not None:
            run.plateau.step(val_acc)
        row = {
            "epoch": epoch + 1,
            "step": run.state["step"],
            "lr": lr,
            "train_loss": fit["train_loss"],
            "train_acc": fit["train_acc"],
            "val_loss": val_loss,
            "val_acc": val_acc,
            "epoch_time_s": fit["epoch_time_s"],
            "img_per_s": fit["img_per_s"],
        }
        improved = run.record(row)
        if rank == 0:  # checkpoints first: metrics.csv never lists an epoch that last.pt has not
            run.save(out, improved)
            _report_epoch(out, run, row, improved, tb)
    state = run.state
    if rank == 0 and not state["history"]:  # --epochs 0: e.g. only the distill_cache targets
        log.info("no epoch trained (epochs %d): no checkpoint", cfg.epochs)
    elif rank == 0:
        log.info("best PublicTest accuracy %.4f at epoch %d; checkpoint %s", state["best_acc"], state["best_epoch"],
                 out / "best.pt")  # fmt: skip
    if tb is not None:
        tb.close()
    if world > 1:
        dist.barrier()
    return {**state, "best": str(out / "best.pt"), "last": str(out / "last.pt")}
