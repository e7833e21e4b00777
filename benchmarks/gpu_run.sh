#!/usr/bin/env bash
# The GPU benchmark suite (issue 7) in one self-contained call on a lent H100/H200 machine.
#
#   bash benchmarks/gpu_run.sh            # from the repository root; writes to $OUT
#
# The machine has PyTorch but not faiss: the faiss-cpu wheel for Python 3.12 travels in
# .whl/ (carry it) and is installed under /tmp/site. Steps, each under its own time limit so
# that one that runs long still leaves the others' figures (every step writes its rows as
# they are measured):
#   1. GPU parity tests (CUDA-graph decoding == the model's tokens; TorchCache on GPU)
#   2. generation, 7B random weights, bf16, batch 1 and 16 (baseline, eager, CUDA graph)
#   3. training steps, 7B: pretrain 4x96, 32x96, finetune 4x512 (baseline and ibllm_lab)
#   4. visual cache at 1M and 3M x 1024 (faiss flat/IVF on the host CPUs, torch on the GPU)
#   5. optional: training with each block under torch.compile (if compilation fits in time)
# Output: $OUT/gpu.json, $OUT/gpu.md (merged table), $OUT/gpu_run.log, per-step JSON parts.
# BENCH_SUITE=cpu BENCH_EXTRA="..." runs the same steps on CPU (a dry run of this script).
set -u
SUITE=${BENCH_SUITE:-gpu}
EXTRA=${BENCH_EXTRA:-}
BUDGET=${BENCH_BUDGET:-540}  # seconds for all steps; each step gets a share (pct BUDGET)
pct() { echo $(( BUDGET * $1 / 100 )); }
OUT=${OUT:-benchmarks/results/gpu}
PARTS=/tmp/bench_parts
mkdir -p "$OUT" "$PARTS"
LOG="$OUT/gpu_run.log"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
say() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

if ! python3 -c "import faiss" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/faiss_cpu-*.whl >>"$LOG" 2>&1 || { say "faiss wheel missing"; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >>"$LOG" 2>&1
python3 -c "import torch, faiss, numpy; print('torch', torch.__version__, 'faiss', \
  faiss.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$LOG"

step() {  # step NAME SECONDS ARGS...: one bench process under a time limit
  local name=$1 limit=$2
  shift 2
  say "start $name (limit ${limit}s)"
  # shellcheck disable=SC2086
  timeout --signal=KILL "$limit" python3 -m benchmarks --suite "$SUITE" --out "$PARTS" \
    --name "$name" "$@" $EXTRA >>"$LOG" 2>&1
  say "end $name rc=$?"
}

say "parity tests on the GPU"
timeout --signal=KILL "$(pct 6)" python3 -m pytest -q -m gpu -k "not True" -p no:cacheprovider \
  tests/test_bench.py >>"$LOG" 2>&1
say "tests rc=$?"
step generate "$(pct 25)" --groups generate
step train "$(pct 22)" --groups train --warmup 1 --iters 3
step cache "$(pct 30)" --groups cache
step compile "$(pct 15)" --groups train --train-compile --no-baseline --warmup 2 --iters 3 \
  --train-shapes pretrain:4x96,finetune:4x512

parts=$(ls "$PARTS"/*.json 2>/dev/null)
if [ -n "$parts" ]; then
  python3 -m benchmarks --merge $parts --out "$OUT" --name gpu >>"$LOG" 2>&1
  cp $parts "$OUT"/ 2>/dev/null
fi
say "done"
tail -n 40 "$OUT/gpu.md" 2>/dev/null
