"""``tirl sandbox bench``: executions/s and latency of the pool against a fresh interpreter per
call (what SandboxFusion does), on realistic math snippets, in the same run.

The baseline runs each snippet as ``python3 file.py`` in a fresh temporary directory (like
SandboxFusion's python runner with its default ``none`` isolation), with the same interpreter
and the same number of concurrent workers as the pool has lanes.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from tirl.sandbox.pool import ZygotePool

# The mix: 3 of 9 import sympy (math TIR code leans on sympy: solve, simplify, Rational), 1 numpy,
# 4 pure Python (brute force, fractions, big integers, print-heavy), 1 that raises.
SNIPPETS: dict[str, str] = {
    "sympy_solve": "from sympy import symbols, solve\nx = symbols('x')\nprint(solve(x**3 - 6*x**2 + 11*x - 6, x))",
    "sympy_simplify": "import sympy as sp\nx = sp.symbols('x')\nprint(sp.factor(x**6 - 1), sp.simplify((x**2 - 1)/(x - 1)))",
    "sympy_rational": "from sympy import Rational, sqrt, nsimplify\nprint(Rational(3, 4) + Rational(5, 6), nsimplify(sqrt(8)))",
    "numpy": "import numpy as np\na = np.arange(1, 1001)\nprint(int((a**2).sum()), np.linalg.det(np.array([[2., 1.], [1., 3.]])))",
    "brute_force": "count = 0\nfor n in range(1, 100000):\n    if n % 3 == 0 or n % 5 == 0:\n        count += n\nprint(count)",
    "fractions": "from fractions import Fraction\nprint(sum(Fraction(1, k * (k + 1)) for k in range(1, 500)))",
    "big_int": "import math\nprint(pow(7, 123456, 10**9 + 7), math.comb(60, 7), len(str(3**10000)))",
    "print_heavy": "for i in range(2000):\n    print(i, i * i)",
    "error": "x = [1, 2, 3]\nprint(x[10])",
}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _fresh_process(python: str, code: str, timeout: float) -> float:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "main.py")
        with open(path, "w") as f:
            f.write(code)
        env = {"PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "1"}
        subprocess.run([python, path], cwd=d, env=env, capture_output=True, timeout=timeout)
    return time.perf_counter() - t0


def _timed(fn, codes: list[str], workers: int) -> tuple[list[float], float]:
    """(latency of each call, wall time) with ``workers`` calls in flight."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as ex:
        lat = list(ex.map(fn, codes))
    return lat, time.perf_counter() - t0


def _summary(blocks: list[tuple[list[float], float]]) -> dict[str, float]:
    lat = [x for b in blocks for x in b[0]]
    wall = sum(b[1] for b in blocks)
    return {"n": len(lat), "exec_per_s": len(lat) / wall, "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * _pct(lat, 0.99), "wall_s": wall}


def _chunks(xs: list[str], k: int) -> list[list[str]]:
    return [xs[i * len(xs) // k:(i + 1) * len(xs) // k] for i in range(k)]


def run_bench(n: int = 450, baseline_n: int = 72, lanes: int = 2, timeout: float = 10.0, rounds: int = 3,
              **pool_kw) -> dict:
    """Pool and baseline are timed in ``rounds`` alternating blocks (the same machine state for both:
    this VM's speed drifts by ±15% over minutes), each runner's figures over all of its blocks."""
    codes = [list(SNIPPETS.values())[i % len(SNIPPETS)] for i in range(max(n, baseline_n))]
    with ZygotePool(lanes=lanes, timeout_s=timeout, **pool_kw) as pool:
        for c in SNIPPETS.values():  # one warm pass, not timed
            pool.run(c)

        def via_pool(code: str) -> float:
            t0 = time.perf_counter()
            res = pool.run(code)
            assert res.error is None, res.error
            return time.perf_counter() - t0

        level, python = pool.level.describe(), pool.python
        ours, base = [], []
        for pool_codes, base_codes in zip(_chunks(codes[:n], rounds), _chunks(codes[:baseline_n], rounds)):
            ours.append(_timed(via_pool, pool_codes, lanes))
            base.append(_timed(lambda c: _fresh_process(python, c, timeout), base_codes, lanes))
        per_snippet = {k: 1000 * statistics.median([via_pool(c) for _ in range(5)]) for k, c in SNIPPETS.items()}
    ours, base = _summary(ours), _summary(base)
    return {"pool": ours, "baseline": base, "ratio": ours["exec_per_s"] / base["exec_per_s"], "level": level,
            "python": python, "lanes": lanes, "cpus": os.cpu_count(), "per_snippet_p50_ms": per_snippet,
            "rounds": rounds}


def format_table(r: dict) -> str:
    rows = [f"sandbox bench: {r['lanes']} lanes on {r['cpus']} CPUs, interpreter {r['python']}, isolation {r['level']}, "
            f"pool and baseline timed in {r['rounds']} alternating blocks",
            "", "| runner | executions | exec/s | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    for name, key in (("tirl pool (pre-forked zygotes)", "pool"), ("fresh interpreter per call (baseline)", "baseline")):
        m = r[key]
        rows.append(f"| {name} | {m['n']} | {m['exec_per_s']:.1f} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} |")
    rows += ["", f"**pool / baseline = {r['ratio']:.1f}x executions per second**", "",
             "| snippet | pool p50 ms |", "|---|---|"]
    rows += [f"| {k} | {v:.1f} |" for k, v in r["per_snippet_p50_ms"].items()]
    return "\n".join(rows)
