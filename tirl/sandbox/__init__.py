"""Run model-written code: the ``Sandbox`` interface and its implementations.

The rollout only sees :class:`Sandbox` (``run(code, timeout) -> ExecResult`` and ``run_many``).
"""

from tirl.sandbox.base import Sandbox
from tirl.sandbox.subprocess import SubprocessSandbox

__all__ = ["Sandbox", "SubprocessSandbox"]
