#!/usr/bin/env bash
# The flagship GPU session in one call of the device tool (about 8 minutes on one H100/H200):
#   1. unpack the carried data (.carry/: fer2013_pack.py and fer.ferpack of Training + PublicTest) and prepare it;
#   2. three ferkit_vgg teachers (or the RUNS below) train side by side (configs/vgg_gpu.yaml with seeds 1-3 and
#      medium, strong and light augmentation); their best.pt are slimmed to float16 into $OUT at once;
#   3. two shipped-size students are distilled from them: configs/small_distill.yaml, configs/vgg_half_distill.yaml
#      (skipped when STUDENT_EPOCHS is 0, which leaves the whole call to the teachers);
#   4. with EVALUATE=1 (and a pack that holds PrivateTest), each slimmed model and the MEMBERS (space-separated
#      paths of other candidates, e.g. the shipped ONNX) is evaluated on both splits with every TTA,
#      select-ensemble picks an ensemble on PublicTest and the winner is evaluated too (runs/eval/ ->
#      $OUT/eval.tgz); otherwise PrivateTest stays home;
#   5. their best.pt and the logs follow.
# From the project root on the GPU machine:
#   OUT=$OUT [TAG=_e140] bash scripts/gpu_flagship.sh [TEACHER_EPOCHS] [STUDENT_EPOCHS]
# ($OUT: the device tool's folder, the only one that comes back; it brings back 8 files: one .pt a run, gpu.log,
# logs.tgz and with EVALUATE=1 eval.tgz)
# TAG is appended to every run's name (runs/ferkit_vgg_s1$TAG, ...), so that a new session does not overwrite
# the runs of the last one. CONFIG (default configs/vgg_gpu.yaml) is the teachers' recipe and PREFIX (default
# ferkit_vgg) their names' start: CONFIG=configs/resnet_gpu.yaml PREFIX=ferkit_resnet trains ResNet teachers.
# RUNS replaces the trio: "NAME OPTION...; NAME OPTION...; ..." (its options come after CONFIG's and override them;
# words are split on spaces, so no option value may hold one; TAG and PREFIX do not apply to the names given),
# e.g. two VGGs and two ResNets side by side:
#   RUNS="ferkit_vgg_s4_e110 --seed 4 --epochs 110; ferkit_vgg_strong_s5_e110 --seed 5 --augment strong --epochs 110;
#         ferkit_resnet_light_s6_e90 --config configs/resnet_gpu.yaml --seed 6 --augment light --epochs 90;
#         ferkit_resnet_strong_s7_e90 --config configs/resnet_gpu.yaml --seed 7 --augment strong --epochs 90"
# A run taught by the targets of teachers that stay home (README, "Teachers too big to travel"), a born-again VGG:
#   RUNS="ferkit_vgg_ba_s4_e110 --seed 4 --teacher .carry/targets4.npz --distill-alpha 0.7"
# EXTRA adds `ferkit train` options to every run (e.g. EXTRA="--sam-rho 0.05", which doubles the cost of a step).
# BUDGET (default 540 s) bounds the whole call: a run still going when its share is spent is stopped and keeps its
# best epoch, so the results always come back within a 600 s device call.
# PY (the Python), EXTRA and EVAL_EXTRA (`ferkit evaluate` options, e.g. "--limit 64 --device cpu") serve a dry
# run on a CPU; DATA (default data/fer2013_carried.npz) is where the carried pack is prepared.
# Every run gets a new folder (runs/NAME already there is refused); the script exits 1 if a run failed.
set -uo pipefail
cd "$(dirname "$0")/.."
E1=${1:-70}
E2=${2:-36}
OUT=${OUT:?set OUT to the folder for the results}
PY=${PY:-python3}
TAG=${TAG:-}
EXTRA=${EXTRA:-}
CONFIG=${CONFIG:-configs/vgg_gpu.yaml}
PREFIX=${PREFIX:-ferkit_vgg}
BUDGET=${BUDGET:-540}
EVALUATE=${EVALUATE:-0}
MEMBERS=${MEMBERS:-}
EVAL_EXTRA=${EVAL_EXTRA:-}
RUNS=${RUNS:-"${PREFIX}_s1$TAG --seed 1; ${PREFIX}_strong_s2$TAG --seed 2 --augment strong; ${PREFIX}_light_s3$TAG --seed 3 --augment light"}
T0=$(date +%s)
left() { local l=$((BUDGET - ($(date +%s) - T0))); echo $((l > 1 ? l : 1)); } # budget still unspent (s, ≥ 1)
export PYTHONPATH=src PYTHONUNBUFFERED=1
DATA=${DATA:-data/fer2013_carried.npz}  # never the home cache: a Training+PublicTest pack has no PrivateTest
LOGS=runs/logs
mkdir -p "$OUT" "$LOGS" data
exec > >(tee "$OUT/gpu.log") 2>&1
set -f  # RUNS entries are split into words, never expanded as file names
IFS=';' read -r -a VARIANTS <<<"${RUNS//$'\n'/ }"
TEACHERS=()
for variant in "${VARIANTS[@]}"; do set -- $variant; [ $# -gt 0 ] && TEACHERS+=("$1"); done
set +f
if [ ${#TEACHERS[@]} -eq 0 ]; then echo "RUNS names no run" >&2; exit 2; fi
if [ "$(printf '%s\n' "${TEACHERS[@]}" | sort | uniq -d)" ]; then echo "RUNS names a run twice" >&2; exit 2; fi
STUDENTS=()
if [ "$E2" -gt 0 ]; then STUDENTS=("ferkit_small_distill$TAG" "ferkit_vgg_half_distill$TAG"); fi
for r in "${TEACHERS[@]}" "${STUDENTS[@]}"; do  # an old run's best.pt would come back as this session's
  if [ -e "runs/$r" ]; then echo "runs/$r already exists: give the run a new name" >&2; exit 2; fi
done
for f in $MEMBERS; do  # device_tree.sh leaves models/ home: a member named there would silently not take part
  if [ ! -f "$f" ]; then echo "MEMBERS: $f not found" >&2; exit 2; fi
done
FILES=$(( ${#TEACHERS[@]} + ${#STUDENTS[@]} + 2 + (EVALUATE == 1) ))
if [ $FILES -gt 8 ]; then echo "$FILES files for \$OUT: the device tool brings back 8" >&2; exit 2; fi
STUDENT_S=$(( E2 > 0 ? 4 * E2 + 40 : 0 ))  # the students' share: 2 s an epoch on the GPU, and their start
EVAL_S=0
if [ "$EVALUATE" = 1 ]; then EVAL_S=120; fi  # evaluating every model and the chosen ensemble on both splits
if [ $(( BUDGET - STUDENT_S - EVAL_S - 30 )) -lt 60 ]; then  # 30 s to slim and pack
  echo "under a minute for the teachers: raise BUDGET or lower STUDENT_EPOCHS" >&2; exit 2
fi
rm -rf /tmp/fer runs/eval "$LOGS"  # a warm machine keeps the last call's: they would come back as this call's
mkdir -p "$LOGS"
FAILED=()
finish() { # NAME... : wait for the runs started (pids, in that order); name those that failed or hit the budget
  local names=("$@") i rc
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}"; rc=$?
    if [ $rc -eq 124 ] && [ -f "runs/${names[$i]}/best.pt" ]; then
      echo "${names[$i]}: stopped at its time budget (its best epoch is kept)"
    elif [ $rc -eq 124 ]; then echo "${names[$i]}: stopped at its time budget before its first epoch"; FAILED+=("${names[$i]}")
    elif [ $rc -ne 0 ]; then echo "${names[$i]}: failed (exit $rc)"; FAILED+=("${names[$i]}"); fi
  done
}
train() { # LIMIT_SECONDS OPTION...
  local limit=$(($1 > 1 ? $1 : 1))
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
TEACHER_S=$(( $(left) - STUDENT_S - EVAL_S - 30 ))  # 30 s to slim and pack
echo "teachers may run ${TEACHER_S} s, students ${STUDENT_S} s"
for variant in "${VARIANTS[@]}"; do
  set -f; set -- $variant; set +f
  [ $# -gt 0 ] || continue
  train "$TEACHER_S" --config "$CONFIG" --epochs "$E1" --out "runs/$1" "${@:2}" >"$LOGS/$1.out" 2>&1 &
  pids+=($!)
done
finish "${TEACHERS[@]}"
for r in "${TEACHERS[@]}"; do tail -v -n 2 "$LOGS/$r.out"; done
for r in "${TEACHERS[@]}"; do [ -f runs/$r/best.pt ] && $PY -m ferkit slim runs/$r/best.pt -o "$OUT/$r.pt" --half; done

CKPTS=()  # the teachers that left a checkpoint (one that failed early has none)
for t in "${TEACHERS[@]}"; do if [ -f "runs/$t/best.pt" ]; then CKPTS+=("runs/$t/best.pt"); fi; done
if [ "$E2" -gt 0 ] && [ ${#CKPTS[@]} -eq 0 ]; then echo "no teacher checkpoint: no students"; fi
if [ "$E2" -gt 0 ] && [ ${#CKPTS[@]} -gt 0 ]; then
  date -u +"students %T"
  pids=()
  for r in ferkit_small_distill ferkit_vgg_half_distill; do
    train $(( $(left) - EVAL_S - 20 )) --config "configs/${r#ferkit_}.yaml" --epochs "$E2" --out "runs/$r$TAG" \
      --teacher "${CKPTS[@]}" >"$LOGS/$r$TAG.out" 2>&1 &
    pids+=($!)
  done
  finish "${STUDENTS[@]}"
  tail -v -n 2 $LOGS/*distill$TAG.out
  for r in ferkit_small_distill ferkit_vgg_half_distill; do
    [ -f runs/$r$TAG/best.pt ] && $PY -m ferkit slim runs/$r$TAG/best.pt -o "$OUT/$r$TAG.pt" --half
  done
fi

if [ "$EVALUATE" = 1 ]; then
  date -u +"evaluate %T"
  CANDS=()
  for f in "$OUT"/*.pt $MEMBERS; do [ -f "$f" ] && CANDS+=("$f"); done
  ev() { timeout "$(left)" $PY -m ferkit evaluate "$@" --data $DATA --tta none flip crops --cache runs/probs_cache $EVAL_EXTRA >>$LOGS/evaluate.out 2>&1; }
  for f in "${CANDS[@]}"; do
    name=$(basename "${f%.*}")
    for split in PublicTest PrivateTest; do ev "$f" --split $split --out runs/eval/$name; done
  done
  timeout "$(left)" $PY -m ferkit select-ensemble "${CANDS[@]}" --data $DATA --tta none flip crops --cache runs/probs_cache $EVAL_EXTRA \
    --out runs/eval/ensemble/PublicTest_ranking.json 2>&1 | grep -v "it/s\|s/it"
  read -r -a WINNER < <($PY -c "import json; print(*json.load(open('runs/eval/ensemble/PublicTest_ranking.json'))['ranking'][0]['checkpoints'])")
  for split in PublicTest PrivateTest; do ev "${WINNER[@]}" --split $split --out runs/eval/ensemble; done
  $PY - <<'PY'
import glob, json
for path in sorted(glob.glob("runs/eval/*/P*Test*.json")):
    if "ranking" not in path:
        print(f"{path:<60} {json.load(open(path))['accuracy']:.4f}")
PY
  tar czf "$OUT/eval.tgz" runs/eval
fi

date -u +"pack %T"
kill $SMI 2>/dev/null
tar czf "$OUT/logs.tgz" runs/*/metrics.csv runs/*/train.log $LOGS
date -u +"done %T"
if [ ${#FAILED[@]} -gt 0 ]; then echo "failed: ${FAILED[*]}"; exit 1; fi
