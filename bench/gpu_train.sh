#!/usr/bin/env bash
# GPU training bench (docs/design.md#performance), one short run (< 3 min on an H100/H200):
#   ResNet-50 + bilinear MSA at 512x512, batch 64, bf16 autocast + channels_last;
#   absolute img/s of the training step (synthetic input and the uint8-cache data path),
#   and the data/synthetic ratio (target >= 0.9) as the last line: `train data/synthetic ratio: X`.
# Usage: bash bench/gpu_train.sh   (PY=python to choose the interpreter; needs the project installed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
"$PY" bench/train.py --arch resnet50 --neck bilinear --size 512 --batch 64 --steps 24 --workers 6 \
    --images 384 --device cuda --amp bf16
