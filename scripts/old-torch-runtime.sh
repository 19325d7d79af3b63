#!/usr/bin/env bash
# A chapter's first cell on a runtime whose torch is older than the book needs (part of make test-latest; needs
# the package index). Colab and Kaggle bring their own torch, and the cell pins it for pip: here pip must refuse
# to install the book rather than replace that torch, and the cell must say so in one sentence.
#
# The runtime's torch is a stand-in: a wheel named torch 2.9.0 with no code, built here, so that nothing of
# several GB is downloaded. The cell installs the book from this checkout's committed HEAD (BOOK_REPO).
# Usage: scripts/old-torch-runtime.sh WORKDIR
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$1
PYTHON=${PYTHON:-python3}
OLD=2.9.0
mkdir -p "$work"
"$PYTHON" -m venv "$work/venv"
py=$work/venv/bin/python
"$py" -m pip install --quiet --upgrade pip   # a runtime's pip is recent
"$py" - "$work" "$OLD" <<'PY'
import base64, hashlib, sys, zipfile
work, version = sys.argv[1], sys.argv[2]
files = {"torch/__init__.py": f"__version__ = {version!r}\n",
         f"torch-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
         f"torch-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: old-torch-runtime\n"
                                             "Root-Is-Purelib: true\nTag: py3-none-any\n"}
record = []
for name, text in files.items():
    digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
    record.append(f"{name},sha256={digest},{len(text.encode())}")
record.append(f"torch-{version}.dist-info/RECORD,,")
with zipfile.ZipFile(f"{work}/torch-{version}-py3-none-any.whl", "w") as whl:
    for name, text in files.items():
        whl.writestr(name, text)
    whl.writestr(f"torch-{version}.dist-info/RECORD", "\n".join(record) + "\n")
PY
"$py" -m pip install --quiet --no-index "$work/torch-$OLD-py3-none-any.whl"

# the first cell of chapter 00, as Colab runs it, installing from this checkout
export BOOK_REPO="file://$repo"
"$py" - "$repo/book/00_setup.ipynb" <<'PY'
import json, sys, types
from importlib.metadata import version

sys.modules["google.colab"] = types.ModuleType("google.colab")
source = "".join(next(c for c in json.load(open(sys.argv[1]))["cells"] if c["cell_type"] == "code")["source"])
try:
    exec(compile(source, "first cell", "exec"), {})
except RuntimeError as error:
    message = str(error)
else:
    sys.exit("old-torch-runtime: the first cell ran on torch 2.9.0 without a word")
print("old-torch-runtime: the first cell says:", message)
assert version("torch") == "2.9.0", f"pip replaced the runtime's torch 2.9.0 with {version('torch')}"
assert "torch 2.9.0" in message and "older than the book needs" in message, message
assert "none of this chapter's cells" in message, message
print("old-torch-runtime passed: pip refused, torch 2.9.0 stayed, the cell said why in one sentence")
PY
