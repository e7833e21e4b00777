#!/usr/bin/env bash
# The GPU benchmark suite (issue 7) in one self-contained call on a lent H100/H200 machine.
#
#   bash benchmarks/gpu_run.sh            # from the repository root; writes to $OUT
#
# The machine has PyTorch but not faiss: the faiss-cpu wheel for Python 3.12 travels in
# .whl/ (carry it) and is installed under /tmp/site. Steps, each under its own time limit so
# that one that runs long still leaves the others' figures (every step writes its rows as
# they are measured):
#   tests     GPU parity tests (CUDA-graph decoding, also compiled, == the model's tokens;
#             TorchCache on GPU; bf16 KV cache == full forward; batched == one-by-one
#             generation; bf16 logits ~ fp32)
#   gen1      generation, 7B random weights, bf16, batch 1: baseline, eager, CUDA graph,
#             CUDA graph + torch.compile
#   gen16     the same at batch 16
#   train     training steps, 7B: pretrain 4x96, 32x96, finetune 4x512 (baseline and ibllm_lab)
#   cache     visual cache at 1M and 3M x 1024 (faiss flat/IVF on the host CPUs, torch on the GPU)
#   compile   training with each block under torch.compile (and the baseline again)
#   compile_ro  the same in mode reduce-overhead (CUDA graphs per block), 4x96 and 4x512
#   profile   kernel profiles of the training steps and of one decoding step (profile_steps.py)
#   cacheprof kernel profile of the GPU cache call at 3M x 1024 ($OUT/cacheprof/profile.md)
# BENCH_STEPS="gen1 cache" runs a subset (default: all, about 9 minutes on an H200);
# BENCH_SCALE=50 halves every step's time limit.
# Output: $OUT/gpu.json, $OUT/gpu.md (merged table), $OUT/profile.md, $OUT/gpu_run.log.
# BENCH_SUITE=cpu BENCH_EXTRA="..." runs the same steps on CPU (a dry run of this script).
set -u
SUITE=${BENCH_SUITE:-gpu}
EXTRA=${BENCH_EXTRA:-}
STEPS=${BENCH_STEPS:-tests gen1 gen16 train cache compile compile_ro profile cacheprof}
SCALE=${BENCH_SCALE:-100}
limit() { echo $(( $1 * SCALE / 100 )); }
wants() { [[ " $STEPS " == *" $1 "* ]]; }
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

if wants tests; then
  say "parity tests on the GPU"
  timeout --signal=KILL "$(limit 60)" python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_bench.py tests/test_generation.py tests/test_llama.py tests/test_model.py >>"$LOG" 2>&1
  say "tests rc=$?"
fi
GEN=${BENCH_GEN:-baseline,eager,fast,compile}  # generation paths (bench --gen-impls)
wants gen1 && step gen1 "$(limit 120)" --groups generate --gen-batches 1 --gen-impls $GEN
wants gen16 && step gen16 "$(limit 110)" --groups generate --gen-batches 16 --gen-impls $GEN
wants train && step train "$(limit 100)" --groups train --warmup 1 --iters 3
wants cache && step cache "$(limit 160)" --groups cache
wants compile && step compile "$(limit 80)" --groups train --train-compile --warmup 2 --iters 3
wants compile_ro && step compile_ro "$(limit 70)" --groups train --train-compile --no-baseline \
  --train-compile-mode reduce-overhead --warmup 3 --iters 3 --train-shapes pretrain:4x96,finetune:4x512
if wants profile; then
  say "start profile (limit $(limit 80)s)"
  if [ "$SUITE" = gpu ]; then PROF="--llama 7B --adapter reference --device cuda"; else PROF=""; fi
  # shellcheck disable=SC2086
  timeout --signal=KILL "$(limit 80)" python3 -m benchmarks.profile_steps $PROF --out "$OUT" \
    >>"$LOG" 2>&1
  say "end profile rc=$?"
fi
if wants cacheprof; then
  say "start cacheprof (limit $(limit 30)s)"
  if [ "$SUITE" = gpu ]; then PROF="--device cuda --cache-n 3000000"; else PROF="--cache-n 100000"; fi
  # shellcheck disable=SC2086
  timeout --signal=KILL "$(limit 30)" python3 -m benchmarks.profile_steps --what cache $PROF \
    --out "$OUT/cacheprof" >>"$LOG" 2>&1
  say "end cacheprof rc=$?"
fi

parts=$(ls "$PARTS"/*.json 2>/dev/null)
if [ -n "$parts" ]; then
  python3 -m benchmarks --merge $parts --out "$OUT" --name gpu >>"$LOG" 2>&1
  cp $parts "$OUT"/ 2>/dev/null
fi
say "done"
tail -n 40 "$OUT/gpu.md" 2>/dev/null
