#!/usr/bin/env bash
# What issue 4's decoder target (>= 520K tokens/s, >= 45% MFU on an H100) and the document masks
# still need measured, as one call on one GPU: 8.8 minutes of limits in all, 9.2 at worst (each step
# is cut at its limit, killed 5 s later, and the next goes on). The answers go to OUT_DIR (default
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

# 1. the GPU paths not yet run on a GPU: FlexAttention's document masks (attention=flex) against
#    the dense ones (logits and gradients: eager, compiled, CUDA graphs) and through training
parallel=()
if "$PY" -c "import xdist" 2>/dev/null; then parallel=(-n 4); fi
step 01_tests 110 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rs ${parallel[@]+"${parallel[@]}"} \
  -k "flex_document_masks or attention_flex" tests/test_gpu.py

# 2. the decoder target: the one-GPU preset (experiment=gpt2_124m_1gpu: bf16-true + masters, CUDA
#    graphs, the fused head + loss in one chunk, metrics every 50 steps) with the masters' compiled
#    step against their eager one (optimizer.py alone had the compiled one slower on an H200), 3
#    profiled steps each (timeline.py's summary; traces in $out/traces.tar)
step 02_decoder 150 "$PY" benchmarks/gpu.py --family decoder \
  --precision bf16-true+masters bf16-true+masters-eager --trace-steps 3 --trace-dir "$out/traces"

# 3. the same card's nanoGPT (reference.py): the target scaled to this card, and nanoGPT's step by
#    kind of kernel beside lmlab's (step 2), for the gap still open on the same-card scale
step 03_reference 90 "$PY" benchmarks/reference.py --contender nanogpt \
  --trace-steps 3 --trace-dir "$out/traces"
if [ -d "$out/traces" ]; then tar cf "$out/traces.tar" -C "$out" traces && rm -rf "$out/traces"; fi

# 4. what FlexAttention's block masks save over the dense document masks (12% of gpt2_124m's step
#    on an H200): the one-GPU preset on one unmasked window, then on packed documents of ~512
#    tokens with dense (auto) and flex masks, side by side
step 04_flex 180 "$PY" benchmarks/gpu.py --family decoder --document-length 0 512 \
  --sdpa-backend auto flex

echo "gpu_questions.sh: $((SECONDS - start)) s; the answers in $out/"
ls -la "$out"
exit "$failed"
