"""Multi-turn tool-integrated rollout, token-in-token-out.

Each trajectory is one flat token list. Its mask is written as tokens are appended:
1 for the ids the engine sampled, 0 for the prompt and for the ids of inserted tool output.
Nothing is ever re-tokenised: the next turn continues from exactly these ids.

Turns run in lock-step over the batch (all active trajectories generate, then all their code
runs concurrently in the sandbox). At most ``max_tool_calls`` executions per trajectory: the
turn after the last allowed call generates without the tool trigger, so code written then is
never run (ToRL's switch to pure text reasoning).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tirl.prompt import Prompt
from tirl.rollout import protocol as torl
from tirl.rollout.protocol import TORL, MalformedToolCall, ToolProtocol
from tirl.rollout.engine import Engine, SamplingParams
from tirl.sandbox import Sandbox
from tirl.types import ExecResult, Problem, Segment, ToolCall, Trajectory


@dataclass(frozen=True)
class RolloutLimits:
    max_tool_calls: int = 1
    max_tokens_per_turn: int = 256
    max_response_tokens: int = 512
    obs_head_chars: int = 128
    obs_tail_chars: int = 128
    tool_timeout_s: float | None = None
    replay_history: bool = False  # re-run the trajectory's earlier successful blocks first (stateful)
    print_last_expr: bool = False  # print a bare last expression's value


@dataclass
class RolloutTimes:
    generate_s: float = 0.0
    tools_s: float = 0.0


class _Builder:
    """A trajectory under construction; every append sets mask and log-probs for its tokens."""

    def __init__(self, problem: Problem, group: int, prompt: Prompt):
        n = len(prompt.token_ids)
        self.t = Trajectory(problem=problem, group=group, token_ids=list(prompt.token_ids), mask=[0] * n,
                            logprobs=[0.0] * n, prompt_len=n, segments=[Segment("prompt", prompt.text, 0, n)])
        self.done = False

    @property
    def used(self) -> int:
        return len(self.t.token_ids) - self.t.prompt_len

    def append(self, kind: str, ids: list[int], text: str, logprobs: list[float] | None = None) -> tuple[int, int]:
        start = len(self.t.token_ids)
        sampled = kind == "model"
        self.t.token_ids += ids
        self.t.mask += [1 if sampled else 0] * len(ids)
        self.t.logprobs += list(logprobs) if sampled else [0.0] * len(ids)
        self.t.segments.append(Segment(kind, text, start, start + len(ids)))  # type: ignore[arg-type]
        return start, start + len(ids)


def rollout(
    engine: Engine,
    tokenizer,
    sandbox: Sandbox,
    items: list[tuple[Problem, int, Prompt]],
    params: SamplingParams,
    limits: RolloutLimits,
    protocol: ToolProtocol = TORL,
) -> tuple[list[Trajectory], RolloutTimes]:
    """Sample one trajectory per ``(problem, group, prompt)`` item, with ``protocol``'s tool format."""
    builders = [_Builder(p, g, pr) for p, g, pr in items]
    times = RolloutTimes()
    for turn in range(limits.max_tool_calls + 1):
        active = [b for b in builders if not b.done]
        if not active:
            break
        tools_allowed = turn < limits.max_tool_calls
        budgets = [min(limits.max_tokens_per_turn, limits.max_response_tokens - b.used) for b in active]
        t0 = time.perf_counter()
        gens = engine.generate([b.t.token_ids for b in active], budgets, params, protocol.stop if tools_allowed else None)
        times.generate_s += time.perf_counter() - t0

        pending: list[tuple[_Builder, str, str | None]] = []  # (builder, turn text, code)
        for b, g in zip(active, gens):
            text = tokenizer.decode(g.token_ids)
            b.append("model", g.token_ids, text, g.logprobs)
            b.t.finish_reason = g.finish_reason
            if g.finish_reason == "tool":
                try:
                    pending.append((b, text, protocol.extract_code(text)))
                except MalformedToolCall as e:  # fed back to the model as the tool's output
                    pending.append((b, text, e))
            else:
                b.done = True  # eos, or out of budget
        t0 = time.perf_counter()
        _run_tools(sandbox, tokenizer, pending, turn, limits, protocol)
        times.tools_s += time.perf_counter() - t0
    return [b.t for b in builders], times


def _program(b: _Builder, code: str, limits: RolloutLimits) -> str:
    """What the sandbox runs for ``code``: the block itself by default (stateless, as ToRL/ReTool)."""
    if limits.print_last_expr:
        code = torl.print_last_expression(code)
    if limits.replay_history:
        code = torl.with_replay([c.code for c in b.t.tool_calls if c.result.ok], code)
    return code


def _run_tools(sandbox: Sandbox, tokenizer, pending, turn: int, limits: RolloutLimits, protocol: ToolProtocol) -> None:
    runnable = [(b, text, code) for b, text, code in pending if isinstance(code, str)]
    results = iter(sandbox.run_many([_program(b, code, limits) for b, _, code in runnable], limits.tool_timeout_s))
    for b, text, code in pending:
        if isinstance(code, MalformedToolCall):
            res, code = ExecResult("", str(code), 1), ""
        elif code is None:  # the model wrote ```output without a python block before it
            res = ExecResult("", "", None, error="no code block to run")
        else:
            res = next(results)
        obs = torl.observation(res, limits.obs_head_chars, limits.obs_tail_chars)
        inserted = protocol.insertion(text, obs)
        ids = tokenizer(inserted, add_special_tokens=False)["input_ids"]
        if b.used + len(ids) >= limits.max_response_tokens:
            b.t.finish_reason, b.done = "length", True  # no room for the output and a reply
            continue
        span = b.append("tool", ids, inserted)
        b.t.tool_calls.append(ToolCall(turn=turn, code=code or "", result=res, observation=obs, span=span))
