#!/usr/bin/env bash
# On one GPU (H100: about 6 minutes): the three GPU presets through lmlab's Lightning path with bf16 +
# compile (benchmarks/gpu.py), lmlab's overhead over a plain loop on GPT-2 124M (benchmarks/overhead.py
# --preset gpt2), then the GPU-only tests (pytest -m gpu).
#   bash benchmarks/gpu.sh                 # extra arguments go to gpu.py, e.g. --family decoder
# Needs torch (CUDA), lightning, torchmetrics, tokenizers, numpy; pytest -m gpu also needs the dev
# dependencies (pip install -e .[dev]: pytest, hydra-core, omegaconf). gpu.py does not need Hydra.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's lmlab, installed or not
PY=${PYTHON:-python}
start=$SECONDS

"$PY" benchmarks/gpu.py "$@"
bench=$?

echo
echo "== overhead.py --preset gpt2"
"$PY" benchmarks/overhead.py --preset gpt2 --rounds 2 --steps 15
overhead=$?

echo
echo "== pytest -m gpu"
if "$PY" -c "import pytest, hydra, omegaconf" 2>/dev/null; then
  "$PY" -m pytest -q -m gpu -p no:cacheprovider
  tests=$?
  if [ "$tests" -eq 5 ]; then
    echo "pytest -m gpu: no GPU tests collected (ok)"
    tests=0
  fi
else
  echo "pytest -m gpu NOT run: pytest / hydra-core / omegaconf missing here (pip install -e .[dev])"
  tests=2
fi

echo "gpu.sh: gpu.py exit $bench, overhead.py exit $overhead, tests exit $tests, $((SECONDS - start)) s"
[ "$bench" -eq 0 ] && [ "$overhead" -eq 0 ] && [ "$tests" -eq 0 ]
