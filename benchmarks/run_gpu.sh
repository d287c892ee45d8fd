#!/usr/bin/env bash
# The GPU checks and figures in one go (what produced benchmarks/results/*-cuda.*):
#   bash benchmarks/run_gpu.sh [OUT_DIR]
# 1. tests/gpu: flash varlen attention, lean LoRA/DoRA under bf16 autocast, planner vs the CUDA allocator,
#    and train/eval/merge through the CLI on the GPU;
# 2. the benchmark on Llama-3.2-1B's shape (random weights): llama-lora vs TRL vs Trainer vs the floor.
# Wheels for packages missing on the GPU machine can be put in .whl/ (installed with --no-deps first).
set -uo pipefail
OUT=${1:-${OUT:-benchmarks/results}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export LLAMA_LORA_CACHE=${LLAMA_LORA_CACHE:-$PWD/.cache/llama_lora}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| peft', peft.__version__)"
python3 -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>/dev/null || echo "flash_attn: not installed (SDPA / torch varlen kernel used)"
python3 -m pytest tests/gpu -v -s -p no:cacheprovider --timeout=900 2>&1 | tee "$OUT/gpu-tests.log"
python3 benchmarks/bench.py --device cuda --size 1b --methods ${METHODS:-a,b,c,d,f} --out "$OUT" 2>&1 | tee "$OUT/bench-1b-cuda.log"
