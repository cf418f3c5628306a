#!/usr/bin/env bash
# Make a finished training run the shipped model, with every number regenerated from its evaluation:
#   bash scripts/ship_model.sh RUN_DIR "TRAINING COMMAND" ["HARDWARE"]
# 1. evaluates RUN_DIR/best.pt on PublicTest (to choose the TTA) and PrivateTest (the headline), TTA none/flip/crops;
# 2. keeps the evidence in reports/<run name>/ (JSON, PNGs, metrics.csv, train.log, the slimmed checkpoint);
# 3. exports the ONNX model with its PrivateTest metrics into src/ferkit/weights/ (checks ONNX vs torch);
# 4. regenerates MODEL_CARD.md and the README results table from the JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?run folder}; CMD=${2:?training command}; HW=${3:-"2-core x86_64 CPU"}
DATA=${DATA:-data/fer2013.npz}
F=.venv/bin/ferkit
NAME=$(basename "$RUN")
OUT=reports/$NAME
mkdir -p "$OUT"
$F evaluate "$RUN/best.pt" --data "$DATA" --split PublicTest --tta none flip crops --out "$OUT"
$F evaluate "$RUN/best.pt" --data "$DATA" --split PrivateTest --tta none flip crops --out "$OUT"
cp "$RUN/metrics.csv" "$RUN/train.log" "$OUT/"
$F slim "$RUN/best.pt" -o "$OUT/best.pt" # the weights it predicts with, no optimiser state
$F export "$OUT/best.pt" -o "src/ferkit/weights/$NAME.onnx" --report "$OUT/PrivateTest_tta-flip.json" --check --data "$DATA"
$F card --run "$OUT" --onnx "src/ferkit/weights/$NAME.onnx" --command "$CMD" --hardware "$HW" --readme README.md \
  --reports "$OUT/PrivateTest_tta-flip.json" "$OUT/PrivateTest.json" "$OUT/PrivateTest_tta-crops.json" \
            "$OUT/PublicTest.json" "$OUT/PublicTest_tta-flip.json" "$OUT/PublicTest_tta-crops.json"
