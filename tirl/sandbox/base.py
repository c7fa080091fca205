from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, runtime_checkable

from tirl.types import ExecResult


@runtime_checkable
class Sandbox(Protocol):
    """Runs one Python snippet. Never raises for anything the snippet does: crashes, timeouts
    and floods come back inside the :class:`ExecResult`."""

    def run(self, code: str, timeout: float | None = None) -> ExecResult: ...

    def run_many(self, codes: list[str], timeout: float | None = None) -> list[ExecResult]: ...

    async def arun(self, code: str, timeout: float | None = None) -> ExecResult:
        """Await one execution (the async rollout's call); concurrency is bounded by the sandbox."""
        ...

    def close(self) -> None: ...


class ThreadedRunMany:
    """``run_many`` by running ``run`` on a bounded thread pool (``max_workers`` at once)."""

    max_workers: int = 4

    def run(self, code: str, timeout: float | None = None) -> ExecResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def run_many(self, codes: list[str], timeout: float | None = None) -> list[ExecResult]:
        if len(codes) <= 1:
            return [self.run(c, timeout) for c in codes]
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(codes))) as pool:
            return list(pool.map(lambda c: self.run(c, timeout), codes))

    async def arun(self, code: str, timeout: float | None = None) -> ExecResult:
        if getattr(self, "_async_pool", None) is None:
            self._async_pool = ThreadPoolExecutor(max_workers=self.max_workers)
        return await asyncio.get_running_loop().run_in_executor(self._async_pool, self.run, code, timeout)

    def close(self) -> None:
        if getattr(self, "_async_pool", None) is not None:
            self._async_pool.shutdown(wait=False, cancel_futures=True)
            self._async_pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
