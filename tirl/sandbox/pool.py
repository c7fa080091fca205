"""A pre-forked pool of isolated zygotes (see ``zygote.py``): the default sandbox.

Each *lane* is one zygote process with numpy and sympy imported and warmed; a request takes a
free lane (bounded concurrency = number of lanes), the zygote forks a child that runs the code,
and the lane is free again. A zygote that dies or stops answering is replaced; a request never
waits past its timeout plus a short grace.

Isolation, strongest first (``isolation="auto"`` takes the strongest available and says loudly,
once, what is missing; ``pool.level`` tells what is in use):

* **bubblewrap**: new user/pid/net/ipc/uts/cgroup namespaces (no network at all, its own /proc),
  read-only /usr and nothing else of the host (no /etc, /home, /root, the project), a private
  size-capped /tmp, a clean environment for bwrap itself and inside, ``--disable-userns``;
* **dedicated uid** (when started as root): bwrap and the zygote run as ``uid`` (not root), so
  ``RLIMIT_NPROC`` works (it is ignored for uid 0) and the code owns no host files;
* **a memory cgroup per lane** (when started as root with a writable cgroup hierarchy, see
  ``cgroup.py``): a request's processes together stay under its memory limit;
* in every mode: per-child rlimits (address space, CPU, file size, open files, core, message
  queues; processes with a dedicated uid), a seccomp filter (no ptrace, process_vm_*,
  mount/unshare/setns, bpf, io_uring, namespaces via clone, sockets other than AF_UNIX, SysV IPC,
  POSIX message queues, memfd, and no kill/tkill/tgkill aimed at the zygote, its parent, pid 1 or
  -1), a non-dumpable zygote (its /proc/pid/mem is closed to the child), a wall-clock SIGKILL,
  output capped while reading, every descendant killed and reaped and the work directory (with
  bubblewrap: the whole private /tmp) emptied after each request.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import queue
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tirl.sandbox.cgroup import MemoryCap
from tirl.types import ExecResult

ZYGOTE_SOURCE = (Path(__file__).parent / "zygote.py").read_text()
_GRACE_S = 3.0  # how long past its timeout a request may take before the zygote is replaced
_warned: set[str] = set()


@dataclass(frozen=True)
class IsolationLevel:
    bwrap: bool
    dedicated_uid: int | None
    seccomp: bool
    python: str
    memory_cap: bool = False

    @property
    def full(self) -> bool:
        return self.bwrap and self.dedicated_uid is not None and self.seccomp and self.memory_cap

    @property
    def missing(self) -> list[str]:
        out = []
        if not self.bwrap:
            out.append("bubblewrap (filesystem, network, pid isolation)")
        if self.dedicated_uid is None:
            out.append("a dedicated non-root uid (needs root to switch; without it RLIMIT_NPROC is not set)")
        if not self.seccomp:
            out.append("seccomp (libseccomp not loadable)")
        if not self.memory_cap:
            out.append("a memory cgroup per lane (needs root and a writable cgroup hierarchy; without it code "
                       "that forks may use nproc x memory_mb in total)")
        return out

    def describe(self) -> str:
        parts = ["bwrap" if self.bwrap else "no-bwrap", f"uid={self.dedicated_uid}" if self.dedicated_uid is not None else "same-uid",
                 "seccomp" if self.seccomp else "no-seccomp", "memcg" if self.memory_cap else "no-memcg", "rlimits"]
        return ("full" if self.full else "partial") + ": " + "+".join(parts)


@functools.lru_cache(maxsize=None)
def _python_has(python: str, modules: str) -> bool:
    try:
        return subprocess.run([python, "-I", "-c", f"import {modules}"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def resolve_python(python: str = "auto") -> str:
    """The interpreter the zygote runs. ``auto``: the system ``/usr/bin/python3`` when it has numpy
    and sympy (then nothing outside /usr needs binding), else this interpreter."""
    if python != "auto":
        return python
    if os.path.exists("/usr/bin/python3") and _python_has("/usr/bin/python3", "numpy, sympy"):
        return "/usr/bin/python3"
    return os.path.realpath(sys.executable)


def _reference_blas() -> dict[str, str]:
    """``LD_LIBRARY_PATH`` to Debian's reference BLAS and LAPACK, where installed. OpenBLAS (which
    scipy's package makes the system default) reserves ~170 MB of address space per process even
    single-threaded, all of it counted by the request's RLIMIT_AS: the sandbox's numpy and scipy use
    the reference libraries instead (plenty for the small matrices model-written code uses)."""
    dirs = [d for d in ("/usr/lib/x86_64-linux-gnu/blas", "/usr/lib/x86_64-linux-gnu/lapack",
                        "/usr/lib/aarch64-linux-gnu/blas", "/usr/lib/aarch64-linux-gnu/lapack") if os.path.isdir(d)]
    return {"LD_LIBRARY_PATH": ":".join(dirs)} if dirs else {}


SCRATCH_DIRS = ("/tmp", "/mnt")
"""Under bubblewrap, the places a request may write (private size-capped tmpfs mounts, wiped after every
request): the work directory lives in /tmp; /mnt takes absolute paths as SandboxFusion's own tests use."""


def _bwrap_args(python: str, tmp_mb: int) -> list[str]:
    args = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--ro-bind", "/usr", "/usr"]
    for top in ("/lib", "/lib64", "/lib32", "/bin", "/sbin"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for etc in ("/etc/ld.so.cache", "/etc/alternatives"):  # Debian's libblas.so.3 is an alternatives symlink
        if os.path.exists(etc):
            args += ["--ro-bind", etc, etc]
    if not python.startswith("/usr/"):  # e.g. a venv: bind its prefixes read-only
        for prefix in {sys.base_prefix, sys.prefix, str(Path(python).resolve().parent.parent)}:
            if not prefix.startswith("/usr"):
                args += ["--ro-bind", prefix, prefix]
    # /dev/shm: a small private tmpfs for POSIX semaphores (multiprocessing's locks); emptied after every request
    args += ["--dev", "/dev", "--proc", "/proc", "--size", str(tmp_mb << 20), "--tmpfs", "/tmp",
             "--size", str(tmp_mb << 20), "--tmpfs", "/mnt",
             "--size", str(min(tmp_mb, 16) << 20), "--tmpfs", "/dev/shm",
             "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
             "--setenv", "OPENBLAS_NUM_THREADS", "1", "--setenv", "OMP_NUM_THREADS", "1",
             "--setenv", "MPLBACKEND", "Agg", *[a for k, v in _reference_blas().items() for a in ("--setenv", k, v)],
             "--hostname", "sandbox", "--chdir", "/tmp",
             "--remount-ro", "/dev", "--remount-ro", "/"]  # only the size-capped SCRATCH_DIRS are writable
    return args


class SandboxStartError(RuntimeError):
    pass


class _Lane:
    def __init__(self, argv: list[str], env: dict[str, str], user: int | None, cwd: str | None,
                 cap: MemoryCap | None = None):
        self.argv, self.env, self.user, self.cwd, self.cap = argv, env, user, cwd, cap
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}
        self.oom_kills = 0  # the cap's count when last looked at

    def spawn(self) -> None:
        self.log = tempfile.TemporaryFile()
        argv, kw = self.argv, {}
        if self.cap is not None:  # joins the cgroup as root, then drops to the uid itself
            argv = self.cap.enter_argv(argv, self.user)
        elif self.user is not None:
            kw = {"user": self.user, "group": self.user, "extra_groups": []}
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     env=self.env, cwd=self.cwd, start_new_session=True, **kw)

    def oom_note(self) -> str:
        """A line for stderr if the kernel killed processes of this lane for memory since last asked."""
        if self.cap is None or (n := self.cap.oom_kills()) == self.oom_kills:
            return ""
        self.oom_kills = n
        return (f"\nMemoryError: killed by the sandbox's memory cap (the request's processes together may "
                f"use {self.cap.mb} MB)\n")

    def wait_ready(self, timeout: float) -> None:
        info = self._read_frame(time.monotonic() + timeout)
        if not info or not info.get("ready"):
            self.kill()
            self.log.seek(0)
            detail = self.log.read().decode(errors="replace").strip()[-2000:]
            raise SandboxStartError(f"sandbox zygote did not start ({' '.join(self.argv[:3])}...): {detail or 'no output'}")
        self.log.close()
        self.info = info

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def request(self, payload: dict, deadline: float) -> dict | None:
        assert self.proc and self.proc.stdin
        data = json.dumps(payload).encode()
        try:
            self.proc.stdin.write(struct.pack(">I", len(data)) + data)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        return self._read_frame(deadline)

    def _read_exact(self, n: int, deadline: float) -> bytes | None:
        assert self.proc and self.proc.stdout
        fd, buf = self.proc.stdout.fileno(), b""
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    def _read_frame(self, deadline: float) -> dict | None:
        head = self._read_exact(4, deadline)
        body = self._read_exact(struct.unpack(">I", head)[0], deadline) if head else None
        return json.loads(body) if body else None

    def kill(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, 9)
        except OSError:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f and f.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass


class ZygotePool:
    """The pre-forked sandbox. Thread-safe; ``arun`` for asyncio callers."""

    def __init__(self, lanes: int = 2, timeout_s: float = 5.0, max_output_bytes: int = 65536, memory_mb: int = 1024,
                 tmp_mb: int = 64, nproc: int = 128, isolation: str = "auto", uid: int | None = 64_321,
                 python: str = "auto", start_timeout_s: float = 60.0):
        if isolation not in ("auto", "bwrap", "process"):
            raise ValueError(f"isolation must be auto, bwrap or process, not {isolation!r}")
        self.timeout_s, self.max_output_bytes, self.memory_mb, self.nproc = timeout_s, max_output_bytes, memory_mb, nproc
        self.max_workers = lanes
        self.python = resolve_python(python)
        is_root = os.geteuid() == 0
        self.uid = uid if is_root and uid is not None else None
        self._workroot: str | None = None
        self._start_timeout = start_timeout_s
        want_bwrap = isolation != "process" and shutil.which("bwrap") is not None
        if isolation == "bwrap" and not want_bwrap:
            raise SandboxStartError("isolation='bwrap' but bubblewrap is not installed (apt-get install bubblewrap)")
        self.stats = {"requests": 0, "restarts": 0, "timeouts": 0}
        self._lanes: list[_Lane] = []
        self._launcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tirl-sandbox-launcher")
        try:
            self._start_lanes(lanes, want_bwrap, tmp_mb)
        except SandboxStartError:
            if isolation != "auto" or not want_bwrap:
                raise
            self._announce("bwrap-failed", "bubblewrap is installed but could not start a sandbox here "
                           "(are user namespaces disabled?); falling back to process isolation")
            self._start_lanes(lanes, False, tmp_mb)
        info = self._lanes[0].info
        self.level = IsolationLevel(bwrap=self._bwrap, dedicated_uid=self.uid, seccomp=bool(info.get("seccomp")),
                                    python=self.python, memory_cap=all(lane.cap is not None for lane in self._lanes))
        if "warm_up_error" in info.get("versions", {}):
            self._announce("warm-up", f"numpy/sympy cannot be imported inside the sandbox ({self.python}): "
                           f"{info['versions']['warm_up_error'][-300:]}")
        if not self.level.full:
            self._announce(self.level.describe(), "the sandbox runs model-written code WITHOUT: " + "; ".join(self.level.missing))
        self._free: queue.Queue[_Lane] = queue.Queue()
        for lane in self._lanes:
            self._free.put(lane)
        self._executor = ThreadPoolExecutor(max_workers=max(lanes, 1), thread_name_prefix="tirl-sandbox")
        self._closed = False

    @staticmethod
    def _announce(key: str, message: str) -> None:
        if key not in _warned:
            _warned.add(key)
            print(f"\n*** tirl SANDBOX WARNING: {message} ***\n", file=sys.stderr, flush=True)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _start_lanes(self, n: int, bwrap: bool, tmp_mb: int) -> None:
        for lane in self._lanes:
            lane.kill()
        self._remove_caps()
        self._bwrap, self._lanes = bwrap, []
        env = {"PATH": "/usr/bin:/bin"}  # bwrap's own environment: nothing of ours (no secrets in /proc/1/environ)
        if bwrap:
            argv, cwd = [*_bwrap_args(self.python, tmp_mb), self.python, "-I", "-c", ZYGOTE_SOURCE, "/tmp/sbx", "", ":".join(SCRATCH_DIRS)], None
        else:
            self._workroot = tempfile.mkdtemp(prefix="tirl-zygote-")
            if self.uid is not None:
                os.chown(self._workroot, self.uid, self.uid)
            env.update({"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "HOME": self._workroot, "MPLBACKEND": "Agg",
                        **_reference_blas()})
            argv, cwd = [self.python, "-I", "-c", ZYGOTE_SOURCE, self._workroot, ""], self._workroot
        lanes = [_Lane(argv, env, self.uid, cwd, MemoryCap.create(self.memory_mb)) for _ in range(n)]
        try:
            self._launch(lanes)
        except SandboxStartError as e:
            if all(lane.cap is None for lane in lanes):
                raise
            # e.g. a cgroup v2 hierarchy that refuses the move: better no cap (said loudly) than no sandbox
            self._announce("memcg-failed", f"the sandbox could not start inside a memory cgroup, so it runs "
                           f"without one: {str(e)[-500:]}")
            self._launch([_Lane(argv, env, self.uid, cwd) for _ in range(n)])

    def _launch(self, lanes: list[_Lane]) -> None:
        self._lanes = lanes
        try:
            self._launcher.submit(self._spawn_and_wait, lanes).result()
        except SandboxStartError:
            for lane in lanes:
                lane.kill()
            self._remove_caps()
            raise

    def _remove_caps(self) -> None:
        for lane in self._lanes:
            if lane.cap is not None:
                lane.cap.remove()

    def _spawn_and_wait(self, lanes: list[_Lane]) -> None:
        """Runs on the launcher thread only. bwrap's --die-with-parent is PR_SET_PDEATHSIG, which
        fires when the *thread* that forked it exits: zygotes must be forked by a thread that
        lives as long as the pool. All lanes are forked first, so they warm up in parallel."""
        for lane in lanes:
            lane.spawn()
        for lane in lanes:
            lane.wait_ready(self._start_timeout)

    @property
    def writable_dirs(self) -> tuple[str, ...]:
        """Where absolute ``files`` / ``fetch`` paths may point: the private, wiped scratch mounts
        under bubblewrap; none without it (the work directory is then a host directory)."""
        return SCRATCH_DIRS if self._bwrap else ()

    # -- the Sandbox interface -------------------------------------------------------------
    def run(self, code: str, timeout: float | None = None, *, stdin: str = "", files: dict[str, bytes] | None = None,
            memory_mb: int | None = None, fetch: list[str] | None = None, max_output: int | None = None) -> ExecResult:
        """``files`` are written to the work directory first; ``fetch`` names files to read back
        after the run (``ExecResult.files``); ``max_output`` overrides the pool's output cap. A path
        is relative to the work directory, or absolute inside one of :attr:`writable_dirs`; others are
        skipped."""
        if self._closed:
            raise RuntimeError("sandbox pool is closed")
        timeout = self.timeout_s if timeout is None else timeout
        payload = {"code": code, "timeout": timeout, "max_output": max_output or self.max_output_bytes,
                   "memory_mb": memory_mb or self.memory_mb, "nproc": self.nproc if self.uid is not None else None,
                   "stdin": stdin, "files": {k: v.decode("latin-1") for k, v in (files or {}).items()},
                   "fetch": list(fetch or [])}
        lane = self._free.get()
        try:
            self.stats["requests"] += 1
            if not lane.alive():
                self._restart(lane)
            if lane.cap is not None:
                lane.cap.set_mb(payload["memory_mb"])
            resp = lane.request(payload, time.monotonic() + timeout + _GRACE_S)
            if resp is None:  # died or hung: replace it; the request fails, the caller goes on
                self._restart(lane)
                return ExecResult("", "", None, timed_out=True, error="the sandbox process died or stopped answering; it was replaced")
            resp["stderr"] += lane.oom_note()
        finally:
            self._free.put(lane)
        if resp["timed_out"]:
            self.stats["timeouts"] += 1
        return ExecResult(stdout=resp["stdout"], stderr=resp["stderr"], returncode=resp["returncode"],
                          timed_out=resp["timed_out"], duration_s=resp["duration"], output_truncated=resp["truncated"],
                          error=resp.get("error"), files={k: v.encode("latin-1") for k, v in (resp.get("files") or {}).items()})

    def _restart(self, lane: _Lane) -> None:
        lane.kill()
        self.stats["restarts"] += 1
        self._launcher.submit(self._spawn_and_wait, [lane]).result()

    def run_many(self, codes: list[str], timeout: float | None = None) -> list[ExecResult]:
        return list(self._executor.map(lambda c: self.run(c, timeout), codes))

    async def arun(self, code: str, timeout: float | None = None) -> ExecResult:
        """Await one execution; at most ``lanes`` run at once, the rest wait their turn."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: self.run(code, timeout))

    def pids(self) -> list[int]:
        return [lane.proc.pid for lane in self._lanes if lane.proc is not None]

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
        for lane in self._lanes:
            lane.kill()
        self._remove_caps()
        self._launcher.shutdown(wait=False)
        if self._workroot:
            shutil.rmtree(self._workroot, ignore_errors=True)

    def __enter__(self) -> "ZygotePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


def decode_files(files: dict[str, str]) -> dict[str, bytes]:
    """SandboxFusion's ``files`` (path -> base64) as bytes."""
    return {k: base64.b64decode(v) for k, v in files.items()}
