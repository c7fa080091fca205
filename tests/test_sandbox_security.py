"""Attacks on the pre-forked sandbox: each is contained, the zygotes survive (same pids, no
restart), and no process is left behind. Runs with the strongest isolation this machine has;
the tests that need bubblewrap or root say so when skipped."""

import os
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from conftest import skip_unless_memory_cap
from tirl.rollout.protocol import observation
from tirl.sandbox import ZygotePool

SECRET = "tirl-test-secret-7f3a9c"


@pytest.fixture(scope="module")
def pool():
    os.environ["TIRL_TEST_SECRET"] = SECRET  # in the server's environment: must never show inside
    p = ZygotePool(lanes=2, timeout_s=3.0, max_output_bytes=8192, memory_mb=512, tmp_mb=16, nproc=64)
    p.baseline = _sandbox_procs(p)  # bwrap and zygote of each lane: what must remain after every attack
    yield p
    p.close()
    os.environ.pop("TIRL_TEST_SECRET", None)


def _sandbox_procs(pool) -> set[int]:
    """Host pids of everything running under the pool (zygotes, bwrap, any leftover child)."""
    roots, out = set(pool.pids()), set()
    parent = {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                stat = open(f"/proc/{e}/stat", "rb").read()
                parent[int(e)] = int(stat[stat.rindex(b")") + 2:].split()[1])
            except (OSError, ValueError):
                pass
    frontier = roots
    while frontier:
        out |= frontier
        frontier = {p for p, pp in parent.items() if pp in frontier and p not in out}
    return out


def _describe(pids: set[int]) -> list[str]:
    out = []
    for p in sorted(pids):
        try:
            stat = open(f"/proc/{p}/stat", "rb").read()
            cmd = open(f"/proc/{p}/cmdline", "rb").read().replace(b"\0", b" ")[:80]
            out.append(f"{p} state {stat[stat.rindex(b')') + 2:].split()[0].decode()} {cmd.decode(errors='replace')}")
        except OSError:
            out.append(f"{p} (gone)")
    return out


@pytest.fixture
def contained(pool):
    """Around each attack: only the pool's own processes remain (a zygote reaps a request's
    processes right after answering it), no zygote was replaced, and the sandbox still works."""
    before_pids, before_stats = pool.baseline, dict(pool.stats)
    yield
    # The zygote answers first and reaps right after, so wait for the tree to settle. One scan of
    # /proc is not atomic: a grandchild whose parent exits during the scan can look unconnected,
    # so the tree counts as settled only when three scans 50 ms apart agree with the baseline.
    deadline, agreeing = time.monotonic() + 5, 0
    while agreeing < 3 and time.monotonic() < deadline:
        agreeing = agreeing + 1 if _sandbox_procs(pool) == before_pids else 0
        time.sleep(0.05)
    now = _sandbox_procs(pool)
    assert now == before_pids, f"processes left behind or zygotes replaced: {_describe(now ^ before_pids)}"
    assert pool.stats["restarts"] == before_stats["restarts"]
    assert pool.run("print(6 * 7)").stdout.strip() == "42"


needs_bwrap = pytest.mark.skipif("not __import__('shutil').which('bwrap')", reason="needs bubblewrap")


def _run(pool, code, timeout=3.0):
    t0 = time.monotonic()
    r = pool.run(code, timeout)
    assert time.monotonic() - t0 < timeout + 2.0, "a request outlived its timeout"
    return r


@pytest.mark.parametrize("code", [
    "while True: pass",
    "import time; time.sleep(60)",
    "x = 7 ** (10 ** 9)",
    "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: time.sleep(0.01)",
    "import os, time\nos.close(1); os.close(2)\nwhile True: pass",
])
def test_runaway_code_is_killed_at_the_deadline(pool, contained, code):
    r = _run(pool, code, timeout=1.0)
    assert r.timed_out or (r.returncode or 0) < 0  # killed by the wall clock or RLIMIT_CPU


def test_fork_bomb(pool, contained):
    r = _run(pool, "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", timeout=2.0)
    assert not r.ok


def test_thread_bomb(pool, contained):
    code = ("import threading, time\nn = 0\ntry:\n    while True:\n        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"
            "        n += 1\nexcept Exception as e:\n    print('stopped at', n, type(e).__name__)")
    r = _run(pool, code, timeout=3.0)
    assert "stopped at" in r.stdout or r.timed_out


@pytest.mark.parametrize("code", ["x = bytearray(8 * 1024**3)", "a = []\nwhile True: a.append(' ' * 10**6)"])
def test_memory_bombs(pool, contained, code):
    r = _run(pool, code)
    assert not r.ok and ("MemoryError" in r.stderr or r.returncode is None or r.returncode < 0)


def test_output_flood_is_capped(pool, contained):
    r = _run(pool, "while True: print('x' * 10000)")
    assert r.output_truncated and len(r.stdout) + len(r.stderr) <= 8192


@needs_bwrap
@pytest.mark.parametrize("path", ["/usr/evil.txt", "/etc/evil", "/evil", "/proc/evil", "/dev/evil", "/dev/null/evil",
                                  "/bin/evil", "/lib/evil"])
def test_writes_outside_tmp_fail(pool, contained, path):
    r = _run(pool, f"open({path!r}, 'w').write('x')")
    assert not r.ok and ("Error" in r.stderr)
    assert not os.path.exists(path) or path.startswith("/proc")


@needs_bwrap
def test_filling_tmp_hits_its_size(pool, contained):
    code = "f = open('/tmp/big', 'wb')\nfor _ in range(100):\n    f.write(b'0' * (1 << 20))\nf.close()\nprint('wrote')"
    r = _run(pool, code)
    assert "wrote" not in r.stdout and ("No space" in r.stderr or "File too large" in r.stderr or "OSError" in r.stderr)


def test_work_dir_is_fresh_every_time(pool, contained):
    pool.run("open('left_behind.txt', 'w').write('x')")
    assert pool.run("import os; print(os.listdir('.'))").stdout.strip() == "[]"


_LEAVE_BEHIND = {
    "a file in /tmp": "open('/tmp/leak', 'w').write('secret')",
    "a tree with modes that forbid listing and writing": (
        "import os\nos.makedirs('/tmp/a/b/c')\nopen('/tmp/a/b/c/f', 'w').write('x')\n"
        "os.chmod('/tmp/a/b/c', 0)\nos.chmod('/tmp/a/b', 0o100)\nos.chmod('/tmp/a', 0o500)\nos.chmod('.', 0)"),
    "a tree deeper than any path can name": (
        "import os\nos.chdir('/tmp')\nfor _ in range(3000):\n    os.mkdir('d' * 20)\n    os.chdir('d' * 20)\n"
        "open('f', 'w').write('x')"),
    "the work root renamed and replaced by a symlink": (
        "import os\nos.rename('/tmp/sbx', '/tmp/moved')\nos.symlink('/usr', '/tmp/sbx')"),
    "/tmp locked": "import os\nos.chmod('/tmp/sbx', 0)\nos.chmod('/tmp', 0o500)",
    "a locked tree in /mnt (the private mount for SandboxFusion's absolute paths)": (
        "import os\nos.makedirs('/mnt/a/b')\nopen('/mnt/a/b/f', 'w').write('secret')\nos.chmod('/mnt/a', 0)\n"
        "os.chmod('/mnt', 0o500)"),
    "a file and a semaphore in /dev/shm": (  # private and small (multiprocessing's locks live there)
        "import os, multiprocessing\nopen('/dev/shm/leak', 'w').write('secret')\nos.mkdir('/dev/shm/d')\n"
        "l = multiprocessing.Lock()\nos.chmod('/dev/shm/d', 0)"),
}


@needs_bwrap
@pytest.mark.parametrize("what", list(_LEAVE_BEHIND))
def test_nothing_written_survives_into_the_next_request(pool, contained, what):
    """Requests of different trajectories share a lane: whatever one leaves anywhere it can write
    (its private /tmp) is gone before the next one starts, whatever it did to the modes."""
    _run(pool, _LEAVE_BEHIND[what])
    for _ in pool.pids():  # sequential requests take the lanes in turn: the probe reaches the one used
        r = _run(pool, "import os\nprint(sorted(os.listdir('/tmp')), os.listdir('.'), os.getcwd(), os.listdir('/dev/shm'), "
                       "os.listdir('/mnt'))\nopen('probe', 'w').write('x'); print(open('probe').read())")
        assert r.stdout.split("\n")[:2] == ["['sbx'] [] /tmp/sbx/work [] []", "x"], r
    assert not os.path.exists("/dev/shm/leak")  # the host's /dev/shm was never the sandbox's


@needs_bwrap
def test_dev_shm_is_private_and_small(pool, contained):
    code = "f = open('/dev/shm/big', 'wb')\nfor _ in range(64):\n    f.write(b'0' * (1 << 20))\nf.close()\nprint('wrote')"
    r = _run(pool, code)
    assert "wrote" not in r.stdout and ("No space" in r.stderr or "OSError" in r.stderr), r


@pytest.mark.parametrize("code", [
    "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(libc.shmget(0x7157, 1 << 20, 0o1666), ctypes.get_errno())",
    "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(libc.semget(0x7157, 1, 0o1666), ctypes.get_errno())",
    "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(libc.msgget(0x7157, 0o1666), ctypes.get_errno())",
    "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(libc.syscall(240, b'/q', 0o102, 0o600, None), ctypes.get_errno())",
    "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(libc.syscall(319, b'x', 0), ctypes.get_errno())",
])
def test_no_state_outside_the_process_or_uncounted_memory(pool, contained, code):
    """SysV IPC and POSIX message queues outlive the process (the next request would find them);
    SysV shm and memfd hold memory no rlimit counts: shmget, semget, msgget, mq_open, memfd_create."""
    if not pool.level.seccomp:
        pytest.skip("needs seccomp")
    assert _run(pool, code).stdout.strip() == "-1 1"  # EPERM


def test_forked_memory_bomb_is_capped_in_total(pool, contained):
    """RLIMIT_AS is per process: five children of 300 MB each would hold 1.5 GB. The lane's
    memory cgroup (512 MB for the request + the zygote's share) kills the excess, children first."""
    skip_unless_memory_cap(pool.level.memory_cap, "no memory cgroup here: " + "; ".join(pool.level.missing))
    code = ("import os, time\npids = []\nfor _ in range(5):\n    pid = os.fork()\n    if pid == 0:\n"
            "        b = b'x' * (300 << 20)\n        time.sleep(3)\n        os._exit(0)\n    pids.append(pid)\n"
            "time.sleep(2)\nprint(sum(os.waitpid(p, os.WNOHANG) == (0, 0) for p in pids))")
    r = pool.run(code, timeout=8)
    assert r.ok and int(r.stdout) <= 2, r
    assert "killed by the sandbox's memory cap" in r.stderr


@needs_bwrap
@pytest.mark.parametrize("path", ["/etc/passwd", "/etc/shadow", "/root", "/home", os.getcwd(), "/proc/1/environ"])
def test_host_files_are_not_there(pool, contained, path):
    r = _run(pool, f"import os\nprint(os.listdir({path!r}) if os.path.isdir({path!r}) else open({path!r}, 'rb').read()[:200])")
    assert not r.ok or SECRET not in r.stdout and "root:" not in r.stdout
    if path != "/proc/1/environ":
        assert not r.ok


@needs_bwrap
def test_environment_has_no_secrets(pool, contained):
    code = ("import os, glob\nout = [repr(dict(os.environ))]\nfor p in glob.glob('/proc/*/environ'):\n    try:\n"
            "        out.append(open(p, 'rb').read().decode(errors='replace'))\n    except OSError:\n        pass\nprint(out)")
    r = _run(pool, code)
    assert SECRET not in r.stdout and SECRET not in r.stderr


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"host-loopback-reached")

    def log_message(self, *a):
        pass


def test_network_is_unreachable(pool, contained):
    server = HTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        for code in [
            f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}', timeout=2).read())",
            "import socket; s = socket.create_connection(('1.1.1.1', 53), timeout=2); print('connected')",
            "import socket; print(socket.getaddrinfo('pypi.org', 443))",
            "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b'x', ('8.8.8.8', 53)); print('sent')",
        ]:
            r = _run(pool, code)
            assert not r.ok and "host-loopback-reached" not in r.stdout and "connected" not in r.stdout, code
        assert pool.run("import socket; a, b = socket.socketpair(); a.send(b'ok'); print(b.recv(2))").stdout.strip() == "b'ok'"
    finally:
        server.shutdown()


@pytest.mark.parametrize("code", [
    "import os; os.kill(os.getppid(), 9)",
    "import os; os.kill(-1, 9)",
    "import os; os.kill(1, 9)",
    "import os, signal; os.killpg(os.getpgid(os.getppid()), 9)",
])
def test_cannot_kill_the_zygote_or_everyone(pool, contained, code):
    r = _run(pool, code)
    assert "PermissionError" in r.stderr or "ProcessLookupError" in r.stderr or "Operation not permitted" in r.stderr


def test_no_ptrace_or_parent_memory(pool, contained):
    code = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nppid = os.getppid()\n"
            "print('ptrace', libc.ptrace(16, ppid, 0, 0), ctypes.get_errno())\n"
            "try:\n    open(f'/proc/{ppid}/mem', 'rb').read(1)\n    print('MEM READ')\nexcept OSError as e:\n    print('mem', type(e).__name__)")
    r = _run(pool, code)
    assert "ptrace -1" in r.stdout and "MEM READ" not in r.stdout


def test_no_new_namespaces(pool, contained):
    code = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "print(libc.unshare(0x10000000), libc.unshare(0x40000000), libc.mount(b'none', b'/tmp', b'tmpfs', 0, None))")
    assert _run(pool, code).stdout.strip() == "-1 -1 -1"


@pytest.mark.parametrize("code", ["import ctypes; ctypes.string_at(0)", "import sys\nsys.setrecursionlimit(10**7)\ndef f(n): return f(n + 1)\nf(0)",
                                  "def f(n): return f(n + 1)\nf(0)"])
def test_crashes_stay_inside(pool, contained, code):
    r = _run(pool, code)
    assert not r.ok  # segfault, RecursionError/MemoryError, or (3.11 frames live on the heap) the deadline
    assert (r.returncode or 0) < 0 or "RecursionError" in r.stderr or "MemoryError" in r.stderr or r.timed_out
    assert observation(r)


def test_daemonised_children_are_reaped(pool, contained):
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(100)\n    os._exit(0)\n"
            "print('parent done')")
    t0 = time.monotonic()
    r = _run(pool, code)
    assert r.stdout.strip() == "parent done" and time.monotonic() - t0 < 1.0


def test_closed_stdio_and_exit_codes(pool, contained):
    assert _run(pool, "import os; os.close(0); os.close(1); os.close(2)").returncode == 0
    assert _run(pool, "import sys; sys.exit(3)").returncode == 3
    assert _run(pool, "raise SystemExit('bye')").returncode == 1


@needs_bwrap
@pytest.mark.skipif(os.geteuid() != 0, reason="a dedicated uid needs root")
def test_runs_as_dedicated_uid_with_nproc(pool, contained):
    r = _run(pool, "import os, resource; print(os.getuid(), resource.getrlimit(resource.RLIMIT_NPROC)[0])")
    uid, nproc = map(int, r.stdout.split())
    assert uid == pool.uid != 0 and nproc == 64
    assert pool.level.bwrap and pool.level.seccomp
    skip_unless_memory_cap(pool.level.memory_cap, "no memory cgroup here: " + "; ".join(pool.level.missing))
    assert pool.level.full
