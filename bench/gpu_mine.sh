#!/usr/bin/env bash
# bench/mine.py on a GPU: ResNet-50 + bilinear MSA at 512, bf16 autocast, channels_last, at batch 128 and 256 on
# one set of data (built once); with --compile, a last block with torch.compile. Every figure in a block comes
# from one run (ratios inside one run only). Target (docs/design.md#performance): end-to-end mining >= 0.9x the bare
# forward rate on a GPU. Rates are taken on the larger of the two dataset sizes.
# Usage: bench/gpu_mine.sh [--quick] [--compile] [extra bench/mine.py args]; PYTHON=... picks the interpreter;
# BENCH_HOME=DIR keeps the data there (else a temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SIZES=(--n 4096 16384 --repeats 3)
COMPILE=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) SIZES=(--n 2048 8192 --repeats 2); shift ;;
    --compile) COMPILE=1; shift ;;
    *) break ;;
  esac
done
if [[ -n ${BENCH_HOME:-} ]]; then DATA=$BENCH_HOME; else DATA=$(mktemp -d); trap 'rm -rf "$DATA"' EXIT; fi
# The frame is the original image side; 512 keeps the synthetic PNG setup short (boxes map to it either way).
COMMON=(--device cuda --arch resnet50 --neck bilinear --size 512 --frame 512 --workers 12 --home "$DATA" "${SIZES[@]}")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
for batch in 128 256; do
  echo "== bf16 + channels_last, batch $batch"
  "$PY" bench/mine.py "${COMMON[@]}" --batch "$batch" "$@"
done
if [[ $COMPILE == 1 ]]; then
  echo "== bf16 + channels_last + torch.compile, batch 256"
  "$PY" bench/mine.py "${COMMON[@]}" --batch 256 --compile "$@"
fi
