#!/bin/bash
# One lent GPU, one script (bench/README.md, "On a GPU"): issue 12's
# paper-size teacher on the bundled model's real maps, and issue 14's
# assess / pseudo-label from prepared records on the device.
#
#   FUNDUS_TRAIN=../shared/data/fundus_train OUT=/tmp/gpu bash bench/gpu_session.sh [teacher] [prepare] [default] [networks]
#
# Wheels for what the machine's image lacks (grain, array-record,
# ml-collections, portpicker) are installed from .whl/ when present.
# Phases write their logs and results to $OUT as they go, so a run cut
# short still returns what it finished.
set -u
T0=$(date +%s)
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
FT=${FUNDUS_TRAIN:-../shared/data/fundus_train}
W=${WORK:-/tmp/gpu_work}
mkdir -p "$W"
PHASES=${*:-teacher prepare default}
at() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
exec > >(tee -a "$OUT/session.log") 2>&1

if [ -d .whl ] && [ -z "${NO_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi -L 2>/dev/null
python3 -c "import jax, flax, grain; print('jax', jax.__version__, 'flax', \
flax.__version__, 'grain', grain.__version__, jax.devices())" || exit 3
EFIQA="python3 -m efiqa_jax"

for phase in $PHASES; do
case $phase in
teacher)
  # The paper's U-Net (base 64, 256², batch 16) on the same label-free maps,
  # split and calibration as the bundled teacher, benchmarked on the
  # held-out split.
  at "teacher: build"
  timeout ${T_BUILD:-270} $EFIQA build-default-model "$FT" --config teacher_default:paper \
    ${TEACHER_OVERRIDES:-} --out "$W/teacher_paper" \
    --workdir "$W/wd_paper" --quiet
  echo "build rc=$?"
  cp "$W/teacher_paper/efiqa.json" "$OUT/teacher_paper_efiqa.json"
  cp "$W/wd_paper/metrics.jsonl" "$OUT/teacher_paper_metrics.jsonl"
  ev=$(ls "$W"/wd_paper/events.out.tfevents.* 2>/dev/null | head -1)
  [ -n "$ev" ] && cp "$ev" "$OUT/teacher_paper.tfevents"
  at "teacher: benchmark"
  timeout ${T_BENCH:-75} $EFIQA benchmark "$FT" --split heldout \
    --model "$W/teacher_paper" --quiet \
    --json "$OUT/benchmark_heldout_paper.json"
  echo "benchmark rc=$?"
  ;;
default)
  # The bundled teacher through the same benchmark on the same machine.
  at "default: benchmark"
  timeout ${T_BENCH:-75} $EFIQA benchmark "$FT" --split heldout \
    --model default --quiet \
    --json "$OUT/benchmark_heldout_default.json"
  echo "benchmark rc=$?"
  ;;
prepare)
  # assess / pseudo-label from 2000-px JPEGs vs from their prepared records,
  # the bundled teacher computed on the GPU; host-only (replayed maps) and
  # the model alone on decoded crops say which side sets the pace.
  at "prepare bench"
  timeout ${T_PREPARE:-150} python3 bench/prepare.py --synthetic ${N_PHOTOS:-96} --batch 64 \
    --threads ${THREADS:-16} --workers ${WORKERS:-0} --rounds 2 --cpu-model \
    --pseudo-label | tee "$OUT/prepare_bench.jsonl"
  echo "prepare bench rc=${PIPESTATUS[0]}"
  ;;
networks)
  # bench/gpu.py: U-Net and ViT-L/16 against PyTorch, same weights.
  at "networks"
  timeout ${T_NETWORKS:-300} python3 bench/gpu.py | tee "$OUT/bench_gpu.jsonl"
  echo "networks rc=${PIPESTATUS[0]}"
  ;;
esac
done
at "done"
