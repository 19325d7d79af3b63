"""Chapter 08's benchmark, from a checkout: the same as ``python -m helpers.streaming_benchmark``.

The benchmark lives in the package (``helpers/bench/``, run as ``helpers.streaming_benchmark``) so that readers
who installed only ``helpers`` run it too; see ``helpers.bench`` for what it measures and its options (``--help``).
On a GPU machine: ``python benchmarks/streaming.py --device cuda --small --rounds 1 --json report.json``. A model
with Llama-2-70B's shapes, 16 of its layers, bigger than a 24 GB machine's RAM:
``python benchmarks/streaming.py --shape llama-2-70b --layers 16 --json report.json``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's helpers, installed or not

from helpers.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
