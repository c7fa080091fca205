"""The engine interface: token ids in, token ids + log-probs + finish reason out.

An engine knows nothing of tools. It samples a continuation of each prompt until the token
budget, the end-of-sequence token, or a *stop condition* — a function of the text generated so
far in this call that returns the character offset where a stop trigger ends (or None). The
rollout passes the tool protocol's stop condition; engines that only support stop strings use
``StopCondition.strings`` as a superset trigger and apply ``find`` afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from tirl.types import FinishReason


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off


@dataclass(frozen=True)
class StopCondition:
    find: Callable[[str], int | None]
    """Character offset just past the first stop trigger in the text, or None."""
    strings: tuple[str, ...] = ()
    """Stop strings that every trigger ends with (for engines that need strings)."""


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
