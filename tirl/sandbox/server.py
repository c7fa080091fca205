"""``tirl sandbox serve``: SandboxFusion's HTTP API (``POST /run_code``, ``GET /v1/ping``) on
FastAPI + uvicorn, backed by a :class:`~tirl.sandbox.pool.ZygotePool`, so that verl's
``sandbox_fusion_url``, SandboxFusion's own client SDK and any other SandboxFusion client can use it.

What a client sees, and where it differs from SandboxFusion:

* Requests are validated by SandboxFusion's own models (:mod:`tirl.sandbox.fusion_api`): a bad
  field is HTTP 422 naming it; defaults are SandboxFusion's (``run_timeout`` 10 s,
  ``memory_limit_MB`` -1 = no per-request limit, i.e. this server's cap).
* ``python`` and ``pytest`` run; every other language SandboxFusion knows gets ``SandboxError``.
* Limits are never cut silently: ``run_timeout`` or ``memory_limit_MB`` above this server's maximum
  is a 422 that names the maximum (``--max-timeout``, ``--max-memory-mb``).
* Output: each stream up to 1 MiB, as SandboxFusion reads. A program that passes it is stopped and
  answered ``Failed`` with a non-zero ``return_code`` (-9 when it was killed) and the cut in
  ``stderr``, so no client takes a cut output for a successful run.
* ``files`` (path -> base64, null skipped) are written into the request's private work directory,
  or, for an absolute path, into the sandbox's private /tmp or /mnt (SandboxFusion takes absolute
  paths too); a path anywhere else is a 422 naming the places allowed. ``fetch_files`` come back
  base64 in ``files``, under the names asked for.
* Admission: at most ``lanes`` requests run; at most ``max_queue`` wait, each for at most
  ``max_wait_s``. A request that cannot start in time gets HTTP **504** with a ``SandboxError`` body
  and ``Retry-After``, at once instead of a silent wait past the client's time-out. 504 is what verl's
  client retries, with back-off; SandboxFusion's SDK retries any non-200.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import os
import posixpath
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tirl.sandbox.fusion_api import RUNS, CommandRunResult, CommandRunStatus, RunCodeRequest, RunCodeResponse, RunStatus
from tirl.sandbox.pool import ZygotePool
from tirl.types import ExecResult

STREAM_LIMIT = 1 << 20  # SandboxFusion reads up to 1 MiB of each stream
_PYTEST_FILE = "test_tirl_case.py"


def machine_memory_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20


@dataclass
class ServerLimits:
    max_run_timeout_s: float = 300.0
    max_memory_mb: int = field(default_factory=machine_memory_mb)
    """The cap of every request, and what ``memory_limit_MB = -1`` (no limit) means here."""
    max_queue: int | None = None
    """Requests that may wait for a lane (default 64 x lanes: the wait, not the count, is the usual limit)."""
    max_wait_s: float = 10.0
    """Longest wait for a lane (verl's client allows run + compile + 10 s per request)."""
    stream_limit: int = STREAM_LIMIT


class BadRequest(Exception):
    """A request this server cannot run as asked: answered 422, naming the field."""

    def __init__(self, field_name: str, msg: str):
        super().__init__(msg)
        self.field, self.msg = field_name, msg


class Admission:
    """At most ``lanes`` requests run; at most ``max_queue`` wait, each at most ``max_wait_s``."""

    def __init__(self, lanes: int, max_queue: int, max_wait_s: float):
        self.lanes, self.max_queue, self.max_wait_s = lanes, max_queue, max_wait_s
        self.sem = asyncio.Semaphore(lanes)
        self.waiting = 0
        self.stats = {"served": 0, "busy": 0}

    async def enter(self) -> str | None:
        """None once a lane is ours (call :meth:`leave` after), else why the request is refused."""
        if self.waiting >= self.max_queue:
            self.stats["busy"] += 1
            return f"busy: {self.waiting} requests already wait for {self.lanes} lanes; retry later"
        self.waiting += 1
        try:
            await asyncio.wait_for(self.sem.acquire(), self.max_wait_s)
        except TimeoutError:
            self.stats["busy"] += 1
            return f"busy: no lane of {self.lanes} came free within {self.max_wait_s:g} s; retry later"
        finally:
            self.waiting -= 1
        return None

    def leave(self) -> None:
        self.stats["served"] += 1
        self.sem.release()


def _file_path(path: str, writable: tuple[str, ...]) -> str | None:
    """``path`` as the sandbox will take it (relative to the work directory, or absolute inside one of
    the sandbox's private ``writable`` mounts), or None where it would land elsewhere."""
    norm = posixpath.normpath(path)
    if posixpath.isabs(norm):
        return norm if any(norm.startswith(d.rstrip("/") + "/") for d in writable) else None
    return None if norm in ("", ".", "..") or norm.startswith("../") else norm


def _outside(path: str, writable: tuple[str, ...]) -> str:
    where = f" or an absolute path in {', '.join(writable)} (the sandbox's private, wiped mounts)" if writable else (
        " (this server's sandbox has no private mount for absolute paths: it runs without bubblewrap)")
    return f"path {path!r} is outside what a request may write: give a path relative to its work directory{where}"


def _check(req: RunCodeRequest, limits: ServerLimits, writable: tuple[str, ...] = ()) -> tuple[int | None, dict[str, bytes]]:
    """The memory cap to apply and the decoded files; :class:`BadRequest` for what cannot run as asked.
    ``writable``: where absolute paths may point (:attr:`ZygotePool.writable_dirs`)."""
    if req.run_timeout <= 0 or req.run_timeout > limits.max_run_timeout_s:
        raise BadRequest("run_timeout", f"run_timeout must be in (0, {limits.max_run_timeout_s:g}] s on this server "
                                        f"(--max-timeout); got {req.run_timeout:g}")
    if req.memory_limit_MB > limits.max_memory_mb or req.memory_limit_MB == 0 or req.memory_limit_MB < -1:
        raise BadRequest("memory_limit_MB", f"memory_limit_MB must be -1 (no limit: this server's cap) or in "
                                            f"[1, {limits.max_memory_mb}] (--max-memory-mb); got {req.memory_limit_MB}")
    files = {}
    for path, content in req.files.items():
        if content is None:  # SandboxFusion skips these
            continue
        norm = _file_path(path, writable)
        if norm is None:
            raise BadRequest(f"files.{path}", "file " + _outside(path, writable))
        try:
            files[norm] = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadRequest(f"files.{path}", f"the content of {path!r} is not base64 ({e})") from None
    for path in req.fetch_files:
        if _file_path(path, writable) is None:
            raise BadRequest("fetch_files", "fetch_files " + _outside(path, writable))
    memory = limits.max_memory_mb if req.memory_limit_MB == -1 else req.memory_limit_MB
    return memory, files


def _program(req: RunCodeRequest, files: dict[str, bytes]) -> str:
    """The Python the zygote runs: the code itself, or pytest on it (as SandboxFusion's ``pytest``)."""
    if req.language == "python":
        return req.code
    files[_PYTEST_FILE] = req.code.encode()
    return ("import sys, pytest\n"
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', {_PYTEST_FILE!r}]))\n")


def fusion_response(res: ExecResult, stream_limit: int = STREAM_LIMIT) -> RunCodeResponse:
    """SandboxFusion's answer for one execution. Output cut at the limit is never a success."""
    pod = os.environ.get("MY_POD_NAME")
    if res.error is not None and not res.timed_out:
        return RunCodeResponse(status=RunStatus.SandboxError, message=res.error, executor_pod_name=pod,
                               run_result=CommandRunResult(status=CommandRunStatus.Error, stderr=res.error))
    stdout, stderr, code = res.stdout, res.stderr, res.returncode
    cut = res.output_truncated or len(stdout.encode()) > stream_limit or len(stderr.encode()) > stream_limit
    if cut:
        killed = code is None and not res.timed_out
        stdout = stdout.encode()[:stream_limit].decode("utf-8", "ignore")
        stderr = stderr.encode()[:stream_limit - 200].decode("utf-8", "ignore") + (
            f"\n[tirl sandbox] the output passed {stream_limit} bytes (SandboxFusion's limit per stream): it is cut "
            f"there{' and the program was stopped' if killed else ''}\n")
        code = -9 if killed else 1 if code == 0 else code  # never 0: the answer is incomplete
    status = CommandRunStatus.TimeLimitExceeded if res.timed_out else CommandRunStatus.Finished
    ok = status == CommandRunStatus.Finished and code == 0
    files = {k: base64.b64encode(v).decode() for k, v in res.files.items()}
    return RunCodeResponse(status=RunStatus.Success if ok else RunStatus.Failed, message="", executor_pod_name=pod,
                           run_result=CommandRunResult(status=status, execution_time=round(res.duration_s, 6),
                                                       return_code=None if res.timed_out else code,
                                                       stdout=stdout, stderr=stderr), files=files)


def create_app(pool: ZygotePool, limits: ServerLimits | None = None):
    """The FastAPI application (``uvicorn.run(app)``, or :func:`serve_in_thread`)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    limits = limits or ServerLimits()
    lanes = len(pool.pids()) or 1
    state: dict = {}
    runner = ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="tirl-serve")
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        runner.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="tirl sandbox (SandboxFusion API)", lifespan=lifespan)

    def admission() -> Admission:
        if "admission" not in state:  # made on the server's event loop
            state["admission"] = Admission(lanes, limits.max_queue or 64 * lanes, limits.max_wait_s)
        return state["admission"]

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, exc: BadRequest):
        return JSONResponse(status_code=422, content={"detail": [{"type": "value_error", "loc": ["body", *exc.field.split(".", 1)],
                                                                  "msg": exc.msg}]})

    @app.get("/v1/ping")
    async def ping():
        return "pong"

    @app.get("/level")
    async def level():
        adm = admission()
        return {"level": pool.level.describe(), "missing": pool.level.missing, "lanes": lanes, "waiting": adm.waiting,
                **adm.stats, "pool": pool.stats, "max_run_timeout_s": limits.max_run_timeout_s,
                "max_memory_mb": limits.max_memory_mb, "max_queue": adm.max_queue, "max_wait_s": adm.max_wait_s}

    @app.post("/run_code", response_model=RunCodeResponse)
    async def run_code(req: RunCodeRequest):
        if req.language not in RUNS:
            return RunCodeResponse(status=RunStatus.SandboxError, executor_pod_name=os.environ.get("MY_POD_NAME"),
                                   message=f"language {req.language!r} is not available on this server "
                                           f"(tirl sandbox serve runs {', '.join(RUNS)})")
        memory, files = _check(req, limits, pool.writable_dirs)
        program = _program(req, files)
        adm = admission()
        busy = await adm.enter()
        if busy is not None:
            body = RunCodeResponse(status=RunStatus.SandboxError, message=busy).model_dump(mode="json")
            return JSONResponse(status_code=504, content=body, headers={"Retry-After": "1"})
        try:
            res = await asyncio.get_running_loop().run_in_executor(
                runner, lambda: pool.run(program, req.run_timeout, stdin=req.stdin or "", files=files, memory_mb=memory,
                                         fetch=req.fetch_files, max_output=2 * limits.stream_limit + 1))
        finally:
            adm.leave()
        return fusion_response(res, limits.stream_limit)

    return app  # a malformed request gets FastAPI's own 422, as from SandboxFusion (also FastAPI)


class ServerThread:
    """The server on ``host:port`` (0: any free port) in a background thread: ``.url``, ``.stop()``."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, backlog=2048,
                                                    timeout_keep_alive=30))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            threading.Event().wait(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def main_serve(pool: ZygotePool, host: str, port: int, limits: ServerLimits) -> None:  # pragma: no cover - CLI
    import uvicorn

    print(f"tirl sandbox: SandboxFusion API on http://{host}:{port} (POST /run_code, GET /v1/ping, GET /level); "
          f"{len(pool.pids())} lanes, {pool.level.describe()}; run_timeout <= {limits.max_run_timeout_s:g} s, "
          f"memory <= {limits.max_memory_mb} MB", file=sys.stderr, flush=True)
    try:
        uvicorn.run(create_app(pool, limits), host=host, port=port, log_level="warning", access_log=False, backlog=2048)
    finally:
        pool.close()
