"""The simple sandbox: one fresh Python process per call.

What it protects against: runaway CPU (wall-clock kill of the whole process group + RLIMIT_CPU),
memory bombs (RLIMIT_AS), huge files (RLIMIT_FSIZE), output floods (output capped while reading),
leftover children (the process group is killed after every call), environment leaks (a minimal
environment), stray files (a fresh temporary working directory, removed afterwards).

What it does NOT protect against: reading host files, the network, or a process that leaves its
process group. It runs as the current user. This is the walking-skeleton sandbox; the hardened,
pre-forked one (bubblewrap, seccomp, non-root uid) replaces it.
"""

from __future__ import annotations

import os
import resource
import selectors
import signal
import subprocess
import sys
import tempfile
import time

from tirl.sandbox.base import ThreadedRunMany
from tirl.types import ExecResult


def _limits(memory_mb: int, cpu_s: int, fsize_mb: int = 64) -> None:
    mem = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_mb << 20, fsize_mb << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


class SubprocessSandbox(ThreadedRunMany):
    def __init__(
        self,
        timeout_s: float = 5.0,
        max_output_bytes: int = 65536,
        memory_mb: int = 1024,
        max_workers: int = 4,
        python: str | None = None,
    ):
        self.timeout_s, self.max_output_bytes = timeout_s, max_output_bytes
        self.memory_mb, self.max_workers = memory_mb, max_workers
        self.python = python or sys.executable
        self.env = {"PATH": "/usr/bin:/bin", "PYTHONIOENCODING": "utf-8", "OPENBLAS_NUM_THREADS": "1",
                    "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "HOME": "/tmp"}

    def run(self, code: str, timeout: float | None = None) -> ExecResult:
        timeout = self.timeout_s if timeout is None else timeout
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="tirl-sbx-") as workdir:
            try:
                proc = subprocess.Popen(
                    [self.python, "-I", "-c", code],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    cwd=workdir, env=self.env, start_new_session=True,
                    preexec_fn=lambda: _limits(self.memory_mb, int(timeout) + 1),
                )
            except (OSError, ValueError) as e:
                return ExecResult("", "", None, error=f"could not start the sandbox process: {e}")
            try:
                out, err, truncated, timed_out = self._collect(proc, start + timeout)
            finally:
                self._kill_group(proc)
        return ExecResult(
            stdout=out.decode("utf-8", "replace"), stderr=err.decode("utf-8", "replace"),
            returncode=None if timed_out else proc.returncode, timed_out=timed_out,
            duration_s=time.monotonic() - start, output_truncated=truncated,
        )

    def _collect(self, proc: subprocess.Popen, deadline: float) -> tuple[bytes, bytes, bool, bool]:
        """Read both pipes until the child exits, the deadline passes or the cap is hit."""
        bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
        sel = selectors.DefaultSelector()
        for f in bufs:
            sel.register(f, selectors.EVENT_READ)
        truncated = timed_out = False
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(timeout=min(left, 0.05)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = bufs[key.fileobj]
                room = self.max_output_bytes - len(buf)
                buf += chunk[: max(room, 0)]
                if len(chunk) > room:
                    truncated = True
            if truncated:
                break
            if proc.poll() is not None and not sel.select(timeout=0):
                break  # exited and nothing left to read (a daemonised grandchild may hold the pipe)
        sel.close()
        if not (timed_out or truncated):  # truncated: the caller kills it now, no need to wait
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                timed_out = True
        return bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr]), truncated, timed_out

    @staticmethod
    def _kill_group(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for f in (proc.stdout, proc.stderr):
            if f:
                f.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL'd processes exit
            pass
