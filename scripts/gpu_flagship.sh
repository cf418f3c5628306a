#!/usr/bin/env bash
# The flagship GPU session in one call of the device tool (about 8 minutes on one H100/H200):
#   1. unpack the carried data (.carry/: fer2013_pack.py and fer.ferpack of Training + PublicTest) and prepare it;
#   2. two epochs of ferkit_vgg measure img/s, which sizes the epochs of what follows to its time budget;
#   3. three ferkit_vgg teachers train side by side: configs/vgg_gpu.yaml, the same without CutMix, and with
#      strong augmentation;
#   4. two shipped-size students are distilled from them: configs/small_distill.yaml, configs/vgg_half_distill.yaml;
#   5. every best.pt is slimmed to float16 and written, with the logs, to $OUT. PrivateTest never travels:
#      it is evaluated back home with `ferkit evaluate`.
# From the project root on the GPU machine:
#   OUT=results bash scripts/gpu_flagship.sh [TEACHER_SECONDS] [STUDENT_SECONDS]
# EXTRA (more `ferkit train` options for every run) and PY (the Python) serve a dry run on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
T1=${1:-240}
T2=${2:-150}
OUT=${OUT:?set OUT to the folder for the results}
PY=${PY:-python3}
EXTRA=${EXTRA:-}
export PYTHONPATH=src PYTHONUNBUFFERED=1
DATA=data/fer2013.npz
LOGS=runs/logs
N=28709 # Training images
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

date -u +"smoke %T"
train 180 --config configs/vgg_gpu.yaml --epochs 2 --out runs/smoke || exit 1
IPS=$($PY -c "import csv; print(float(list(csv.DictReader(open('runs/smoke/metrics.csv')))[-1]['img_per_s']))")
epochs() { $PY -c "print(max(10, min(100, int($1 * $IPS / ($2 * $N * 1.3)))))"; }
E1=$(epochs "$T1" 3)
E2=$(epochs "$T2" 2.5)
echo "ferkit_vgg alone: $IPS img/s -> teachers $E1 epochs, students $E2 epochs"

date -u +"teachers %T"
pids=()
for variant in "ferkit_vgg" "ferkit_vgg_nocutmix --cutmix 0" "ferkit_vgg_strong --augment strong"; do
  set -- $variant
  train $((T1 + 60)) --config configs/vgg_gpu.yaml --epochs "$E1" --out "runs/$1" "${@:2}" >"$LOGS/$1.out" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
tail -n 2 $LOGS/ferkit_vgg*.out

date -u +"students %T"
pids=()
for c in small_distill vgg_half_distill; do
  train $((T2 + 40)) --config "configs/$c.yaml" --epochs "$E2" >"$LOGS/$c.out" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
tail -n 2 $LOGS/*distill.out

date -u +"pack %T"
for r in ferkit_vgg ferkit_vgg_nocutmix ferkit_vgg_strong ferkit_small_distill ferkit_vgg_half_distill; do
  [ -f runs/$r/best.pt ] && $PY -m ferkit slim runs/$r/best.pt -o "$OUT/$r.pt" --half
done
kill $SMI
tar czf "$OUT/logs.tgz" runs/*/metrics.csv runs/*/train.log $LOGS
date -u +"done %T"
