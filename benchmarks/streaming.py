"""Chapter 08's benchmark, from a checkout: the same as ``python -m helpers.streaming_benchmark``.

The benchmark lives in the package (helpers/streaming_benchmark.py) so that readers who installed only
``helpers`` run it too; see that module for what it measures and its options.
"""

from helpers.streaming_benchmark import main

if __name__ == "__main__":
    main()
