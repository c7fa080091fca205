"""The engine interface: token ids in, token ids + log-probs + finish reason out.

An engine knows nothing of tools. It samples a continuation of each prompt until the token
budget, the end-of-sequence token, or a *stop condition* — a function of the text generated so
far in this call that returns the character offset where a stop trigger ends (or None). The
rollout passes the tool protocol's stop condition; engines that only support stop strings use
``StopCondition.strings`` as a superset trigger and apply ``find`` afterwards.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

from tirl.types import FinishReason

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off


def sampling_logprobs(logits_BV: "torch.Tensor", params: SamplingParams) -> "torch.Tensor":
    """``[B, V]`` float32 log-probs of the distribution an engine samples from (and records):
    ``softmax(logits / T)`` restricted to the ``top_k`` most likely tokens, then to the smallest
    set of those whose mass reaches ``top_p`` (the token that crosses it included), renormalised;
    ``-inf`` outside. Greedy (``T = 0``) records the untempered distribution (its argmax is what
    is drawn). The order and the top-p boundary are vLLM's, so both engines sample alike."""
    import torch  # (here, not at the top: the verifier's workers import this package and not torch)

    logits = logits_BV.float()
    if params.temperature > 0 and params.temperature != 1.0:
        logits = logits / params.temperature
    greedy = params.temperature == 0
    if not greedy and params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if not greedy and params.top_p < 1.0:
        sorted_lg, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_lg, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the more likely tokens
        drop = before >= params.top_p
        drop[:, 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def derive_seed(*parts: int | str) -> int:
    """A seed in [0, 2**63) from ``parts``, the same in every process (unlike ``hash``): the seed of
    one trajectory's sampling from (rollout seed, trajectory index), of one request from (that
    seed, its prompt length), and so on."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True)
class StopCondition:
    find: Callable[[str], int | None]
    """Character offset just past the first stop trigger in the text, or None."""
    strings: tuple[str, ...] = ()
    """Stop strings that every trigger ends with (for engines that need strings)."""
    token_ids: tuple[int, ...] = ()
    """Token ids that end a turn (a chat template's end-of-turn), for engines that match stop
    strings on text without special tokens (vLLM); ``find`` still decides."""


@dataclass
class Generation:
    token_ids: list[int]  # [n] exactly the sampled ids, in order
    logprobs: list[float]  # [n] log-prob of each id under the sampling distribution
    finish_reason: FinishReason


class Engine(Protocol):
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: list[int],
        params: SamplingParams,
        stop: StopCondition | None = None,
    ) -> list[Generation]:
        """One continuation per prompt; ``max_new_tokens[i]`` bounds row ``i``."""
        ...


class AsyncEngine(Protocol):
    """One request at a time, awaited: what the per-trajectory async rollout drives. Requests
    from many coroutines are batched by the engine (vLLM: continuous batching)."""

    async def agenerate(self, prompt: list[int], max_new_tokens: int, params: SamplingParams,
                        stop: StopCondition | None = None) -> Generation: ...


class BatchingAsyncEngine:
    """Any batched :class:`Engine` as an :class:`AsyncEngine`: requests that arrive while the
    engine is busy, or within ``linger_s`` of the first one, run together as one ``generate``
    call (in a worker thread, so sandbox results keep arriving meanwhile). Requests with
    different sampling parameters or stop conditions never share a batch. A static-batch engine
    (HF ``generate``) runs a batch until its longest row ends; only continuous batching (vLLM's
    own :meth:`agenerate`) lets a request join a running batch."""

    def __init__(self, engine: Engine, max_batch: int = 256, linger_s: float = 0.05):
        self.engine, self.max_batch, self.linger_s = engine, max_batch, linger_s
        self.per_request_seeds = getattr(engine, "per_request_seeds", False)  # seeds are passed through
        self._queue: deque = deque()  # (prompt, budget, params, stop, future, seed)
        self._driver: asyncio.Task | None = None

    async def agenerate(self, prompt, max_new_tokens, params, stop=None, seed: int | None = None) -> Generation:
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((prompt, max_new_tokens, params, stop, fut, seed))
        if self._driver is None or self._driver.done():
            self._driver = asyncio.create_task(self._drive())
        return await fut

    async def _drive(self) -> None:
        while self._queue:
            await asyncio.sleep(self.linger_s)  # let requests that are about to arrive join
            first = self._queue[0]
            batch = [r for r in self._queue if r[2] == first[2] and r[3] == first[3]][: self.max_batch]
            for r in batch:
                self._queue.remove(r)
            seeds = [r[5] for r in batch]
            kw = {"seeds": seeds} if self.per_request_seeds and None not in seeds else {}
            try:
                gens = await asyncio.to_thread(self.engine.generate, [r[0] for r in batch], [r[1] for r in batch],
                                               first[2], first[3], **kw)
            except Exception as e:  # noqa: BLE001 - every trajectory of the batch sees the failure
                for r in batch:
                    if not r[4].done():
                        r[4].set_exception(e)
                continue
            for r, g in zip(batch, gens):
                if not r[4].done():
                    r[4].set_result(g)


def find_finish(pieces: list[str], token_ids: list[int], eos_ids: set[int], stop: StopCondition | None) -> tuple[int, FinishReason]:
    """Where a generated row ends: ``(n_tokens_kept, reason)``.

    ``pieces[k]`` is the text of token ``k`` alone. A trigger ends inside or at the end of some
    token; everything up to and including that token is kept (the model sampled it).
    """
    text = ""
    for k, (tok, piece) in enumerate(zip(token_ids, pieces)):
        if tok in eos_ids:
            return k + 1, "eos"
        text += piece
        if stop is not None and stop.find(text) is not None:
            return k + 1, "tool"
    return len(token_ids), "length"
