"""SandboxFusion's ``/run_code`` API as pydantic models, field for field (names, types, defaults,
status values), so that ``tirl sandbox serve`` validates and answers requests as SandboxFusion does:
a request that does not match gets HTTP 422 naming the field (FastAPI's validation error).

From SandboxFusion's ``sandbox/server/sandbox_api.py`` and ``sandbox/runners/types.py``:
``run_timeout`` and ``compile_timeout`` default to 10 s, ``memory_limit_MB`` to -1 (no limit),
``files`` maps a path to base64 content (a null value is skipped), ``fetch_files`` lists paths whose
content comes back base64-encoded in the response's ``files``.
"""

from __future__ import annotations

from enum import Enum
from typing import Literal, Optional

from pydantic import BaseModel, Field

Language = Literal["python", "cpp", "nodejs", "go", "go_test", "java", "php", "csharp", "bash", "typescript", "sql",
                   "rust", "cuda", "lua", "R", "perl", "D_ut", "ruby", "scala", "julia", "pytest", "junit",
                   "kotlin_script", "jest", "verilog", "python_gpu", "lean", "swift", "racket"]
"""Every language SandboxFusion's API accepts (another name is a 422). This server runs
``python`` and ``pytest``; the others get ``SandboxError``, as a SandboxFusion without that runtime."""
RUNS = ("python", "pytest")


class RunCodeRequest(BaseModel):
    compile_timeout: float = Field(10, description="compile timeout for compiled languages (unused by python)")
    run_timeout: float = Field(10, description="code run timeout, s")
    memory_limit_MB: int = Field(-1, description="maximum memory in MB; -1: no per-request limit (the server's cap)")
    code: str = Field(..., description="the code to run")
    stdin: Optional[str] = Field(None, description="optional string passed to stdin")
    language: Language = Field(..., description="the language or execution mode")
    files: dict[str, Optional[str]] = Field({}, description="path (relative to the work dir) -> base64 content")
    fetch_files: list[str] = Field([], description="paths whose content to return after the run")


class RunStatus(str, Enum):
    Success = "Success"  # every command finished with return code 0
    Failed = "Failed"  # a non-zero return code or a time-out
    SandboxError = "SandboxError"  # the sandbox itself failed


class CommandRunStatus(str, Enum):
    Finished = "Finished"
    Error = "Error"
    TimeLimitExceeded = "TimeLimitExceeded"


class CommandRunResult(BaseModel):
    status: CommandRunStatus
    execution_time: Optional[float] = None
    return_code: Optional[int] = None
    stdout: Optional[str] = None
    stderr: Optional[str] = None


class RunCodeResponse(BaseModel):
    status: RunStatus
    message: str
    compile_result: Optional[CommandRunResult] = None
    run_result: Optional[CommandRunResult] = None
    executor_pod_name: Optional[str] = None
    files: dict[str, str] = {}
