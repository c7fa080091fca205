"""Sandbox throughput: the pre-forked pool vs a fresh interpreter per call, same run.

    .venv/bin/python benchmarks/sandbox_bench.py            # = tirl sandbox bench
"""

import sys

from tirl.cli import main

if __name__ == "__main__":
    sys.exit(main(["sandbox", "bench", *sys.argv[1:]]))
