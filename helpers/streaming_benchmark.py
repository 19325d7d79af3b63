"""Chapter 08's benchmark under the name the chapter, the README and the committed results use:
``python -m helpers.streaming_benchmark --help``. Everything lives in ``helpers.bench`` (see its docstring for
what is measured, and import from there); this module only runs ``helpers.bench.main``."""

from helpers.bench import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
