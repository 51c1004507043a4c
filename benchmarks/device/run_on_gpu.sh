#!/usr/bin/env bash
# One lease of the GPU machine (the device tool), prepared and tried on CPU first:
#   bash benchmarks/device/make_bundle.sh                     # here, once: builds .gpu/
#   run (carry .gpu):  bash benchmarks/device/run_on_gpu.sh PRESET_SECONDS TABLE_SECONDS [RECIPE_SECONDS]
# PRESET_SECONDS of the paper preset (issue 12 item 7), then TABLE_SECONDS of the paper
# table with the main job's recipe, then RECIPE_SECONDS of the screen of main-job recipes
# in benchmarks/device/recipe_screen.json (or RECIPE_VARIANTS; RECIPE_SEEDS, default 0 1 2;
# 0 skips any). The preset starts from random weights:
# Res2Net's ImageNet weights need timm's download, and that machine has no network. Work stays under /tmp/gpu-work, so a
# second call on the same warm machine resumes the table; what comes back goes to $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
work=/tmp/gpu-work
export PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
if [ ! -e /tmp/site/.installed-$(ls .gpu/whl | md5sum | cut -c1-8) ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/whl/*.whl || exit 1
  touch /tmp/site/.installed-$(ls .gpu/whl | md5sum | cut -c1-8)
fi
export PYTHONPATH=/tmp/site:$PWD/.gpu/pylib:$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ ! -e /tmp/ham10000/HAM10000_metadata.csv ]; then
  python3 -m zipfile -e .gpu/ham10000.zip /tmp/ham10000 || exit 1
fi
export FEDLSC_DATA_DIR=/tmp/ham10000 FEDLSC_CACHE_DIR=/tmp/fedlsc-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
python3 -c "import torch, timm, flwr, numpy, hydra; print('torch', torch.__version__, 'timm', timm.__version__, 'flwr', flwr.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" || exit 1
nproc
if [ "${1:-0}" != 0 ]; then
  python3 benchmarks/device/gpu_runs.py preset --out $work/preset --seconds "$1" \
    --set training.num_workers=${PRESET_WORKERS:-8} model.pretrained="'false'" ${PRESET_SET:-}
  cp $work/preset/preset_summary.md $work/preset/preset.log "$OUT"/ 2>/dev/null
  cp $work/preset/results/metrics.jsonl "$OUT"/preset_metrics.jsonl 2>/dev/null
fi
if [ "${2:-0}" != 0 ]; then
  python3 benchmarks/device/gpu_runs.py table --out $work/table --seconds "$2" \
    --parallel ${TABLE_PARALLEL:-10} ${TABLE_ARGS:-} \
    --set model.pretrained=$PWD/.gpu/lite0_imagenet_fp16.pt ${TABLE_SET:-}
  tar czf "$OUT"/table.tgz -C $work/table --exclude='*.pt' --exclude='fh-*' \
    --exclude='flwr-home' --exclude='sites' \
    --exclude='*/results/*.png' --exclude='tensorboard' .
fi
if [ "${3:-0}" != 0 ]; then
  python3 benchmarks/device/gpu_runs.py recipes --out $work/recipes --seconds "$3" \
    --parallel ${RECIPE_PARALLEL:-14} \
    --variants ${RECIPE_VARIANTS:-benchmarks/device/recipe_screen.json} \
    --seeds ${RECIPE_SEEDS:-0 1 2} \
    --set model.pretrained=$PWD/.gpu/lite0_imagenet_fp16.pt ${RECIPE_SET:-}
  cp $work/recipes/recipes.md $work/recipes/recipes.jsonl "$OUT"/ 2>/dev/null
  tar czf "$OUT"/recipes-logs.tgz -C $work/recipes --exclude='*.pt' --exclude='sites' \
    --exclude='*.png' --exclude='tensorboard' .
fi
ls -la "$OUT"
