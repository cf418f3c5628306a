"""Training throughput: ferkit's real training loop vs a pure forward+backward+step loop on synthetic data.

The real loop is ``ferkit.training.train`` on the FER-2013 cache (gather from the uint8 training set,
batched augmentation, class-weighted label-smoothed loss, SGD/AdamW, LR schedule, bookkeeping) for
``--steps`` optimiser steps; its img/s is the ``img_per_s`` of the returned history (training time only:
the PublicTest evaluation and checkpoints at the end of the epoch are not in it). The synthetic loop runs
the same model, batch size, optimizer and loss on random batches already in memory. Both start from a
fresh model and optimizer after one untimed warm-up of each in the same process, and the two alternate
``--repeats`` times; the medians are reported. Goal: loop >= 90% of synthetic.

    .venv/bin/python benchmarks/train_throughput.py --model ferkit_small --batch-size 128 --steps 60 --threads 2
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from _common import (
    ROOT,
    base_parser,
    load_fer,
    machine_info,
    median,
    print_table,
    threads_or_cores,
    warn_if_busy,
    write_report,
)

from ferkit.config import IMAGE_SIZE, TrainConfig
from ferkit.data import CLASSES, stratified_subset
from ferkit.models import build_model, describe
from ferkit.runtime import resolve_device
from ferkit.training import (
    amp_dtype,
    augmentation,
    augmented_batch,
    autocast,
    make_criterion,
    make_optimizer,
    new_model,
    train,
)

GOAL = 0.90


def parse_args(argv: list[str] | None = None):
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ferkit_small", help="model name (ferkit models)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=60, help="timed optimiser steps per run")
    p.add_argument("--repeats", type=int, default=3, help="alternating loop/synthetic runs; medians are reported")
    p.add_argument("--warmup-steps", type=int, default=3, help="steps of the untimed warm-up run of each")
    p.add_argument(
        "--config",
        type=Path,
        default=ROOT / "configs" / "small.yaml",
        help="training config whose optimizer, loss and augmentation settings are used ('' = TrainConfig defaults)",
    )
    p.add_argument(
        "--train-limit",
        type=int,
        default=0,
        help="training subset size (0 = the whole Training split); must hold --steps full batches",
    )
    p.add_argument("--device", default="cpu", help="cpu (the goal is stated for CPU), or cuda")
    p.add_argument(
        "--amp",
        default="auto",
        choices=["auto", "bf16", "fp16", "none"],
        help="autocast of both loops, as `ferkit train --amp` (auto: float32 on a CPU); bf16 and fp16 write "
        "train_throughput_<amp>.json",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats, args.warmup_steps, args.batch_size = 3, 1, 1, min(args.batch_size, 32)
        args.train_limit = args.train_limit or 2048
    return args


def make_config(args, out: Path) -> TrainConfig:
    overrides = dict(
        data=str(args.data),
        out=str(out),
        model=args.model,
        batch_size=args.batch_size,
        epochs=1,
        max_steps=args.steps,
        train_limit=args.train_limit,
        val_limit=args.batch_size,  # the end-of-epoch evaluation is not timed; keep it short anyway
        progress=False,
        evaluate=False,  # no PrivateTest report after each timed loop
        patience=0,
        threads=args.threads,
        device=args.device,
        amp=args.amp,
    )
    if str(args.config) in ("", "."):  # '' asks for the defaults (argparse made it Path(''), '.')
        return TrainConfig(**overrides)
    if not Path(args.config).is_file():  # a misspelt name benchmarked the defaults, reported as the config's
        raise SystemExit(f"--config {args.config}: no such file ('' for TrainConfig's defaults)")
    return TrainConfig.from_yaml(args.config, **overrides)


def run_loop(cfg: TrainConfig) -> dict:
    t0 = time.perf_counter()
    state = train(cfg)
    wall = time.perf_counter() - t0
    row = state["history"][-1]
    if len(state["history"]) != 1 or row["step"] != cfg.max_steps:
        raise RuntimeError(f"expected one epoch of {cfg.max_steps} steps, got {state['history']}")
    return {"img_per_s": row["img_per_s"], "train_time_s": row["epoch_time_s"], "call_wall_s": wall}


class Synthetic:
    """Forward + backward + optimizer step of the same model/optimizer/loss on in-memory random batches."""

    def __init__(self, cfg: TrainConfig, labels, device: torch.device, n_batches: int = 8) -> None:
        self.cfg, self.device = cfg, device
        g = torch.Generator().manual_seed(0)
        size = (cfg.batch_size, 1, IMAGE_SIZE, IMAGE_SIZE)
        self.xs = [torch.rand(size, generator=g).to(device) for _ in range(n_batches)]
        self.ys = [torch.randint(0, len(CLASSES), (cfg.batch_size,), generator=g).to(device) for _ in range(n_batches)]
        self.criterion = make_criterion(cfg, labels, device)
        self.dtype = amp_dtype(cfg, device)
        if device.type == "cuda" and cfg.channels_last:
            self.xs = [x.contiguous(memory_format=torch.channels_last) for x in self.xs]

    def run(self, steps: int) -> dict:
        cfg = self.cfg
        model = new_model(cfg, self.device)
        model.train()
        optimizer = make_optimizer(model, cfg)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for i in range(steps):
            x, y = self.xs[i % len(self.xs)], self.ys[i % len(self.ys)]
            with autocast(self.device, self.dtype):
                loss = self.criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        sync()
        elapsed = time.perf_counter() - t0
        return {"img_per_s": steps * cfg.batch_size / elapsed, "train_time_s": elapsed}


def data_prep_rate(cfg: TrainConfig, x_train: torch.Tensor, steps: int, device: torch.device) -> float:
    """img/s of the loop's per-batch data work alone: index gather, uint8->float, augmentation."""
    aug = augmentation(cfg)
    g = torch.Generator(device).manual_seed(0)
    perm = torch.randperm(len(x_train))
    t0 = time.perf_counter()
    for i in range(steps):
        idx = perm[(i * cfg.batch_size) % (len(x_train) - cfg.batch_size) :][: cfg.batch_size].to(device)
        augmented_batch(x_train, idx, aug, g)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * cfg.batch_size / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = threads_or_cores(args.threads)
    args.threads = threads
    torch.set_num_threads(threads)
    device = resolve_device(args.device)
    warn_if_busy(threads)

    data = load_fer(args.data)
    x_np, y_np = data.split("Training")
    x_np, y_np = stratified_subset(x_np, y_np, args.train_limit)
    need = max(args.steps, args.warmup_steps) * args.batch_size
    if len(x_np) < need:
        sys.exit(f"--steps {args.steps} x --batch-size {args.batch_size} = {need} images > {len(x_np)} in the subset")

    with tempfile.TemporaryDirectory(prefix="ferkit-bench-") as tmp:
        cfg = make_config(args, Path(tmp) / "run")
        extras = [k for k in ("mixup", "cutmix", "ema", "teacher") if getattr(cfg, k)]
        if extras:
            print(f"note: the config turns on {', '.join(extras)}: part of the loop, not of the synthetic step")
        synthetic = Synthetic(cfg, y_np, device)
        print(f"warm-up: {args.warmup_steps} steps of each", flush=True)
        run_loop(replace(cfg, max_steps=args.warmup_steps, out=str(Path(tmp) / "warmup")))
        synthetic.run(args.warmup_steps)

        loops, synths = [], []
        for r in range(args.repeats):
            loops.append(run_loop(replace(cfg, out=str(Path(tmp) / f"run{r}"))))
            synths.append(synthetic.run(args.steps))
            print(
                f"repeat {r + 1}/{args.repeats}: loop {loops[-1]['img_per_s']:.1f} img/s, "
                f"synthetic {synths[-1]['img_per_s']:.1f} img/s",
                flush=True,
            )
        prep = data_prep_rate(cfg, torch.from_numpy(x_np).to(device), args.steps, device)

    loop_rate = median([r["img_per_s"] for r in loops])
    synth_rate = median([r["img_per_s"] for r in synths])
    ratio = loop_rate / synth_rate
    info = describe(build_model(args.model))
    rates = {
        "ferkit.training.train (real loop)": loop_rate,
        "synthetic fwd+bwd+step": synth_rate,
        "data prep alone (gather+augment)": prep,
    }
    rows = [{"what": k, "img_per_s": v, "ms_per_step": 1000 * args.batch_size / v} for k, v in rates.items()]
    print()
    print_table(
        rows,
        title=f"{args.model} ({info['params_m']:.2f}M params), batch {args.batch_size}, {args.steps} steps, "
        f"{threads} threads, {device}, autocast {synthetic.dtype or 'none'}, median of {args.repeats}",
    )
    verdict = "meets" if ratio >= GOAL else "MISSES"
    print(f"\nloop / synthetic = {ratio:.3f} ({verdict} the goal of >= {GOAL:.0%})")
    if args.quick:
        print("(--quick: tiny settings, the numbers mean nothing)")

    write_report(
        "train_throughput" + (f"_{args.amp}" if args.amp in ("bf16", "fp16") else ""),
        {
            "quick": args.quick,
            "settings": {
                "model": args.model,
                "batch_size": args.batch_size,
                "steps": args.steps,
                "repeats": args.repeats,
                "warmup_steps": args.warmup_steps,
                "threads": threads,
                "device": str(device),
                "amp": args.amp,
                "autocast": str(synthetic.dtype or "none"),
                "config": str(args.config),
                "train_images": len(x_np),
                "optimizer": cfg.optimizer,
                "augment": cfg.augment,
                "label_smoothing": cfg.label_smoothing,
                "class_weights": cfg.class_weights,
                "mixup": cfg.mixup,
                "cutmix": cfg.cutmix,
                "ema": cfg.ema,
                "teacher": cfg.teacher,
            },
            "model_info": info,
            "loop_img_per_s": loop_rate,
            "synthetic_img_per_s": synth_rate,
            "data_prep_img_per_s": prep,
            "ratio": ratio,
            "goal": GOAL,
            "meets_goal": ratio >= GOAL,
            "runs": {"loop": loops, "synthetic": synths},
            "machine": machine_info(threads),
        },
        args.out_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
