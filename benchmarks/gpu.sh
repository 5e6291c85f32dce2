#!/usr/bin/env bash
# On one GPU (H200: about 4.5 minutes): the three GPU presets through lmlab's Lightning path with
# bf16 + compile (benchmarks/gpu.py), then the GPU-only tests (pytest -m gpu). --overhead adds
# lmlab's overhead over a plain loop on GPT-2 124M (benchmarks/overhead.py --preset gpt2, ~70 s);
# --reference the issue's reference implementations on this card (benchmarks/reference.py: a
# nanoGPT-style GPT-2 and Hugging Face's, ~90 s), for figures from another card than an H100.
#   bash benchmarks/gpu.sh                      # extra arguments go to gpu.py, e.g. --family decoder
#   bash benchmarks/gpu.sh --overhead --reference
# Needs torch (CUDA), lightning, torchmetrics, tokenizers, numpy; pytest -m gpu also needs the dev
# dependencies (pip install -e .[dev]: pytest, pytest-xdist, hydra-core, omegaconf). gpu.py does not
# need Hydra.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's lmlab, installed or not
PY=${PYTHON:-python}
start=$SECONDS

with_overhead=0
with_reference=0
args=()
for arg in "$@"; do
  case "$arg" in
    --overhead) with_overhead=1 ;;
    --reference) with_reference=1 ;;
    *) args+=("$arg") ;;
  esac
done

"$PY" benchmarks/gpu.py ${args[@]+"${args[@]}"}
bench=$?

overhead=0
overhead_said="skipped (--overhead runs it)"
if [ "$with_overhead" -eq 1 ]; then
  echo
  echo "== overhead.py --preset gpt2"
  "$PY" benchmarks/overhead.py --preset gpt2 --rounds 2 --steps 15
  overhead=$?
  overhead_said="exit $overhead"
fi

reference=0
reference_said="skipped (--reference runs it)"
if [ "$with_reference" -eq 1 ]; then
  echo
  echo "== reference.py"
  "$PY" benchmarks/reference.py
  reference=$?
  reference_said="exit $reference"
fi

echo
echo "== pytest -m gpu"
if "$PY" -c "import pytest, hydra, omegaconf" 2>/dev/null; then
  # With pytest-xdist (a dev dependency), 4 test processes share the GPU: the tests' models are
  # tiny, their time is mostly compiling on the host's cores (~105 s serial on an H100 host).
  parallel=()
  if "$PY" -c "import xdist" 2>/dev/null; then parallel=(-n 4); fi
  "$PY" -m pytest -q -m gpu -p no:cacheprovider -rs --durations=5 ${parallel[@]+"${parallel[@]}"}
  tests=$?
  if [ "$tests" -eq 5 ]; then
    echo "pytest -m gpu: no GPU tests collected (ok)"
    tests=0
  fi
else
  echo "pytest -m gpu NOT run: pytest / hydra-core / omegaconf missing here (pip install -e .[dev])"
  tests=2
fi

echo "gpu.sh: gpu.py exit $bench, overhead.py $overhead_said, reference.py $reference_said," \
  "tests exit $tests, $((SECONDS - start)) s"
[ "$bench" -eq 0 ] && [ "$overhead" -eq 0 ] && [ "$reference" -eq 0 ] && [ "$tests" -eq 0 ]
