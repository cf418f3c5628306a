#!/usr/bin/env bash
# The flagship GPU session in one call of the device tool (about 8 minutes on one H100/H200):
#   1. unpack the carried data (.carry/: fer2013_pack.py and fer.ferpack of Training + PublicTest) and prepare it;
#   2. three ferkit_vgg teachers train side by side (configs/vgg_gpu.yaml with seeds 1-3 and medium, strong and
#      light augmentation); their best.pt are slimmed to float16 into $OUT at once;
#   3. two shipped-size students are distilled from them: configs/small_distill.yaml, configs/vgg_half_distill.yaml;
#   4. their best.pt and the logs follow. PrivateTest never travels: it is evaluated back home (`ferkit evaluate`).
# From the project root on the GPU machine:
#   OUT=results bash scripts/gpu_flagship.sh [TEACHER_EPOCHS] [STUDENT_EPOCHS]
# EXTRA (more `ferkit train` options for every run) and PY (the Python) serve a dry run on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
E1=${1:-70}
E2=${2:-36}
OUT=${OUT:?set OUT to the folder for the results}
PY=${PY:-python3}
EXTRA=${EXTRA:-}
export PYTHONPATH=src PYTHONUNBUFFERED=1
DATA=data/fer2013.npz
LOGS=runs/logs
mkdir -p "$OUT" "$LOGS" data
exec > >(tee "$OUT/gpu.log") 2>&1
train() { # LIMIT_SECONDS OPTION...
  local limit=$1
  shift
  timeout "$limit" $PY -m ferkit train --data $DATA --no-evaluate --no-progress $EXTRA "$@"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 >$LOGS/gpu_util.csv 2>&1 &
SMI=$!
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
date -u +"start %T"
$PY .carry/fer2013_pack.py unpack .carry/fer.ferpack /tmp/fer || exit 1
$PY -m ferkit prepare /tmp/fer -o $DATA 2>&1 | tr '\r' '\n' | tail -4 || exit 1

date -u +"teachers %T"
pids=()
TEACHERS=(ferkit_vgg_s1 ferkit_vgg_strong_s2 ferkit_vgg_light_s3)
for variant in "${TEACHERS[0]} --seed 1" "${TEACHERS[1]} --seed 2 --augment strong" "${TEACHERS[2]} --seed 3 --augment light"; do
  set -- $variant
  train $((4 * E1 + 40)) --config configs/vgg_gpu.yaml --epochs "$E1" --out "runs/$1" "${@:2}" >"$LOGS/$1.out" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
tail -n 2 $LOGS/ferkit_vgg*.out
for r in "${TEACHERS[@]}"; do [ -f runs/$r/best.pt ] && $PY -m ferkit slim runs/$r/best.pt -o "$OUT/$r.pt" --half; done

date -u +"students %T"
pids=()
for c in small_distill vgg_half_distill; do
  train $((4 * E2 + 40)) --config "configs/$c.yaml" --epochs "$E2" >"$LOGS/$c.out" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
tail -n 2 $LOGS/*distill.out

date -u +"pack %T"
for r in ferkit_small_distill ferkit_vgg_half_distill; do
  [ -f runs/$r/best.pt ] && $PY -m ferkit slim runs/$r/best.pt -o "$OUT/$r.pt" --half
done
kill $SMI
tar czf "$OUT/logs.tgz" runs/*/metrics.csv runs/*/train.log $LOGS
date -u +"done %T"
