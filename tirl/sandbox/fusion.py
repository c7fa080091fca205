"""A :class:`~tirl.sandbox.base.Sandbox` that runs code on SandboxFusion-compatible servers:
SandboxFusion itself, or ``tirl sandbox serve`` (:mod:`tirl.sandbox.server`), one or many.

With several servers (one per node of a multi-node run) each request goes to the server with the
fewest requests in flight from this client (ties: the one used least). A server that cannot be
reached, answers 5xx or says it is busy (504) is retried on another, then, after a short back-off,
on any; every server's requests, errors, busy answers and latency are counted (:meth:`stats`).

Status mapping (as SandboxFusion): ``run_result.status`` is ``Finished``, ``TimeLimitExceeded`` or
``Error``; the top-level ``status`` is ``Success`` when it finished with return code 0, ``Failed``
otherwise, ``SandboxError`` when the sandbox itself failed.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from typing import Any

from tirl.sandbox.base import ThreadedRunMany
from tirl.types import ExecResult


class _Server:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        if not self.url.endswith("/run_code"):
            self.url += "/run_code"
        self.inflight = self.requests = self.errors = self.busy = 0
        self.latency_s: deque[float] = deque(maxlen=4096)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latency_s)
        pick = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 4)) if lat else (lambda q: None)
        return {"requests": self.requests, "errors": self.errors, "busy": self.busy, "inflight": self.inflight,
                "p50_s": pick(0.5), "p99_s": pick(0.99)}


class _Retry(Exception):
    """This server could not answer (unreachable, 5xx, busy): try another."""


class SandboxFusionSandbox(ThreadedRunMany):
    """Run code on SandboxFusion-compatible servers (``url``: one ``http://host:8080`` or a list)."""

    def __init__(self, url: str | list[str], timeout_s: float = 5.0, memory_mb: int = 1024, max_workers: int = 16,
                 client_grace_s: float = 10.0, retries: int = 3, backoff_s: float = 0.5):
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("sandbox.url: give at least one server")
        self.servers = [_Server(u) for u in urls]
        self.timeout_s, self.memory_mb, self.max_workers, self.grace = timeout_s, memory_mb, max_workers, client_grace_s
        self.retries, self.backoff_s = retries, backoff_s
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return ", ".join(s.url for s in self.servers)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per server: requests, errors, busy answers, in flight, latency p50/p99 (s)."""
        with self._lock:
            return {s.url: s.summary() for s in self.servers}

    def _pick(self, tried: set[int]) -> int:
        with self._lock:
            order = sorted(range(len(self.servers)), key=lambda i: (i in tried, self.servers[i].inflight, self.servers[i].requests))
            i = order[0]
            self.servers[i].inflight += 1
            self.servers[i].requests += 1
            return i

    def run(self, code: str, timeout: float | None = None) -> ExecResult:
        timeout = self.timeout_s if timeout is None else timeout
        body = json.dumps({"code": code, "language": "python", "run_timeout": timeout,
                           "memory_limit_MB": self.memory_mb}).encode()
        tried: set[int] = set()
        last = ""
        for attempt in range(len(self.servers) + self.retries):
            if attempt >= len(self.servers):
                time.sleep(self.backoff_s * (attempt - len(self.servers) + 1))
                tried.clear()
            i = self._pick(tried)
            tried.add(i)
            try:
                return parse_fusion_response(self._post(self.servers[i], body, timeout + self.grace))
            except _Retry as e:
                last = str(e)
        return ExecResult("", "", None, error=f"no sandbox server could run the code: {last}")

    def _post(self, server: _Server, body: bytes, wait_s: float) -> dict[str, Any]:
        req = urllib.request.Request(server.url, data=body, headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=wait_s) as resp:
                data = json.loads(resp.read())
            with self._lock:
                server.latency_s.append(time.perf_counter() - t0)
            return data
        except urllib.error.HTTPError as e:
            with self._lock:
                server.busy += e.code == 504
                server.errors += e.code != 504
            if e.code >= 500:
                raise _Retry(f"{server.url} answered HTTP {e.code}") from None
            return {"status": "SandboxError", "message": f"{server.url} answered HTTP {e.code}: {e.read()[:500]!r}"}
        except (urllib.error.URLError, OSError, json.JSONDecodeError, TimeoutError) as e:
            with self._lock:
                server.errors += 1
            raise _Retry(f"{server.url} failed: {e}") from None
        finally:
            with self._lock:
                server.inflight -= 1


def parse_fusion_response(data: dict[str, Any]) -> ExecResult:
    run = data.get("run_result") or {}
    if data.get("status") == "SandboxError":
        return ExecResult("", run.get("stderr") or "", None, error=str(data.get("message") or "SandboxError"))
    timed_out = run.get("status") == "TimeLimitExceeded"
    return ExecResult(stdout=run.get("stdout") or "", stderr=run.get("stderr") or "",
                      returncode=None if timed_out else run.get("return_code"), timed_out=timed_out,
                      duration_s=float(run.get("execution_time") or 0.0))
