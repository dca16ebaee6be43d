# The course's front door. Each target creates .venv when it is missing and installs what it needs.
#   make course          run every chapter at the size this machine affords, then the cost report
#   make course FAST=1   the quick pass (tiny sizes, a minute or two per chapter at most)
#   make test            the whole test suite (what CI runs)
#   make lab             JupyterLab on the notebooks
PYTHON ?= python3
VENV ?= .venv
# The torch requirement. A plain `torch` from PyPI is a CUDA build on Linux (several GB); on a CPU-only
# machine use e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu, and CI pins the local CPU wheel.
TORCH ?= torch>=2.4
TORCH_INDEX ?=
# gpu = Triton (Linux only): chapter 02 runs its kernels in Triton's interpreter on a CPU.
# bench = transformers, the peer library the benchmarks (and their tests) compare against.
EXTRAS ?= dev,gpu,bench
CHAPTERS ?=
FAST ?= 0
# seconds per notebook cell for `make course` (empty: minillm's default); raise it on a slow machine
TIMEOUT ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.minillm-installed

.PHONY: course test lab env report notebooks clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

course: $(STAMP)
	$(BIN)/minillm env
	$(BIN)/minillm course run $(if $(filter 1,$(FAST)),--fast) $(if $(TIMEOUT),--timeout $(TIMEOUT)) $(CHAPTERS)

test: $(STAMP)
	$(BIN)/minillm build-notebooks --check
	$(BIN)/python -m pytest -q tests solutions --nbval-lax --nbval-current-env --durations=15

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

env: $(STAMP)
	$(BIN)/minillm env

report: $(STAMP)
	$(BIN)/minillm report

notebooks: $(STAMP)
	$(BIN)/minillm build-notebooks

clean-venv:
	rm -rf $(VENV)
