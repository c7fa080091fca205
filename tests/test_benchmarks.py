"""The benchmark scripts run (as scripts: benchmarks/ is not a package) on a tiny shape."""

import subprocess
import sys

from conftest import REPO


def test_update_bench_runs_and_prints_both_rows():
    out = subprocess.run([sys.executable, "benchmarks/update_bench.py", "--shape", "tiny", "--dtype", "float32",
                          "--device", "cpu", "--batch", "4", "--seq", "64", "--micro", "2", "--steps", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith(("| bare NLL", "| tirl"))]
    assert len(rows) == 2 and rows[0].rstrip().endswith("1.00x |"), out.stdout
    assert all(float(r.split("|")[3]) > 0 for r in rows)  # tokens/s
