"""The walking-skeleton sandbox: every failure of the snippet comes back as a result."""

import os
import time

from tirl.rollout.protocol import observation


def test_prints_and_imports(sandbox):
    r = sandbox.run("import sympy, numpy\nprint(sympy.factorint(360))")
    assert r.ok and r.stdout.strip() == "{2: 3, 3: 2, 5: 1}"


def test_exception_becomes_last_traceback_line(sandbox):
    r = sandbox.run("print('before')\n1/0")
    assert r.returncode == 1 and not r.ok
    assert observation(r) == "before\nZeroDivisionError: division by zero"


def test_timeout_is_enforced_and_reported(sandbox):
    t0 = time.monotonic()
    r = sandbox.run("while True: pass", timeout=1.0)
    assert time.monotonic() - t0 < 3.0
    assert r.timed_out and "TimeoutError" in observation(r)


def test_sleeping_daemon_child_does_not_hold_the_call(sandbox):
    code = "import os, time\nif os.fork() == 0:\n    time.sleep(30)\nprint('parent done')"
    t0 = time.monotonic()
    r = sandbox.run(code, timeout=3.0)
    assert r.stdout.strip() == "parent done"
    assert time.monotonic() - t0 < 2.5


def test_output_flood_is_capped(sandbox):
    t0 = time.monotonic()
    r = sandbox.run("while True: print('x' * 1000)", timeout=3.0)
    assert r.output_truncated and len(r.stdout) <= sandbox.max_output_bytes
    assert time.monotonic() - t0 < 1.5  # stopped when the cap was hit, not at the deadline


def test_memory_bomb_fails_inside(sandbox):
    r = sandbox.run("x = bytearray(4 * 1024**3)")
    assert not r.ok and "MemoryError" in observation(r)


def test_segfault_and_empty_output(sandbox):
    r = sandbox.run("import ctypes; ctypes.string_at(0)")
    assert r.returncode is not None and r.returncode < 0
    assert "SIGSEGV" in observation(r)
    assert observation(sandbox.run("x = 1")) == "(no output)"


def test_environment_is_clean(sandbox, monkeypatch):
    monkeypatch.setenv("TIRL_SECRET", "hunter2")
    r = sandbox.run("import os; print(sorted(os.environ))")
    assert "TIRL_SECRET" not in r.stdout and "hunter2" not in r.stdout


def test_run_many_is_concurrent_and_ordered(sandbox):
    t0 = time.monotonic()
    rs = sandbox.run_many([f"import time; time.sleep(0.5); print({i})" for i in range(4)])
    assert [r.stdout.strip() for r in rs] == ["0", "1", "2", "3"]
    assert time.monotonic() - t0 < 1.9  # 4 workers: overlapped, not 2 s serial


def test_no_leftover_files(sandbox, tmp_path):
    before = set(os.listdir("/tmp"))
    sandbox.run("open('junk.txt', 'w').write('x')")
    assert {n for n in set(os.listdir("/tmp")) - before if n.startswith("tirl-sbx-")} == set()
