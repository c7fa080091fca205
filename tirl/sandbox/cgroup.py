"""A memory cgroup per sandbox lane: what one request's processes use *together* stays capped.

``RLIMIT_AS`` is per process, so code that forks could otherwise take ``nproc × memory_mb`` of
the host (measured: 6 forked children of a 1 GiB request held 4.5 GiB). The pool puts each lane
(bubblewrap, its zygote and every child) in a cgroup of its own under the pool's own cgroup,
with a memory limit of the request's ``memory_mb`` plus the zygote's share; the children raise
their ``oom_score_adj`` so that they, not the zygote, are killed when it fills.

Needs root and a writable cgroup hierarchy: the v1 ``memory`` controller (tested), or v2 with the
memory controller available to the pool's cgroup (written from the kernel's documentation, not
tested: the development machines have v1). Where neither is there, ``MemoryCap.create`` returns
None and the pool says so loudly.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import time
from pathlib import Path

ZYGOTE_SHARE_MB = 256  # the zygote's warm heap, bwrap, the private /tmp and slack
_names = itertools.count()

# Runs as root: join the cgroup, make the zygote the OOM killer's last choice within it, drop to
# the sandbox uid, exec the sandbox (bubblewrap). Arguments: cgroup.procs, uid, argv...
_ENTER = """import os, sys
with open(sys.argv[1], "w") as f:
    f.write(str(os.getpid()))
try:  # needs CAP_SYS_RESOURCE; the children raise theirs to 1000 either way
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("-500")
except OSError:
    pass
uid = int(sys.argv[2])
if uid >= 0:
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
os.execv(sys.argv[3], sys.argv[3:])  # an absolute path: nothing to import once we are not root
"""


def _own_cgroup(controller: str) -> tuple[Path, int] | None:
    """(directory of this process's cgroup for ``controller``, cgroup version), or None."""
    mounts = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fstype, _, opts = post.split()[:3]
            mount_point = pre.split()[4]
            if fstype == "cgroup" and controller in opts.split(","):
                mounts[1] = Path(mount_point)
            elif fstype == "cgroup2" and 2 not in mounts:
                mounts[2] = Path(mount_point)
    with open("/proc/self/cgroup") as f:
        entries = [line.rstrip("\n").split(":", 2) for line in f]
    for _, controllers, path in entries:
        if 1 in mounts and controller in controllers.split(","):
            return mounts[1] / path.lstrip("/"), 1
    for hierarchy, _, path in entries:
        if hierarchy == "0" and 2 in mounts:
            return mounts[2] / path.lstrip("/"), 2
    return None


def _sweep(parent: Path) -> None:
    """Remove the (empty) cgroups of pools whose process is gone (killed before closing)."""
    for d in parent.glob("tirl-sandbox-*-*"):
        pid = d.name.split("-")[2]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            try:
                d.rmdir()
            except OSError:
                pass


class MemoryCap:
    """One lane's memory cgroup."""

    def __init__(self, path: Path, version: int):
        self.path, self.version, self.mb = path, version, 0

    @classmethod
    def create(cls, memory_mb: int) -> "MemoryCap | None":
        if os.geteuid() != 0:
            return None
        try:
            found = _own_cgroup("memory")
            if found is None:
                return None
            parent, version = found
            if version == 2:
                if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
                    (parent / "cgroup.subtree_control").write_text("+memory")  # fails where parent has processes
            _sweep(parent)
            path = parent / f"tirl-sandbox-{os.getpid()}-{next(_names)}"
            path.mkdir()
            cap = cls(path, version)
            cap.set_mb(memory_mb)
            return cap
        except OSError:
            return None

    def set_mb(self, memory_mb: int) -> None:
        """Cap the lane at ``memory_mb`` for requests plus the zygote's share (no-op if unchanged)."""
        if memory_mb == self.mb:
            return
        limit = str((memory_mb + ZYGOTE_SHARE_MB) << 20)
        try:
            (self.path / ("memory.limit_in_bytes" if self.version == 1 else "memory.max")).write_text(limit)
        except OSError:  # below current usage (v1 refuses): keep the old cap
            if self.mb == 0:
                raise
            return
        self.mb = memory_mb
        if self.version == 2:  # no way around the cap through swap (absent without swap accounting)
            try:
                (self.path / "memory.swap.max").write_text("0")
            except OSError:
                pass

    def enter_argv(self, argv: list[str], uid: int | None) -> list[str]:
        """``argv`` started inside this cgroup (and as ``uid``): run it with ``user=None``."""
        exe = shutil.which(argv[0], path="/usr/bin:/bin") or argv[0]
        return [sys.executable, "-I", "-S", "-c", _ENTER, str(self.path / "cgroup.procs"),
                str(-1 if uid is None else uid), exe, *argv[1:]]

    def oom_kills(self) -> int:
        """How many processes the kernel killed in this cgroup for lack of memory so far."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def remove(self) -> None:
        for _ in range(50):  # its processes may take a moment to be gone
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.02)
