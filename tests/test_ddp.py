"""torchrun/DDP on CPU (gloo, 2 processes) follows the documented data-parallel rule.

Rule (README, "Multi-GPU"): with W processes and global batch B, process r takes samples r, r+W, ...
of each global batch; gradients are averaged over processes, so one step equals a single-process step
on the mean of the W per-process losses. BatchNorm normalises each process's B/W samples with their
own statistics (unless --sync-bn, CUDA only). The reported train loss is the mean over all B samples.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from ferkit.checkpoint import load_checkpoint
from ferkit.data import CLASSES, FERData, save_cache
from ferkit.models import build_model
from ferkit.training import batch_indices, lr_factor, make_optimizer

WORLD, BATCH, STEPS = 2, 16, 3
MODEL_KWARGS = {"width": 0.25, "dropout": 0.0}


def _tiny_cache(path):
    rng = np.random.default_rng(0)
    n = 64
    labels = np.arange(n) % len(CLASSES)
    images = rng.integers(0, 256, (n, 48, 48), dtype=np.uint8)
    images[:, :, :24] //= (labels[:, None, None] + 1).astype(np.uint8)  # a learnable signal
    splits = np.zeros(n, dtype=np.uint8)
    splits[48:56], splits[56:] = 1, 2
    save_cache(FERData(images, labels.astype(np.int64), splits, np.array([f"img{i}" for i in range(n)])), path)
    return images[:48], labels[:48].astype(np.int64)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None and shutil.which("torchrun") is None,
    reason="torchrun not installed",
)
def test_ddp_two_processes_match_the_data_parallel_rule(tmp_path):
    images, labels = _tiny_cache(tmp_path / "tiny.npz")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={WORLD}",
        "--standalone",
        "-m",
        "ferkit",
        "train",
        "--data",
        str(tmp_path / "tiny.npz"),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--augment",
        "none",
        "--model-kwargs",
        str(MODEL_KWARGS),
        "--epochs",
        "1",
        "--max-steps",
        str(STEPS),
        "--batch-size",
        str(BATCH),
        "--lr",
        "0.05",
        "--no-progress",
        "--no-evaluate",
        "--threads",
        "1",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ck = load_checkpoint(out / "last.pt")
    cfg = ck["config"]

    # Single-process reference: the same initial weights, optimiser and schedule, with the gradient of
    # the mean of the per-process losses on each process's share of the global batch.
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg["model"], num_classes=len(CLASSES), **MODEL_KWARGS)
    from ferkit.augment import class_weights
    from ferkit.config import TrainConfig

    tc = TrainConfig.from_dict(cfg)
    opt = make_optimizer(model, tc)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(tc, s, len(labels) // BATCH))
    weights = torch.tensor(class_weights(labels, len(CLASSES), tc.class_weight_power), dtype=torch.float32)
    crit = nn.CrossEntropyLoss(weight=weights, label_smoothing=tc.label_smoothing)
    x_all = torch.from_numpy(images).unsqueeze(1).float() / 255
    y_all = torch.from_numpy(labels)
    model.train()
    loss_total = 0.0
    for step, idx in enumerate(batch_indices(len(labels), BATCH, tc.seed, 0)):
        if step == STEPS:
            break
        opt.zero_grad()
        for r in range(WORLD):
            part = idx[r::WORLD]
            loss = crit(model(x_all[part]), y_all[part])
            (loss / WORLD).backward()
            loss_total += loss.item() * len(part)
        opt.step()
        sched.step()

    ddp_params = ck["state_dict"]
    for name, p in model.named_parameters():
        assert torch.allclose(ddp_params[name], p.detach(), atol=2e-5), name
    with open(out / "metrics.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["train_loss"]) == pytest.approx(loss_total / (STEPS * BATCH), rel=1e-4)
