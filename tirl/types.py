"""The data that crosses module boundaries, and nothing else.

Every stage of the flow (data -> prompt -> rollout -> reward -> advantage -> loss -> update)
reads and writes these types. They hold plain Python values (lists, not tensors) so that a
trajectory can be written to JSONL, sent to another process, and read back unchanged.

Token-level invariants of a :class:`Trajectory` (tests prove them):

* ``token_ids``, ``mask`` and ``logprobs`` have the same length ``T``;
* ``mask[t] == 1`` iff token ``t`` was sampled by the policy; prompt and tool-output tokens
  have ``mask[t] == 0``; the mask is written at the moment tokens are appended, never derived
  from token values afterwards;
* ``logprobs[t]`` is the sampling log-probability of token ``t`` where ``mask[t] == 1`` and
  ``0.0`` elsewhere;
* ``segments`` tile ``[0, T)`` in order; decoding each segment's token range gives its ``text``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

SegmentKind = Literal["prompt", "model", "tool"]
# Why one generation call ended: "eos" = the model ended its answer; "tool" = a tool-call trigger
# (e.g. a closed ```python block) was produced; "length" = the token budget ran out.
FinishReason = Literal["eos", "tool", "length"]


class TirlError(Exception):
    """An error caused by user input (config, data, model path...). The message names the
    problem and the fix; the CLI prints it without a stack trace."""


@dataclass(frozen=True)
class Problem:
    """One task: a question and its reference answer (LaTeX or plain text)."""

    id: str
    problem: str
    answer: str
    source: str = ""


@dataclass
class ExecResult:
    """What running one snippet in a sandbox produced.

    ``returncode`` is None when the process never started or was killed before exiting.
    ``error`` is a sandbox-level failure (could not start, internal error), not a Python error.
    """

    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool = False
    duration_s: float = 0.0
    output_truncated: bool = False
    error: str | None = None
    files: dict[str, bytes] = field(default_factory=dict)  # fetched after the run (SandboxFusion's fetch_files)

    @property
    def ok(self) -> bool:
        """Ran to completion with exit status 0 (ToRL's "executable code")."""
        return self.returncode == 0 and not self.timed_out and self.error is None


@dataclass
class ToolCall:
    """One executed code block: the code, the raw result, and the text inserted for the model."""

    turn: int
    code: str
    result: ExecResult
    observation: str  # the text inserted into the trajectory (formatted, truncated)
    span: tuple[int, int]  # [start, end) token range of the inserted text in Trajectory.token_ids


@dataclass
class Segment:
    """A contiguous run of tokens of one provenance."""

    kind: SegmentKind
    text: str
    start: int
    end: int  # exclusive


@dataclass
class Trajectory:
    """One sampled response to one problem: a single flat token sequence (see module docstring)."""

    problem: Problem
    group: int  # index of the prompt within the step; trajectories of one group share a prompt
    token_ids: list[int]  # [T]
    mask: list[int]  # [T] 1 = sampled by the policy, 0 = inserted (prompt, tool output)
    logprobs: list[float]  # [T] sampling log-prob where mask == 1, else 0.0
    prompt_len: int
    segments: list[Segment] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: FinishReason = "eos"
    reward: float = 0.0
    reward_info: dict[str, Any] = field(default_factory=dict)

    @property
    def response_len(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def policy_text(self) -> str:
        """Only what the model wrote (tool outputs and the prompt excluded)."""
        return "".join(s.text for s in self.segments if s.kind == "model")

    @property
    def response_text(self) -> str:
        """What the model and the tool wrote after the prompt, in order."""
        return "".join(s.text for s in self.segments if s.kind != "prompt")

    @property
    def prompt_text(self) -> str:
        return "".join(s.text for s in self.segments if s.kind == "prompt")

    def to_json(self, with_tokens: bool = True) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not with_tokens:
            for k in ("token_ids", "mask", "logprobs"):
                out.pop(k)
        return out
