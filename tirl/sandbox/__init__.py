"""Run model-written code: the ``Sandbox`` interface and its implementations.

The rollout only sees :class:`Sandbox` (``run(code, timeout) -> ExecResult`` and ``run_many``).

* :class:`ZygotePool` (default): pre-forked, isolated (bubblewrap, dedicated uid, seccomp, rlimits);
* :class:`SubprocessSandbox`: a fresh process per call, not isolated (tests, odd platforms);
* :class:`SandboxFusionSandbox`: any SandboxFusion-compatible server (``tirl sandbox serve`` is one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tirl.sandbox.base import Sandbox
from tirl.sandbox.fusion import SandboxFusionSandbox
from tirl.sandbox.pool import IsolationLevel, ZygotePool
from tirl.sandbox.subprocess import SubprocessSandbox

if TYPE_CHECKING:
    from tirl.config import SandboxConfig

__all__ = ["IsolationLevel", "Sandbox", "SandboxFusionSandbox", "SubprocessSandbox", "ZygotePool", "make_sandbox"]


def make_sandbox(cfg: "SandboxConfig") -> Sandbox:
    if cfg.backend == "pool":
        return ZygotePool(lanes=cfg.lanes, timeout_s=cfg.timeout_s, max_output_bytes=cfg.max_output_bytes,
                          memory_mb=cfg.memory_mb, tmp_mb=cfg.tmp_mb, nproc=cfg.nproc, isolation=cfg.isolation,
                          uid=cfg.uid, python=cfg.python)
    if cfg.backend == "subprocess":
        return SubprocessSandbox(cfg.timeout_s, cfg.max_output_bytes, cfg.memory_mb, cfg.max_workers)
    assert cfg.url, "validated by Config"
    return SandboxFusionSandbox(cfg.url, cfg.timeout_s, cfg.memory_mb, cfg.max_workers)


def describe(sandbox: Sandbox) -> str:
    """The protections in use, for logs."""
    level = getattr(sandbox, "level", None)
    if level is not None:
        return level.describe()
    if isinstance(sandbox, SandboxFusionSandbox):
        n = len(sandbox.servers)
        return f"remote SandboxFusion-compatible server{'s' if n > 1 else ''} {sandbox.url}"
    return "subprocess: rlimits + timeout only, NOT isolated from host files or network"
