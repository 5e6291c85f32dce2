#!/usr/bin/env bash
# What issue 4's decoder target (>= 520K tokens/s, >= 45% MFU on an H100) still needs measured, as
# one call on one GPU: 9 minutes of limits in all, 9.3 at worst (each step is cut at its limit,
# killed 5 s later, and the next goes on). The answers go to OUT_DIR (default
# /tmp/lmlab-gpu-questions), a file per step; the exit status is 1 if any step failed.
#   bash benchmarks/gpu_questions.sh [OUT_DIR]
# Needs what gpu.sh needs (pytest, hydra-core and omegaconf for step 1 and for gpu.py's Trainer
# composed from conf/). Read each step's file; benchmarks/README.md ("Next on a GPU") says what
# each answer decides. On another card than an H100 SXM the figures are that card's, not the
# target's (an H200's memory is faster; its bf16 peak is the same).
set -u
out=${1:-${TMPDIR:-/tmp}/lmlab-gpu-questions}
mkdir -p "$out" && out=$(cd "$out" && pwd)  # absolute: a relative OUT_DIR is the caller's
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
start=$SECONDS
failed=0

step() {  # name, limit in seconds, command...: output and exit status to $out/<name>.txt
  local name=$1 limit=$2 s=$SECONDS
  shift 2
  echo "== $name ($limit s at most): $*"
  timeout -k 5 "$limit" "$@" > "$out/$name.txt" 2>&1
  local rc=$?
  [ "$rc" -eq 0 ] || failed=1
  echo "exit $rc, $((SECONDS - s)) s" | tee -a "$out/$name.txt"
}

nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv \
  > "$out/00_gpu.txt" 2>&1
log50=(trainer.log_every_n_steps=50 callbacks.progress_bar.refresh_rate=50)

# 1. the GPU paths never run on a GPU yet: the compiled master-weight step, bf16-true, the fused
#    head + loss (compiled formula) and document masks (compiled, bf16, grouped-query attention)
parallel=()
if "$PY" -c "import xdist" 2>/dev/null; then parallel=(-n 4); fi
step 01_tests 130 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rs ${parallel[@]+"${parallel[@]}"} \
  -k "compiled_master or bf16_true or fused_head or document_mask" tests/test_gpu.py

# 2. the optimizer steps alone: bf16-mixed, bf16-true, master weights eager and compiled
step 02_optimizer 60 "$PY" benchmarks/optimizer.py

# 3. the decoder target: the plain head (0) against the fused head + loss in one chunk (16384),
#    bf16-true with and without master weights, CUDA graphs, metrics every 50 steps: four runs
#    side by side, then 3 profiled steps each (timeline.py's summary: where the device idles;
#    the traces in $out/traces.tar, read again with benchmarks/timeline.py FILE --steps 3)
step 03_decoder 240 "$PY" benchmarks/gpu.py --family decoder \
  --precision bf16-true bf16-true+masters --compile-mode reduce-overhead \
  --loss-chunk-size 0 16384 --steps 100 --override "${log50[@]}" \
  --trace-steps 3 --trace-dir "$out/traces"
if [ -d "$out/traces" ]; then tar cf "$out/traces.tar" -C "$out" traces && rm -rf "$out/traces"; fi

# 4. what objective.document_mask costs: the preset as configured (bf16-mixed), one unmasked
#    window against packed documents of ~512 tokens (SDPA's memory-efficient kernel with a mask)
step 04_document_mask 110 "$PY" benchmarks/gpu.py --family decoder --document-length 0 512

echo "gpu_questions.sh: $((SECONDS - start)) s; the answers in $out/"
ls -la "$out"
exit "$failed"
