"""The ``ferkit`` command line: prepare, train, evaluate, models, export, predict, serve."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from .config import TrainConfig


def _add_config_options(p: argparse.ArgumentParser) -> None:
    """One ``--option`` per :class:`TrainConfig` field, with its help text; defaults come from the config."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_ = f"{f.metadata['help']} (default: {default!r})"
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_}
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.type in ("dict", dict):
            p.add_argument(flag, type=yaml.safe_load, metavar="YAML", **kw)
        else:
            typ = {"int": int, "float": float, "str": str}[str(f.type)]
            p.add_argument(flag, type=typ, choices=f.metadata.get("choices"), **kw)


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data import prepare

    data = prepare(args.src, args.out)
    counts = data.counts()
    print(f"wrote {args.out}: {len(data)} images")
    for split, c in counts.items():
        print(f"  {split:<12}{sum(c.values()):>7}  " + "  ".join(f"{k} {v}" for k, v in c.items()))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .training import train

    overrides = {k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(TrainConfig)}}
    cfg = TrainConfig.from_yaml(args.config, **overrides) if args.config else TrainConfig.from_dict(overrides)
    if not cfg.data:
        raise SystemExit("ferkit train: --data is required (or set `data:` in the --config file)")
    result = train(cfg, resume=args.resume)
    if args.evaluate and int(__import__("os").environ.get("RANK", "0")) == 0:
        _evaluate([result["best"]], cfg.data, "PrivateTest", Path(cfg.out) / "eval", args.tta, cfg.device)
    return 0


def _evaluate(
    checkpoints: list[str], data: str, split: str, out: Path | None, tta: str, device: str, limit: int = 0
) -> dict[str, Any]:
    from .evaluate import evaluate_checkpoints, format_summary

    result = evaluate_checkpoints(checkpoints, data, split=split, out=out, tta=tta, device=device, limit=limit)
    print(f"{result['model']} on {split} (TTA: {tta})")
    print(format_summary(result))
    if out is not None:
        print(f"report: {result['report_json']}")
    return result


def cmd_evaluate(args: argparse.Namespace) -> int:
    checkpoints = args.checkpoint + (args.ensemble or [])
    out = Path(args.out) if args.out else Path(checkpoints[0]).parent / "eval"
    for tta in args.tta:
        _evaluate(checkpoints, args.data, args.split, out, tta, args.device, args.limit)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import MODELS, build_model, describe

    print(f"{'model':<16}{'params (M)':>12}{'MFLOPs':>10}")
    for name in MODELS:
        d = describe(build_model(name))
        print(f"{name:<16}{d['params_m']:>12.2f}{d['mflops']:>10.0f}")
    print("timm:<arch>     any timm architecture (pip install timm), e.g. timm:resnet18")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferkit", description="Facial expression recognition on FER-2013.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "prepare",
        help="decode FER-2013 once into a .npz cache",
        description="Decode fer2013.csv or the Kaggle image folders into one .npz cache.",
    )
    p.add_argument("src", help="fer2013.csv, or the folder holding train/ and test/")
    p.add_argument("-o", "--out", default="data/fer2013.npz", help="cache file to write (default: %(default)s)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser(
        "train",
        help="train a model",
        description="Train a model on FER-2013. Options "
        "override the --config YAML, which overrides the defaults shown.",
    )
    p.add_argument("--config", help="YAML file of training options (see configs/)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    p.add_argument(
        "--evaluate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="evaluate best.pt on PrivateTest into OUT/eval when training ends (default: on)",
    )
    p.add_argument(
        "--tta",
        default="none",
        choices=["none", "flip", "crops"],
        help="test-time augmentation for that final evaluation",
    )
    _add_config_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "evaluate",
        help="evaluate checkpoints on a split",
        description="Accuracy, classification report, confusion matrix, ROC/AUC and plots.",
    )
    p.add_argument("checkpoint", nargs="+", help="checkpoint(s); several are averaged as an ensemble")
    p.add_argument("--ensemble", nargs="*", help="more checkpoints to average with the first")
    p.add_argument("--data", required=True, help="FER-2013 cache, CSV or image folder")
    p.add_argument(
        "--split",
        default="PrivateTest",
        choices=["Training", "PublicTest", "PrivateTest"],
        help="split to evaluate (default: %(default)s; select models on PublicTest)",
    )
    p.add_argument(
        "--tta",
        nargs="+",
        default=["none"],
        choices=["none", "flip", "crops"],
        help="test-time augmentation mode(s), each reported separately (default: none)",
    )
    p.add_argument("--out", help="report folder (default: eval/ beside the first checkpoint)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--limit", type=int, default=0, help="evaluate a fixed random subset of N images (0 = all)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("models", help="list the model registry with params and MFLOPs")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        print(f"ferkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ferkit {args.command}: interrupted", file=sys.stderr)
        return 130


def _json(obj: Any) -> str:
    return json.dumps(obj, default=str)
