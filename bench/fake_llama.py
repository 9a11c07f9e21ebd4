"""``python -m bench.fake_llama``: the benchmarks' fake llama-server, in its own process.

The server is :mod:`tests.support.fake_llama.fast` (one scripted llama-server for the
tests and the benchmarks); this module keeps the command the benchmark scripts and
docs/performance.md start it with.
"""

from __future__ import annotations

import sys

from tests.support.fake_llama.fast import main

if __name__ == "__main__":
    sys.exit(main())
