"""SandboxFusion compatibility, both ways.

* :func:`serve` — ``tirl sandbox serve``: an HTTP server with SandboxFusion's ``POST /run_code``
  (request ``code, language, run_timeout, memory_limit_MB, stdin, files``; response
  ``status, message, compile_result, run_result{status, execution_time, return_code, stdout,
  stderr}, executor_pod_name, files``) backed by a :class:`ZygotePool`, so verl's
  ``sandbox_fusion_url`` can point at it. Also ``GET /v1/ping`` (``pong``).
* :class:`SandboxFusionSandbox` — a :class:`~tirl.sandbox.base.Sandbox` that sends code to any
  SandboxFusion-compatible server.

Status mapping (as SandboxFusion): ``run_result.status`` is ``Finished``, ``TimeLimitExceeded``
or ``Error``; the top-level ``status`` is ``Success`` when it finished with return code 0,
``Failed`` otherwise, ``SandboxError`` when the sandbox itself failed.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tirl.sandbox.base import ThreadedRunMany
from tirl.sandbox.pool import ZygotePool, decode_files
from tirl.types import ExecResult

MAX_BODY = 4 << 20
PYTHON_LANGS = {"python", "python3"}


def fusion_response(res: ExecResult) -> dict[str, Any]:
    if res.error is not None and not res.timed_out:
        return {"status": "SandboxError", "message": res.error, "compile_result": None, "run_result": None,
                "executor_pod_name": None, "files": {}}
    run_status = "TimeLimitExceeded" if res.timed_out else "Finished"
    ok = run_status == "Finished" and res.returncode == 0
    return {
        "status": "Success" if ok else "Failed", "message": "" if ok else res.stderr[-1000:],
        "compile_result": None,
        "run_result": {"status": run_status, "execution_time": round(res.duration_s, 6), "return_code": res.returncode,
                       "stdout": res.stdout, "stderr": res.stderr},
        "executor_pod_name": None, "files": {},
    }


def _error(message: str) -> dict[str, Any]:
    return {"status": "SandboxError", "message": message, "compile_result": None, "run_result": None,
            "executor_pod_name": None, "files": {}}


def handle_run_code(pool: ZygotePool, body: dict[str, Any], max_timeout: float, max_memory_mb: int) -> dict[str, Any]:
    lang = str(body.get("language", "python")).lower()
    if lang not in PYTHON_LANGS:
        return _error(f"unsupported language {lang!r}: this server runs python")
    code = body.get("code")
    if not isinstance(code, str):
        return _error("'code' must be a string")
    try:
        timeout = min(float(body.get("run_timeout") or pool.timeout_s), max_timeout)
        mem = int(body.get("memory_limit_MB") or -1)
        memory_mb = min(mem, max_memory_mb) if mem > 0 else None
        files = decode_files(body.get("files") or {})
    except (TypeError, ValueError) as e:
        return _error(f"bad request field: {e}")
    res = pool.run(code, timeout, stdin=str(body.get("stdin") or ""), files=files, memory_mb=memory_mb)
    return fusion_response(res)


def make_handler(pool: ZygotePool, max_timeout: float, max_memory_mb: int):
    class Handler(BaseHTTPRequestHandler):
        server_version = "tirl-sandbox"

        def _send(self, code: int, payload: Any, content_type: str = "application/json") -> None:
            data = (json.dumps(payload) if content_type == "application/json" else str(payload)).encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path in ("/v1/ping", "/ping", "/health"):
                self._send(200, "pong", "text/plain")
            elif self.path == "/level":
                self._send(200, {"level": pool.level.describe(), "missing": pool.level.missing, "stats": pool.stats})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") not in ("/run_code", "/v1/run_code"):
                return self._send(404, {"error": "not found"})
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                return self._send(413, _error(f"request body over {MAX_BODY} bytes"))
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError as e:
                return self._send(400, _error(f"body is not JSON: {e}"))
            if not isinstance(body, dict):
                return self._send(400, _error("body must be a JSON object"))
            self._send(200, handle_run_code(pool, body, max_timeout, max_memory_mb))

        def log_message(self, fmt: str, *args: Any) -> None:  # quiet by default
            pass

    return Handler


def serve(pool: ZygotePool, host: str = "127.0.0.1", port: int = 8080, max_timeout: float = 30.0,
          max_memory_mb: int = 4096) -> ThreadingHTTPServer:
    """Create the server (call ``serve_forever()`` on it; ``shutdown()`` from another thread)."""
    server = ThreadingHTTPServer((host, port), make_handler(pool, max_timeout, max_memory_mb))
    server.daemon_threads = True
    return server


class SandboxFusionSandbox(ThreadedRunMany):
    """Run code on a SandboxFusion-compatible server (``url`` like ``http://host:8080``)."""

    def __init__(self, url: str, timeout_s: float = 5.0, memory_mb: int = 1024, max_workers: int = 16,
                 client_grace_s: float = 10.0):
        self.url = url.rstrip("/")
        if not self.url.endswith("/run_code"):
            self.url += "/run_code"
        self.timeout_s, self.memory_mb, self.max_workers, self.grace = timeout_s, memory_mb, max_workers, client_grace_s

    def run(self, code: str, timeout: float | None = None) -> ExecResult:
        timeout = self.timeout_s if timeout is None else timeout
        body = json.dumps({"code": code, "language": "python", "run_timeout": timeout,
                           "memory_limit_MB": self.memory_mb}).encode()
        req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout + self.grace) as resp:
                data = json.loads(resp.read())
        except (urllib.error.URLError, OSError, json.JSONDecodeError, TimeoutError) as e:
            return ExecResult("", "", None, error=f"sandbox server {self.url} failed: {e}")
        return parse_fusion_response(data)


def parse_fusion_response(data: dict[str, Any]) -> ExecResult:
    run = data.get("run_result") or {}
    if data.get("status") == "SandboxError" and not run:
        return ExecResult("", "", None, error=str(data.get("message") or "SandboxError"))
    timed_out = run.get("status") == "TimeLimitExceeded"
    return ExecResult(stdout=run.get("stdout") or "", stderr=run.get("stderr") or "",
                      returncode=None if timed_out else run.get("return_code"), timed_out=timed_out,
                      duration_s=float(run.get("execution_time") or 0.0))


def main_serve(pool: ZygotePool, host: str, port: int, max_timeout: float) -> None:  # pragma: no cover - CLI
    server = serve(pool, host, port, max_timeout)
    print(f"tirl sandbox: SandboxFusion-compatible POST http://{host}:{server.server_port}/run_code "
          f"({len(pool.pids())} lanes, {pool.level.describe()})", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        pool.close()
