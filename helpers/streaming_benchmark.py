"""Chapter 08's benchmark under the name the chapter, the README and the committed results use:
``python -m helpers.streaming_benchmark --help``. Everything lives in ``helpers.bench`` (see its docstring for
what is measured); this module re-exports what the book imports from it and runs ``helpers.bench.main``."""

from helpers.bench import (
    ANCHORS,
    TARGET_AIRLLM,
    TARGET_ANCHOR,
    TARGET_BOUND,
    TARGET_OVERLAP,
    TARGET_RAM_SHARE,
    TARGET_RSS,
    main,
    print_shape,
    print_table,
)

__all__ = ["main", "TARGET_BOUND", "TARGET_OVERLAP", "TARGET_RSS", "TARGET_ANCHOR", "TARGET_AIRLLM",
           "TARGET_RAM_SHARE", "ANCHORS", "print_table", "print_shape"]

if __name__ == "__main__":
    main()
