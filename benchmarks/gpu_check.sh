#!/usr/bin/env bash
# The GPU checks in one prepared run (for a session lent a CUDA GPU): kernel and MoE tests compiled, not
# interpreted; chapter 02's kernel benchmark (chapter 04's grouped GEMM included); the grouped GEMM's block
# sweep; the MoE layer benchmark at the bench's sizes and at a larger one. Everything lands in $OUT.
#     OUT=/tmp/gpu bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/minillm-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PY:-python3}
step() { local limit=$1; shift; echo "=== $* (limit ${limit}s)"; local t0=$SECONDS
         timeout "$limit" "$@"; echo "=== rc=$? in $((SECONDS - t0)) s"; }
{
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1
PARALLEL=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")   # pytest-xdist, where the image has it
step 150 $PY -m pytest -q $PARALLEL -p no:cacheprovider tests/test_kernels.py tests/test_moe.py 2>&1
step 90 $PY -m minillm.bench kernels --out-dir "$OUT" 2>&1
step 90 $PY benchmarks/grouped_configs.py --out "$OUT/grouped-configs.json" 2>&1
step 70 $PY -m minillm.bench moe --device cuda --out-dir "$OUT" 2>&1
step 70 $PY -m minillm.bench moe --device cuda --experts 64,256 --d-model 2048 --expert-hidden 512 --tokens 8192 \
    --out-dir "$OUT" 2>&1
} 2>&1 | tee "$OUT/log.txt"
