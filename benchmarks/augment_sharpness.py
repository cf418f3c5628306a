"""Augmentation sharpness: how much each preset's geometry (scale, rotation, shift: a bilinear resampling at a
sub-pixel offset) blurs the training faces, against the sharp faces the model sees at test time.

Sharpness is the mean absolute Laplacian inside the face (4 px from the border, where reflection padding
repeats pixels), over Training faces drawn at random; the presets' tone changes and erasing are left out, so
only the geometry (and the exact flip) acts. ``--geometry`` shares below 1 leave that share of the faces only
flipped (``ferkit train --geometry``). Writes reports/augment_sharpness.json.

    .venv/bin/python benchmarks/augment_sharpness.py --threads 2
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from _common import base_parser, load_fer, machine_info, print_table, threads_or_cores, write_report

from ferkit.augment import PRESETS, augment
from ferkit.data import model_input, stratified_subset

LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)


def sharpness(x: torch.Tensor) -> float:
    """Mean absolute Laplacian of a float batch (N, 1, 48, 48) in [0, 1], 4 px in from the border."""
    return float(F.conv2d(x, LAPLACIAN)[..., 3:-3, 3:-3].abs().mean())


def parse_args(argv: list[str] | None = None):
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["light", "medium", "strong"], choices=sorted(PRESETS))
    p.add_argument("--geometry", type=float, nargs="+", default=[1.0, 0.5], help="shares of faces resampled")
    p.add_argument("--faces", type=int, default=2000, help="Training faces, a random stratified sample")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.faces = 64
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    threads = threads_or_cores(args.threads)
    torch.set_num_threads(threads)
    data = load_fer(args.data)
    faces, _ = stratified_subset(*data.split("Training"), args.faces, seed=args.seed)
    x = torch.from_numpy(model_input(faces))  # what the model sees at test time
    test = sharpness(x)
    rows = [{"preset": "(test time)", "geometry": "-", "sharpness": test, "vs_test": 1.0}]
    for name in args.presets:
        geometry_only = replace(PRESETS[name], brightness=0, contrast=0, erase=0)
        for share in args.geometry:
            g = torch.Generator().manual_seed(args.seed)
            s = sharpness(augment(x, replace(geometry_only, geometry=share), g))
            rows.append({"preset": name, "geometry": share, "sharpness": s, "vs_test": s / test})
    print_table(rows, title=f"Sharpness (mean |Laplacian|) of {len(x)} Training faces")
    if args.quick:
        print("(--quick: tiny settings, the numbers mean nothing)")
    settings = {"faces": len(x), "seed": args.seed, "presets": args.presets, "geometry": args.geometry}
    payload = {"quick": args.quick, "settings": settings, "machine": machine_info(threads), "rows": rows}
    write_report("augment_sharpness", payload, args.out_dir)


if __name__ == "__main__":
    main()
