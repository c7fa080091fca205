"""The zygote: a warm interpreter that forks one child per request. Runs INSIDE the sandbox.

Standalone on purpose (stdlib + numpy/sympy only, no tirl imports): the pool starts it as
``python3 -I -c <this file's source> WORKROOT PROTECTED_PIDS [SCRATCH:...]`` inside bubblewrap, as a
dedicated uid, where the tirl package is not visible (SCRATCH:...: bubblewrap's private /tmp and /mnt, wiped
after every request).

Protocol on stdin/stdout: frames of a 4-byte big-endian length + UTF-8 JSON. The zygote first
writes ``{"ready": true, ...}``; then, for every request
``{"code", "timeout", "max_output", "memory_mb", "nproc", "stdin", "files"}`` it writes one
response ``{"stdout", "stderr", "returncode", "timed_out", "truncated", "duration", "error"}``.

Per request: fork (libc's, without Python's at-fork hooks: see ``raw_fork``); the child reseeds
its random generators when the code uses one, makes itself a process-group leader, points fd
0/1/2 at a stdin file (or /dev/null) and two pipes, closes every other fd, sets rlimits, loads
the seccomp filter and execs the code. The zygote reads both pipes with a cap, stops at the child's exit (seen through a pidfd,
not pipe EOF: a daemonised grandchild may hold the pipes) or at the deadline, then SIGKILLs
every remaining descendant (it is a child subreaper, so orphans are re-parented to it), reaps
them, and empties the work directory (and the private /tmp: nothing outlives a request).
"""

import ctypes
import ctypes.util
import io
import itertools
import json
import os
import resource
import select
import shutil
import signal
import struct
import sys
import time
import traceback

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 4, 36
BLOCKED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "unshare", "setns", "bpf", "keyctl",
    "add_key", "request_key", "io_uring_setup", "io_uring_enter", "io_uring_register", "perf_event_open",
    "pivot_root", "chroot", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "reboot", "swapon", "swapoff", "userfaultfd", "pidfd_open", "pidfd_send_signal", "pidfd_getfd", "kcmp",
    "process_madvise", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "fanotify_init", "open_by_handle_at",
    "name_to_handle_at", "move_mount", "open_tree", "fsopen", "fsmount", "fsconfig", "fspick", "mount_setattr",
    "quotactl", "acct", "settimeofday", "clock_settime", "adjtimex", "syslog", "vhangup", "iopl", "ioperm",
    # state that outlives the process (SysV IPC, POSIX message queues: the next request would see
    # it) or memory that no rlimit counts (SysV shm, memfd): blocked
    "shmget", "shmat", "shmdt", "shmctl", "semget", "semop", "semtimedop", "semctl", "msgget", "msgsnd",
    "msgrcv", "msgctl", "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify",
    "mq_getsetattr", "memfd_create", "memfd_secret",
)
CLONE_NS_FLAGS = (0x10000000, 0x00020000, 0x40000000, 0x20000000, 0x08000000, 0x04000000, 0x02000000)
# NEWUSER, NEWNS, NEWNET, NEWPID, NEWIPC, NEWUTS, NEWCGROUP
AF_UNIX = 1


class _Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]


def build_seccomp(protected_pids):
    """A libseccomp filter (allow by default, EPERM for the dangerous calls). None if unavailable."""
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_Cmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    ne, masked_eq, mask32 = 1, 7, 0xFFFFFFFF
    ctx = lib.seccomp_init(allow)
    if not ctx:
        return None

    def rule(syscall, *cmps, action=eperm):
        nr = lib.seccomp_syscall_resolve_name(syscall.encode())
        if nr < 0:
            return
        arr = (_Cmp * len(cmps))(*cmps) if cmps else None
        if lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr) != 0:
            raise OSError(f"seccomp rule for {syscall} failed")

    for s in BLOCKED_SYSCALLS:
        rule(s)
    rule("clone3", action=enosys)  # glibc falls back to clone(), whose flags we can inspect
    for flag in CLONE_NS_FLAGS:
        rule("clone", _Cmp(0, masked_eq, flag, flag))
    rule("socket", _Cmp(0, ne, AF_UNIX, 0))  # no sockets but AF_UNIX
    for pid in set(protected_pids) | {1}:
        for target in (pid, -pid):
            rule("kill", _Cmp(0, masked_eq, mask32, target & mask32))
        rule("tkill", _Cmp(0, masked_eq, mask32, pid & mask32))
        rule("tgkill", _Cmp(0, masked_eq, mask32, pid & mask32))
    rule("kill", _Cmp(0, masked_eq, mask32, mask32))  # kill(-1, ...): everyone
    return _export_bpf(lib, ctx)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _export_bpf(lib, ctx):
    """Compile the filter to a BPF program once; children install it with one prctl (~50 us)
    instead of letting libseccomp regenerate it on every fork (~2 ms)."""
    r, w = os.pipe()
    rc = lib.seccomp_export_bpf(ctypes.c_void_p(ctx), w)
    os.close(w)
    prog = b""
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        prog += chunk
    os.close(r)
    if rc != 0 or not prog or len(prog) % 8:
        return None
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _SockFprog(len(prog) // 8, ctypes.addressof(buf))
    return fprog, buf, ctypes.cast(ctypes.pointer(fprog), ctypes.c_void_p)  # keep buf and fprog alive


_LIBC = ctypes.CDLL(None, use_errno=True)  # bound once in the zygote, not in every child
_prctl = _LIBC.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
_libc_fork = _LIBC.fork
_libc_fork.restype = ctypes.c_int


def raw_fork():
    """fork() without Python's at-fork hooks. The zygote is single-threaded, so the hooks have
    nothing to repair (no lock held by another thread), yet in the warm interpreter they copy ~250
    pages (~0.9 ms here: threading's and logging's re-initialisation, the random reseed). The child
    calls ``reseed`` instead: what it must redo is give every request fresh random streams.
    Should the warm-up ever leave a Python thread running, os.fork (and its hooks) is used."""
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        return os.fork()
    pid = _libc_fork()
    if pid < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return pid


def reseed(code):
    """Fresh random state in the child, as a fresh interpreter would have: Python's ``random``
    (os.fork's hook did this), sympy's own generator and numpy's global one (which os.fork never
    reseeded: every request saw the same ``np.random`` stream). Reseeding numpy copies ~250 pages
    (~1 ms), so it is done only for code that names a random generator: every public way to one
    (``random``, ``np.random``, ``rand*``, sympy's ``randprime``/``randMatrix``) contains "rand"."""
    if "rand" not in code:
        return
    for name, attr in (("random", "_inst"), ("sympy.core.random", "rng")):
        gen = getattr(sys.modules.get(name), attr, None)
        if gen is not None:
            gen.seed()
    nprandom = sys.modules.get("numpy.random")
    if nprandom is not None:
        nprandom.seed()


def install_seccomp(seccomp):
    PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
    prog_ptr = seccomp[2]
    if _prctl(PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0:
        return False
    return _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, prog_ptr, 0, 0) == 0


PROTO_IN, PROTO_OUT = 0, 1  # replaced in main() by private copies
SCRATCHES = ()  # bubblewrap's private writable mounts (/tmp, /mnt), wiped after every request; () outside bwrap
STATUS_FD = 3  # in the child: where it reports its exit status just before exiting


def _child_stdio():
    """The child's sys.stdin/stdout/stderr over fds 0/1/2, made once in the zygote (which never
    uses them), so that no child pays for building text streams (~40 copied pages each time)."""
    def wrap(fd, mode, **kw):
        return io.TextIOWrapper(io.FileIO(fd, mode, closefd=False), encoding="utf-8", **kw)
    return wrap(0, "r"), wrap(1, "w", errors="backslashreplace"), wrap(2, "w", errors="backslashreplace")


CHILD_STDIO = ()  # made in main()


def _read_exact(n):
    buf = b""
    while len(buf) < n:
        chunk = os.read(PROTO_IN, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def read_frame():
    head = _read_exact(4)
    if head is None:
        return None
    body = _read_exact(struct.unpack(">I", head)[0])
    return None if body is None else json.loads(body)


def write_frame(obj):
    data = json.dumps(obj).encode()
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(PROTO_OUT, data):]


def _descendants(root):
    """Pids whose parent chain reaches ``root`` (read from /proc)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
                parent[int(entry)] = int(stat[stat.rindex(b")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier and p not in out}
        out |= frontier
    return out


def kill_descendants():
    """SIGKILL and reap everything the request left behind. Fast path: we are a child subreaper,
    so once the direct child is reaped, any survivor (or its ancestor) is our child; if we have
    no children at all, nothing is left and /proc need not be scanned."""
    try:
        os.waitpid(-1, os.WNOHANG)  # reaps one exited child if any; raises if we have no children
    except ChildProcessError:
        return
    me = os.getpid()
    give_up = time.monotonic() + 2.0  # a process with a large heap can take a while to die on a loaded machine
    while time.monotonic() < give_up:
        pids = _descendants(me)
        if not pids:
            break
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.001)
        _reap_all()
    _reap_all()


def _reap_all():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def child(req, out_w, err_w, status_w, stdin_path, workdir, seccomp):
    reseed(req["code"])
    os.setsid()
    fd_in = os.open(stdin_path, os.O_RDONLY)
    os.dup2(fd_in, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.dup2(status_w, STATUS_FD)
    os.closerange(STATUS_FD + 1, 65536)
    mem = int(req["memory_mb"]) * 1024 * 1024
    cpu = int(req["timeout"]) + 1
    limits = [(resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, 16 << 20),
              (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0), (resource.RLIMIT_MSGQUEUE, 0)]
    if req.get("nproc"):
        limits.append((resource.RLIMIT_NPROC, int(req["nproc"])))
    for what, value in limits:
        resource.setrlimit(what, (value, value))
    try:  # if the lane's memory cgroup fills up, the request's processes are killed before the zygote
        _prctl(PR_SET_DUMPABLE, 1, None, 0, 0)  # (a non-dumpable process cannot open its own /proc files)
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
        try:
            os.write(fd, b"1000")
        finally:
            os.close(fd)
    except OSError:
        pass
    finally:
        _prctl(PR_SET_DUMPABLE, 0, None, 0, 0)
    os.chdir(workdir)
    if seccomp is not None and not install_seccomp(seccomp):
        os.write(2, b"SandboxError: could not install the seccomp filter\n")
        os._exit(70)
    sys.stdin, sys.stdout, sys.stderr = CHILD_STDIO
    status = 0
    try:
        exec(compile(req["code"], "<code>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException as e:  # noqa: BLE001 - report everything, as the interpreter would
        tb = e.__traceback__.tb_next if e.__traceback__ is not None else None  # drop this frame
        sys.stderr.write("".join(traceback.format_exception(type(e), e, tb)))
        status = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - stdout may be closed by the code
        pass
    try:  # tell the zygote we are done: it answers now and reaps us afterwards (exit costs ~4 ms)
        os.write(STATUS_FD, struct.pack(">i", status & 0xFF))
    except OSError:
        pass
    os._exit(status & 0xFF)


def _prepare(req, workroot):
    """The work directory, the stdin file (/dev/null without input) and any request files."""
    workdir = os.path.join(workroot, "work")
    try:
        os.mkdir(workdir)  # emptied away after every request; the work root too if the code moved it
    except FileNotFoundError:
        os.makedirs(workdir)
    except FileExistsError:
        pass
    stdin_path, data = os.devnull, (req.get("stdin") or "").encode("utf-8")
    if data:
        stdin_path = os.path.join(workroot, "stdin")
        fd = os.open(stdin_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
    for rel, content in (req.get("files") or {}).items():
        path = _place(workdir, rel)
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(content.encode("latin-1"))
    return workdir, stdin_path


class _Run:
    """One request: fork the child, read its output until it reports, exits, times out or floods,
    answer, then (``finish``) make sure it and everything it started are gone."""

    def __init__(self, req, workroot, seccomp):
        self.req, self.workroot, self.max_out = req, workroot, int(req["max_output"])
        workdir, stdin_path = _prepare(req, workroot)
        self.out_r, out_w = os.pipe()
        self.err_r, err_w = os.pipe()
        self.st_r, st_w = os.pipe()
        self.t0 = time.monotonic()
        self.deadline = self.t0 + float(req["timeout"])
        self.pid = raw_fork()
        if self.pid == 0:
            try:
                child(req, out_w, err_w, st_w, stdin_path, workdir, seccomp)
            finally:
                os._exit(71)
        for fd in (out_w, err_w, st_w):
            os.close(fd)
        self.pidfd = os.pidfd_open(self.pid)
        self.bufs = {self.out_r: bytearray(), self.err_r: bytearray()}
        self.open_fds = {self.out_r, self.err_r}
        self.poller = select.poll()
        for fd in (self.out_r, self.err_r, self.pidfd, self.st_r):
            self.poller.register(fd, select.POLLIN)
        self.timed_out = self.truncated = False
        self.reported = None  # the exit status the child sent just before exiting

    def read_some(self, fd):
        """Read once; False when nothing more is to be read now (EOF, empty, or the cap hit)."""
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return False
        if not chunk:
            self.poller.unregister(fd)
            self.open_fds.discard(fd)
            return False
        room = self.max_out - len(self.bufs[self.out_r]) - len(self.bufs[self.err_r])
        self.bufs[fd] += chunk[:max(room, 0)]
        self.truncated = self.truncated or len(chunk) > room
        return not self.truncated

    def collect(self):
        done = False
        while not (done or self.truncated):
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.timed_out = True
                break
            for fd, _ in self.poller.poll(max(1, int(left * 1000))):
                if fd == self.st_r:
                    data = os.read(self.st_r, 4)
                    self.reported = struct.unpack(">i", data)[0] if len(data) == 4 else None
                    self.poller.unregister(self.st_r)
                    done = True
                elif fd == self.pidfd:
                    done = True
                elif fd in self.open_fds:
                    self.read_some(fd)
        for fd in list(self.open_fds):  # the child flushed before reporting: take what is buffered now
            os.set_blocking(fd, False)
            while fd in self.open_fds and self.read_some(fd):
                pass

    def response(self):
        returncode = self.reported
        if self.reported is None and not (self.timed_out or self.truncated):  # exited without reporting
            _, status = os.waitpid(self.pid, 0)
            returncode, self.pid = os.waitstatus_to_exitcode(status), None
        return {
            "stdout": self.bufs[self.out_r].decode("utf-8", "replace"),
            "stderr": self.bufs[self.err_r].decode("utf-8", "replace"),
            "returncode": None if self.timed_out else returncode, "timed_out": self.timed_out,
            "truncated": self.truncated, "duration": time.monotonic() - self.t0, "error": None,
            "files": _fetch(os.path.join(self.workroot, "work"), self.req.get("fetch") or [], self.max_out),
        }

    def finish(self):
        """After the answer is sent: the child, its process group and every descendant are killed
        and reaped, and the work directory emptied, before the zygote takes its next request."""
        if self.pid is not None:
            forced = self.timed_out or self.truncated or self.reported is None
            if forced or not select.select([self.pidfd], [], [], max(self.deadline - time.monotonic(), 0) + 0.05)[0]:
                _quietly(lambda: os.kill(self.pid, signal.SIGKILL))  # no more waiting for it
            _quietly(lambda: os.killpg(self.pid, signal.SIGKILL))
            os.waitpid(self.pid, 0)
        kill_descendants()  # grandchildren, daemons, orphans re-parented to us
        for fd in (self.out_r, self.err_r, self.st_r, self.pidfd):
            _quietly(lambda fd=fd: os.close(fd))
        _clean(self.workroot)


def _quietly(action):
    """Run ``action``, ignoring OSError (the process or fd may already be gone)."""
    try:
        action()
    except OSError:
        pass


def _place(workdir, name):
    """Where a request's file ``name`` lives: relative to the work directory and inside it, or
    absolute inside a private scratch mount (as SandboxFusion, whose files may be absolute); else None."""
    path = os.path.normpath(os.path.join(workdir, str(name)))
    inside = [workdir] + [d for d in SCRATCHES if os.path.isabs(str(name))]
    return path if any(path.startswith(d.rstrip(os.sep) + os.sep) for d in inside) else None


def _fetch(workdir, names, limit):
    """``{name: latin-1 text of its bytes}`` for the regular files among ``names`` (see :func:`_place`;
    at most ``limit`` bytes each and in all); others are left out."""
    out, left = {}, limit
    for name in names:
        path = _place(workdir, name)
        if not path or os.path.islink(path) or not os.path.isfile(path):
            continue
        try:
            with open(path, "rb") as f:
                data = f.read(left + 1)
        except OSError:
            continue
        if len(data) > left:
            break
        out[name], left = data.decode("latin-1"), left - len(data)
    return out


def serve_one(req, workroot, seccomp):
    """Run one request; returns (response, finish) — call ``finish`` after sending the response."""
    run = _Run(req, workroot, seccomp)
    run.collect()
    return run.response(), run.finish


def _clean(workroot):
    """Empty the work root and, where the sandbox has private scratch mounts (:data:`SCRATCHES`:
    its /tmp, /mnt), everything else in them: nothing a request writes survives into the next one."""
    for top in SCRATCHES:
        _quietly(lambda t=top: os.chmod(t, 0o700))  # the code runs as our uid: it may change any mode
        for name in os.listdir(top):
            path = os.path.join(top, name)
            if path != workroot or os.path.islink(path) or not os.path.isdir(path):
                _remove(path, top)
    if os.path.isdir(workroot):
        _quietly(lambda: os.chmod(workroot, 0o700))
        for name in os.listdir(workroot):
            _remove(os.path.join(workroot, name), workroot)
    if SCRATCHES and os.path.isdir(SHM):  # bubblewrap's private /dev/shm (semaphores of multiprocessing)
        for name in os.listdir(SHM):
            _remove(os.path.join(SHM, name), SHM)


SHM = "/dev/shm"


_removed = itertools.count()


def _remove(path, top):
    """Remove a file or a tree whatever the code did to it: modes that forbid listing or writing,
    nesting deeper than any path can name. Subdirectories are first moved up to ``top``, so no
    path grows long and no recursion or fd count grows with depth."""
    todo = [path]
    while todo:
        p = todo.pop()
        try:
            if os.path.islink(p) or not os.path.isdir(p):
                os.unlink(p)
                continue
            os.chmod(p, 0o700)
            with os.scandir(p) as it:
                entries = [(e.path, e.is_dir(follow_symlinks=False)) for e in it]
            for q, is_dir in entries:
                if is_dir:
                    flat = os.path.join(top, f".tirl-rm-{next(_removed)}")
                    os.chmod(q, 0o700)  # moving a directory to a new parent rewrites its ".."
                    os.rename(q, flat)
                    todo.append(flat)
                else:
                    os.unlink(q)
            os.rmdir(p)
        except OSError:
            pass


def warm_up():
    """Import what math code imports and run each sympy subsystem once: sympy loads many modules
    lazily on first use (solvers, integrals, series, matrices...), which every child would pay."""
    import cmath, collections, decimal, fractions, functools, itertools, math, random, re, statistics  # noqa: F401,E401
    import numpy
    import sympy

    x, y = sympy.symbols("x y")
    sympy.solve(x**2 - 5 * x + 6, x)
    sympy.solve(x**3 - 6 * x**2 + 11 * x - 6, x)
    sympy.solve([x + y - 3, x - y - 1], [x, y])
    sympy.solveset(sympy.sin(x) - sympy.Rational(1, 2), x, sympy.Interval(0, 2 * sympy.pi))
    sympy.simplify(sympy.sin(x) ** 2 + sympy.cos(x) ** 2)
    sympy.simplify((x**2 - 1) / (x - 1))
    sympy.factor(x**6 - 1), sympy.expand((x + 1) ** 5), sympy.apart(1 / (x**2 - 1))
    sympy.nsimplify(sympy.sqrt(8)), sympy.Rational(3, 4) + sympy.sqrt(8), sympy.N(sympy.pi, 30)
    sympy.integrate(x**2 * sympy.exp(x), x), sympy.integrate(sympy.sin(x), (x, 0, sympy.pi))
    sympy.diff(sympy.sin(x) * x**3, x), sympy.limit(sympy.sin(x) / x, x, 0), sympy.series(sympy.exp(x), x, 0, 5)
    sympy.summation(1 / x**2, (x, 1, sympy.oo)), sympy.Sum(x, (x, 1, 10)).doit()
    sympy.Matrix([[1, 2], [3, 4]]).det(), sympy.Matrix([[1, 2], [3, 4]]).inv()
    sympy.factorint(2**32 + 1), sympy.isprime(10**9 + 7), sympy.primerange(1, 100), sympy.binomial(10, 3)
    sympy.Poly(x**3 - 1, x).all_roots(), sympy.gcd(x**2 - 1, x - 1), sympy.Eq(x, 1)
    sympy.latex(sympy.sqrt(2) / 2), str(sympy.Rational(1, 3))
    a = numpy.arange(10.0)
    numpy.linalg.solve(numpy.eye(3), numpy.ones(3)), numpy.linalg.det(numpy.eye(2)), a.sum(), a.mean(), a.std()
    numpy.polyfit(a, a**2, 2), numpy.roots([1, -3, 2])
    return {"numpy": numpy.__version__, "sympy": sympy.__version__}


def huge_pages():
    """Back the warm heap with transparent huge pages (MADV_COLLAPSE, Linux >= 6.1): a fork then
    copies one page-table entry per 2 MiB instead of 512, and a child's exit tears down as few.
    Returns the MiB collapsed (0 where the kernel or its settings do not allow it)."""
    madvise = _LIBC.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    huge, done = 2 << 20, 0
    with open("/proc/self/maps") as f:
        maps = f.read().splitlines()
    for line in maps:
        parts = line.split()
        if len(parts) < 5 or parts[1] != "rw-p" or (len(parts) > 5 and parts[5] != "[heap]"):
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        a, b = (lo + huge - 1) & ~(huge - 1), hi & ~(huge - 1)
        if b - a < huge:
            continue
        madvise(a, b - a, 14)  # MADV_HUGEPAGE
        if madvise(a, b - a, 25) == 0:  # MADV_COLLAPSE
            done += b - a
        else:  # no collapse here (old kernel, THP off): leave the range as it was
            madvise(a, b - a, 15)  # MADV_NOHUGEPAGE
    return done >> 20


def main():
    global PROTO_IN, PROTO_OUT
    # The protocol moves to private fds; fd 0/1 then point at /dev/null and stderr, so a stray
    # print (ours or a library's) can never corrupt a frame. Children close every fd >= 3.
    PROTO_IN, PROTO_OUT = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(2, 1)
    global CHILD_STDIO
    CHILD_STDIO = _child_stdio()
    workroot = sys.argv[1]
    protected = [int(p) for p in sys.argv[2].split(",") if p] if len(sys.argv) > 2 else []
    global SCRATCHES
    SCRATCHES = tuple(d for d in (sys.argv[3] if len(sys.argv) > 3 else "").split(":") if d)
    os.makedirs(workroot, exist_ok=True)
    os.chdir(workroot)
    _prctl(PR_SET_DUMPABLE, 0, None, 0, 0)
    _prctl(PR_SET_CHILD_SUBREAPER, 1, None, 0, 0)
    try:
        versions = warm_up()
    except Exception as e:  # noqa: BLE001 - run without them, say so
        versions = {"warm_up_error": repr(e)}
    seccomp = build_seccomp([os.getpid(), os.getppid(), *protected])
    import gc

    gc.collect()
    gc.freeze()  # children's GC then never touches (and copies) the inherited warm heap
    _LIBC.malloc_trim(0)  # return freed warm-up memory: fewer pages to map on every fork
    try:
        huge_mb = huge_pages()  # measured: +15-30% executions/s on the bench's mix
    except OSError:
        huge_mb = 0
    write_frame({"ready": True, "pid": os.getpid(), "seccomp": seccomp is not None, "versions": versions,
                 "python": sys.version.split()[0], "huge_mb": huge_mb})
    while True:
        req = read_frame()
        if req is None:
            return
        finish = kill_descendants
        try:
            resp, finish = serve_one(req, workroot, seccomp)
        except Exception as e:  # noqa: BLE001 - the zygote must survive its own bugs too
            resp = {"stdout": "", "stderr": "", "returncode": None, "timed_out": False, "truncated": False,
                    "duration": 0.0, "error": f"zygote: {e!r}"}
        write_frame(resp)
        finish()  # reaping and cleanup overlap with the caller reading the response


if __name__ == "__main__":
    main()
