#!/usr/bin/env bash
# bench/mine.py on a GPU: ResNet-50 + bilinear MSA at 512, bf16 autocast, channels_last, batch 128; with
# --compile, a second block with torch.compile. Every figure in a block comes from one run (ratios inside one
# run only). Target (DESIGN.md section 7): end-to-end mining >= 0.9x the bare forward rate on a GPU.
# Usage: bench/gpu_mine.sh [--quick] [--compile] [extra bench/mine.py args]; PYTHON=... picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SIZES=(--n 1024 4096 --repeats 3)
COMPILE=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) SIZES=(--n 256 1024 --repeats 2); shift ;;
    --compile) COMPILE=1; shift ;;
    *) break ;;
  esac
done
# The frame is the original image side; 512 keeps the synthetic PNG setup short (boxes map to it either way).
COMMON=(--device cuda --arch resnet50 --neck bilinear --size 512 --frame 512 --batch 128 --workers 8 "${SIZES[@]}")
echo "== bf16 + channels_last"
"$PY" bench/mine.py "${COMMON[@]}" "$@"
if [[ $COMPILE == 1 ]]; then
  echo "== bf16 + channels_last + torch.compile"
  "$PY" bench/mine.py "${COMMON[@]}" --compile "$@"
fi
