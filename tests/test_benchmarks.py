"""The benchmark scripts (benchmarks/ is not a package): the update bench runs on a tiny shape; the
async bench's stand-in tool protocols do what its docstring says."""

import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_update_bench_runs_and_prints_its_rows():
    """Each row in a fresh process; ``tirl before`` imports the package from a git commit."""
    out = subprocess.run([sys.executable, "benchmarks/update_bench.py", "--shape", "tiny", "--dtype", "float32",
                          "--device", "cpu", "--batch", "4", "--seq", "64", "--min-seq", "16", "--micro", "2",
                          "--max-tokens", "80", "--chunk", "32", "--steps", "1", "--before", "HEAD"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith(("| bare NLL", "| tirl"))]
    assert [r.split("|")[1].strip() for r in rows] == ["bare NLL", "tirl before", "tirl"], out.stdout
    assert rows[0].split("|")[6].strip() == "1.00x", out.stdout
    assert all(float(r.split("|")[3]) > 0 and float(r.split("|")[4]) > 0 for r in rows)  # tokens/s, peak GiB


def test_dist_bench_runs_both_configurations():
    """1 process x 2 threads vs torchrun with 2 ranks x 1 thread, on a tiny shape."""
    out = subprocess.run([sys.executable, "benchmarks/dist_bench.py", "--shape", "tiny", "--batch", "4", "--seq", "32",
                          "--steps", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "x" in line.split("|")[1]]
    assert len(rows) == 2 and rows[0].rstrip().endswith("1.00x |"), out.stdout
    assert all(float(r.split("|")[2]) > 0 for r in rows)


def _load(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_async_bench_line_protocols():
    """The async bench's stand-in tool protocols: a call every k lines, or every k lines with k drawn
    per turn from a hash of its first line (the same k in every schedule)."""
    bench = _load("async_bench")
    two = bench.make_protocol("2")
    assert two.find_stop("a = 1\n") is None
    assert two.find_stop("a = 1\nb = 2\nc") == len("a = 1\nb = 2\n")
    assert two.extract_code("a = 1\nb = 2\n") == "a = 1\nb = 2"
    varied = bench.make_protocol("1-4")
    seen = set()
    for i in range(200):
        first = f"x{i} = {i * i}"
        k = varied.lines(first + "\nrest")
        assert 1 <= k <= 4 and varied.lines(first) == k  # a function of the first line alone
        seen.add(k)
        lines = [first] + [f"y{j}" for j in range(5)]
        for n in range(len(lines) + 1):
            text = "".join(line + "\n" for line in lines[:n])
            want = len("".join(line + "\n" for line in lines[:k])) if n >= k else None
            assert varied.find_stop(text) == want
        turn = "".join(line + "\n" for line in lines[:k])
        assert varied.extract_code(turn) == turn[:-1]
        assert varied.insertion(turn, "ok") == "```output\nok\n```\n"
    assert seen == {1, 2, 3, 4}


def test_verifier_table_bench_prints_both_verifiers(tmp_path):
    """The precision/recall script scores the committed table with tirl and plain math-verify, and its
    builder reproduces the committed table from the benchmark files (when ../shared is here)."""
    out = subprocess.run([sys.executable, "benchmarks/verifier_table.py"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    all_row = [line for line in out.stdout.splitlines() if line.startswith("| **all**")][0]
    assert "| 1.000 (0 FP) |" in all_row  # tirl's precision on the table
    data = Path(REPO).resolve().parent / "shared" / "data" / "eval"
    if data.is_dir():
        built = tmp_path / "table.jsonl"
        subprocess.run([sys.executable, "benchmarks/verifier_table.py", "--build", "--data", str(data), "--table", str(built)],
                       cwd=REPO, check=True, capture_output=True, timeout=120)
        assert built.read_text() == (Path(__file__).with_name("verifier_table.jsonl")).read_text()


def test_update_bench_allocated_peak_sees_a_freed_tensor_and_not_the_heap_glibc_keeps():
    """The CPU's counterpart of CUDA's peak allocated: a 256 MiB block alive for 50 ms shows in
    the peak; after it is freed the bytes in use fall back (glibc may keep the pages)."""
    import time

    import torch

    bench = _load("update_bench")
    probe = bench.AllocatedPeak()
    if probe.now() is None:
        import pytest

        pytest.skip("this libc has no mallinfo2")
    before = probe.now()
    probe.start()
    block = torch.ones(64 * 2**20)  # 256 MiB of float32, written (so its pages are resident)
    time.sleep(0.05)
    del block
    time.sleep(0.01)
    peak = probe.stop_gib()
    assert peak - before / 2**30 >= 0.24, (peak, before)  # 0.25 GiB, less what was freed meanwhile
    assert probe.now() - before < 2**26, (probe.now(), before)  # < 64 MiB left in use after the free
