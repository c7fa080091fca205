from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, runtime_checkable

from tirl.types import ExecResult


@runtime_checkable
class Sandbox(Protocol):
    """Runs one Python snippet. Never raises for anything the snippet does: crashes, timeouts
    and floods come back inside the :class:`ExecResult`."""

    def run(self, code: str, timeout: float | None = None) -> ExecResult: ...

    def run_many(self, codes: list[str], timeout: float | None = None) -> list[ExecResult]: ...

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

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
