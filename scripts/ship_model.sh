#!/usr/bin/env bash
# Make a finished training run the shipped model, with every number regenerated from its evaluation:
#   [INT8=1] [UNDO=POWER] [FIT=1] [DATA=CACHE] [FERKIT=CMD] bash scripts/ship_model.sh RUN_DIR "TRAINING COMMAND" "HARDWARE"
# 1. exports RUN_DIR/best.pt to ONNX (checked against torch), with INT8=1 quantizes it (static int8), with
#    UNDO=POWER (the run's class_weight_power) divides its class weights out (`--undo-class-weights`), and with
#    FIT=1 fits one logit offset per class on PublicTest (`--fit-prior`: right for a distilled run too);
# 2. evaluates the file that ships on PublicTest and PrivateTest, TTA none/flip/crops, into reports/<shipped name>/,
#    with the run's metrics.csv, train.log and training curves; the headline is flip, fixed (the TTA predict runs by
#    default: ten-crop costs five times the model time), whatever PublicTest ranks first;
# 3. copies that very file into src/ferkit/weights/, graph untouched, with the PrivateTest flip metrics in its metadata;
# 4. regenerates MODEL_CARD.md and the README results table from the JSON.
# Then point DEFAULT_MODEL in src/ferkit/config.py at the new file.
set -euo pipefail
RUN=${1:?run folder}; CMD=${2:?training command}; HW=${3:?hardware it was trained on}
RUN=$(CDPATH='' cd -- "$RUN" && pwd)  # the paths given are the caller's; the outputs go to the project's folders
if [ -n "${DATA:-}" ]; then DATA=$(CDPATH='' cd -- "$(dirname "$DATA")" && pwd)/$(basename "$DATA"); fi
cd "$(dirname "$0")/.."
DATA=${DATA:-data/fer2013.npz}
F=${FERKIT:-.venv/bin/ferkit}
NAME=$(basename "$RUN")
OPTS=(); SHIP=$NAME
if [ "${INT8:-0}" = 1 ]; then OPTS=(--int8); SHIP=${NAME}_int8; fi
EXPORTED=$SHIP
STEPS=()
if [ -n "${UNDO:-}" ]; then STEPS+=("--undo-class-weights $UNDO"); fi
if [ "${FIT:-0}" = 1 ]; then STEPS+=(--fit-prior); fi
if [ ${#STEPS[@]} -gt 0 ]; then SHIP=${SHIP}_prior; fi
OUT=reports/$SHIP
WEIGHTS=src/ferkit/weights/$SHIP.onnx
TMP=$(mktemp -d)
NEW=()  # what this run makes anew: removed again if it fails
for p in "$OUT" "$WEIGHTS"; do if [ ! -e "$p" ]; then NEW+=("$p"); fi; done
trap 'rc=$?; rm -rf "$TMP"; if [ $rc -ne 0 ] && [ ${#NEW[@]} -gt 0 ]; then rm -rf "${NEW[@]}"; fi' EXIT
mkdir -p "$OUT"
$F export "$RUN/best.pt" -o "$TMP/$NAME.onnx" "${OPTS[@]}" --check --data "$DATA"
SRC=$TMP/$EXPORTED.onnx
for i in "${!STEPS[@]}"; do  # each correction into a folder of its own, under the shipped name (the metadata's)
  mkdir "$TMP/$i"
  # shellcheck disable=SC2086  # a step is an option and its value
  $F export "$SRC" -o "$TMP/$i/$SHIP.onnx" ${STEPS[$i]} --data "$DATA"
  SRC=$TMP/$i/$SHIP.onnx
done
if [ "$SRC" != "$TMP/$SHIP.onnx" ]; then mv "$SRC" "$TMP/$SHIP.onnx"; fi
cp "$RUN/metrics.csv" "$TMP/"  # beside the evaluated file, so that evaluate plots the training curves into $OUT
for split in PublicTest PrivateTest; do
  $F evaluate "$TMP/$SHIP.onnx" --data "$DATA" --split $split --tta none flip crops --out "$OUT"
done
cp "$RUN/metrics.csv" "$RUN/train.log" "$OUT/"
$F export "$TMP/$SHIP.onnx" -o "$WEIGHTS" --report "$OUT/PrivateTest_tta-flip.json"
$F card --run "$RUN" --onnx "$WEIGHTS" --command "$CMD" --hardware "$HW" --readme README.md \
  --reports "$OUT/PrivateTest_tta-flip.json" "$OUT/PrivateTest.json" "$OUT/PrivateTest_tta-crops.json" \
            "$OUT/PublicTest.json" "$OUT/PublicTest_tta-flip.json" "$OUT/PublicTest_tta-crops.json"
