# make train | make test | make test-all | make lint | make bench
VENV ?= .venv
PY := $(VENV)/bin/python
# pinned CPU build for this repo's CI machines; on GPU machines: make TORCH=torch train
TORCH ?= torch==2.13.0

.PHONY: train test test-all lint format bench clean

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

train: $(VENV)/.installed
	$(PY) -m lmlab $(ARGS)

test: $(VENV)/.installed
	WANDB_MODE=offline $(PY) -m pytest -q -m "not slow" $(ARGS)

test-all: $(VENV)/.installed
	WANDB_MODE=offline $(PY) -m pytest -q $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

# The CPU benchmarks (benchmarks/README.md; several minutes); vs_hf.py needs `pip install -e .[bench]`.
# On a GPU machine: bash benchmarks/gpu.sh
bench: $(VENV)/.installed
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/data.py
	$(PY) benchmarks/optimizer.py --device cpu
	@if $(PY) -c "import transformers" 2>/dev/null; then $(PY) benchmarks/vs_hf.py; \
	else echo "vs_hf.py skipped: pip install -e '.[bench]' (Hugging Face transformers)"; fi

clean:
	rm -rf outputs multirun .pytest_cache
