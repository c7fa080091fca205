"""Multi-turn tool-integrated rollout, token-in-token-out.

Each trajectory is one flat token list. Its mask is written as tokens are appended:
1 for the ids the engine sampled, 0 for the prompt and for the ids of inserted tool output.
Nothing is ever re-tokenised: the next turn continues from exactly these ids.

Two schedules, same trajectories: *lock-step* (all active trajectories generate a turn, then all
their code runs; the batch waits for the slowest call, as the papers' code does) and *async* (one
coroutine per trajectory: while one waits for the sandbox, the others keep generating). At most
``max_tool_calls`` executions per trajectory: the turn after the last allowed call generates
without the tool trigger, so code written then is never run (ToRL's switch to pure text reasoning).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass

from tirl.prompt import Prompt
from tirl.rollout import protocol as torl
from tirl.rollout.encode import insert_ids
from tirl.rollout.protocol import TORL, MalformedToolCall, ToolProtocol
from tirl.rollout.engine import AsyncEngine, BatchingAsyncEngine, Engine, SamplingParams, derive_seed
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
    generate_s: float = 0.0  # wall time with at least one request in the engine
    tools_s: float = 0.0  # wall time with only sandbox calls running: tool latency not hidden


class _Builder:
    """A trajectory under construction; every append sets mask and log-probs for its tokens."""

    def __init__(self, problem: Problem, group: int, prompt: Prompt, seed: int | None = None):
        n = len(prompt.token_ids)
        self.t = Trajectory(problem=problem, group=group, token_ids=list(prompt.token_ids), mask=[0] * n,
                            logprobs=[0.0] * n, prompt_len=n, segments=[Segment("prompt", prompt.text, 0, n)])
        self.done = False
        self.seed = seed  # this trajectory's own sampling seed (engines with per-request seeds)

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


class _Clock:
    """Splits rollout wall time: ``generate_s`` while the engine has work, ``tools_s`` while only
    the sandbox does (the tool latency that was *not* hidden behind generation)."""

    def __init__(self) -> None:
        self.times, self.busy, self.last = RolloutTimes(), {"gen": 0, "tool": 0}, time.perf_counter()

    def _tick(self) -> None:
        now = time.perf_counter()
        if self.busy["gen"]:
            self.times.generate_s += now - self.last
        elif self.busy["tool"]:
            self.times.tools_s += now - self.last
        self.last = now

    @contextmanager
    def span(self, kind: str):
        self._tick()
        self.busy[kind] += 1
        try:
            yield
        finally:
            self._tick()
            self.busy[kind] -= 1


@dataclass(frozen=True)
class _Ctx:
    tokenizer: object
    sandbox: Sandbox
    params: SamplingParams
    limits: RolloutLimits
    protocol: ToolProtocol


def _builders(items: list[tuple[Problem, int, Prompt]], seed: int | None, engine, first: int = 0) -> list[_Builder]:
    """One builder per item; with a ``seed`` and an engine that takes per-request seeds (vLLM and
    the HF engine), each trajectory samples from its own stream, derived from (seed, its index):
    the same tokens whatever the batch or the timing of tool calls. (Without a seed, an engine
    samples from its own or torch's global generator.) ``first``: the index of ``items[0]`` in
    the whole batch (a data-parallel rank rolls out a slice of it)."""
    own = _own_seeds(seed, engine)
    return [_Builder(p, g, pr, derive_seed(seed, i) if own else None) for i, (p, g, pr) in enumerate(items, start=first)]


def _own_seeds(seed: int | None, engine) -> bool:
    return seed is not None and getattr(engine, "per_request_seeds", False)


def resolve_mode(mode: str, engine) -> str:
    """``auto``: async for an engine with continuous batching (vLLM), lock-step otherwise — a
    static-batch engine gains little from async turns, and lock-step keeps its sampling
    reproducible (the batch composition, hence the random stream, does not depend on timing)."""
    if getattr(engine, "lockstep_only", False):  # a node's shared engine: every call is a collective
        return "lockstep"
    if mode == "auto":
        return "async" if hasattr(engine, "agenerate") else "lockstep"
    return mode


def rollout(
    engine: Engine,
    tokenizer,
    sandbox: Sandbox,
    items: list[tuple[Problem, int, Prompt]],
    params: SamplingParams,
    limits: RolloutLimits,
    protocol: ToolProtocol = TORL,
    mode: str = "lockstep",
    seed: int | None = None,
    first_index: int = 0,
) -> tuple[list[Trajectory], RolloutTimes]:
    """Sample one trajectory per ``(problem, group, prompt)`` item, with ``protocol``'s tool format.

    ``mode="lockstep"``: turns over the whole batch (generate all, then run all their code).
    ``mode="async"``: one coroutine per trajectory (:func:`rollout_async`). Same trajectories
    either way; only the order in which the engine sees requests differs. ``seed``: see
    :func:`_builders` (``first_index`` too)."""
    if mode == "async":
        return asyncio.run(rollout_async(engine, tokenizer, sandbox, items, params, limits, protocol, seed, first_index))
    if mode != "lockstep":
        raise ValueError(f"unknown rollout mode {mode!r}; use 'lockstep' or 'async'")
    ctx = _Ctx(tokenizer, sandbox, params, limits, protocol)
    builders = _builders(items, seed, engine, first_index)
    clock, seeded = _Clock(), _own_seeds(seed, engine)
    with _sessions(engine, builders) as sessions:
        for turn in range(limits.max_tool_calls + 1):
            active = [b for b in builders if not b.done]
            if not active:
                break
            with clock.span("gen"):
                gens = _generate_turn(engine, active, ctx, sessions, seeded)
            pending = [(b, call) for b, g in zip(active, gens) if (call := _take(b, g, ctx)) is not None]
            programs = [_program(b, code, limits) for b, (_, calls) in pending for code in calls if isinstance(code, str)]
            with clock.span("tool"):
                results = iter(sandbox.run_many(programs, limits.tool_timeout_s))
            for b, (text, calls) in pending:
                _insert(b, text, calls, [next(results) if isinstance(c, str) else None for c in calls], turn, ctx)
            for b in active:
                if sessions and b.done:
                    engine.release(b)
    end_round = getattr(engine, "end_round", None)  # a shared engine: serve the other ranks until they are done
    if end_round is not None:
        with clock.span("gen"):
            end_round()
    return [b.t for b in builders], clock.times


def _generate_turn(engine, active: list[_Builder], ctx: _Ctx, sessions: bool, seeded: bool) -> list:
    """One turn of every active trajectory, one ``generate`` call per stop condition (a
    trajectory with no call left stops at ``protocol.final_stop``); generations in ``active``'s order."""
    out: list = [None] * len(active)
    by_stop: dict[int, list[int]] = {}
    for i, b in enumerate(active):
        by_stop.setdefault(_calls_left(b, ctx.limits) > 0, []).append(i)
    for has_calls, idx in sorted(by_stop.items(), reverse=True):
        rows = [active[i] for i in idx]
        kw = {"sessions": rows} if sessions else {}
        if seeded:
            kw["seeds"] = [b.seed for b in rows]
        stop = ctx.protocol.stop if has_calls else ctx.protocol.final_stop
        gens = engine.generate([b.t.token_ids for b in rows], [_budget(b, ctx.limits) for b in rows], ctx.params, stop, **kw)
        for i, g in zip(idx, gens):
            out[i] = g
    return out


def _calls_left(b: _Builder, limits: RolloutLimits) -> int:
    return limits.max_tool_calls - len(b.t.tool_calls)


@contextmanager
def _sessions(engine, builders: list[_Builder]):
    """Whether ``engine`` keeps each trajectory's KV cache across its tool calls (vLLM sessions,
    keyed by the trajectory's builder); every session is released when the rollout ends."""
    on = bool(getattr(engine, "sessions", False))
    try:
        yield on
    finally:
        if on:
            for b in builders:
                engine.release(b)


async def rollout_async(
    engine: Engine | AsyncEngine,
    tokenizer,
    sandbox: Sandbox,
    items: list[tuple[Problem, int, Prompt]],
    params: SamplingParams,
    limits: RolloutLimits,
    protocol: ToolProtocol = TORL,
    seed: int | None = None,
    first_index: int = 0,
) -> tuple[list[Trajectory], RolloutTimes]:
    """One coroutine per trajectory: while one waits for the sandbox, the others keep generating.
    Each turn continues from the exact token ids so far. An engine without ``agenerate`` is
    wrapped in :class:`BatchingAsyncEngine`. ``seed``: see :func:`_builders`."""
    aengine = engine if hasattr(engine, "agenerate") else BatchingAsyncEngine(engine)  # type: ignore[arg-type]
    ctx = _Ctx(tokenizer, sandbox, params, limits, protocol)
    builders = _builders(items, seed, aengine, first_index)
    clock = _Clock()
    with _sessions(aengine, builders) as sessions:
        await asyncio.gather(*(_one_trajectory(aengine, b, ctx, clock, sessions) for b in builders))
    if hasattr(aengine, "drain"):
        await aengine.drain()  # the engine's driver ends with this event loop
    return [b.t for b in builders], clock.times


async def _one_trajectory(engine: AsyncEngine, b: _Builder, ctx: _Ctx, clock: _Clock, session: bool = False) -> None:
    limits = ctx.limits
    kw = {"session": b} if session else {}
    if b.seed is not None:
        kw["seed"] = b.seed
    try:
        for turn in range(limits.max_tool_calls + 1):
            stop = ctx.protocol.stop if _calls_left(b, limits) > 0 else ctx.protocol.final_stop
            with clock.span("gen"):
                g = await engine.agenerate(b.t.token_ids, _budget(b, limits), ctx.params, stop, **kw)
            call = _take(b, g, ctx)
            if call is None:
                return
            text, calls = call
            results: list[ExecResult | None] = [None] * len(calls)
            runs = [i for i, c in enumerate(calls) if isinstance(c, str)]
            if runs:
                with clock.span("tool"):  # a turn's calls run concurrently
                    done = await asyncio.gather(*(ctx.sandbox.arun(_program(b, calls[i], limits), limits.tool_timeout_s)
                                                  for i in runs))
                for i, r in zip(runs, done):
                    results[i] = r
            _insert(b, text, calls, results, turn, ctx)
            if b.done:
                return
    finally:
        if session:
            engine.release(b)  # a finished trajectory's KV cache is freed at once


def _budget(b: _Builder, limits: RolloutLimits) -> int:
    return min(limits.max_tokens_per_turn, limits.max_response_tokens - b.used)


def _take(b: _Builder, g, ctx: _Ctx) -> tuple[str, list] | None:
    """Append one generation (mask 1). Returns ``(turn text, calls)`` when the turn asks for tools
    and calls are left (``calls``: each code, None — nothing to run — a :class:`MalformedToolCall`,
    fed back as the tool's output, or :data:`OVER_LIMIT` past the trajectory's limit); None when the
    trajectory is finished (EOS, out of budget, or calls made after the last allowed one, never run)."""
    text = ctx.tokenizer.decode(g.token_ids)
    b.append("model", g.token_ids, text, g.logprobs)
    b.t.finish_reason = g.finish_reason
    calls = ctx.protocol.turn_calls(text, g.finish_reason)
    left = _calls_left(b, ctx.limits)
    if calls is None or left <= 0:
        if b.t.finish_reason == "tool":
            b.t.finish_reason = "eos"  # the model ended its turn (chat), asking for nothing that runs
        b.done = True
        return None
    b.t.finish_reason = "tool"
    return text, calls[:left] + [OVER_LIMIT] * (len(calls) - left)  # those past the limit are answered, not run


def _program(b: _Builder, code: str, limits: RolloutLimits) -> str:
    """What the sandbox runs for ``code``: the block itself by default (stateless, as ToRL/ReTool)."""
    if limits.print_last_expr:
        code = torl.print_last_expression(code)
    if limits.replay_history:
        code = torl.with_replay([c.code for c in b.t.tool_calls if c.result.ok], code)
    return code


LIMIT_REACHED = "Error: the limit of {n} tool calls per trajectory is reached; this call was not run"
OVER_LIMIT = object()  # a call of the turn past the trajectory's limit: answered with LIMIT_REACHED


def _insert(b: _Builder, text: str, calls: list, results: list[ExecResult | None], turn: int, ctx: _Ctx) -> None:
    """Append the tools' responses to one turn (mask 0), or end the trajectory when they do not
    fit. Calls past the trajectory's limit are answered with :data:`LIMIT_REACHED`, not run."""
    limits = ctx.limits
    made: list[ToolCall] = []
    observations = []
    for code, res in zip(calls, results):
        if code is OVER_LIMIT:
            observations.append(LIMIT_REACHED.format(n=limits.max_tool_calls))
            continue
        if isinstance(code, MalformedToolCall):
            res, code = ExecResult("", str(code), 1), ""
        elif code is None:  # the model wrote ```output without a python block before it
            res = ExecResult("", "", None, error="no code block to run")
        assert res is not None
        obs = torl.observation(res, limits.obs_head_chars, limits.obs_tail_chars)
        observations.append(obs)
        made.append(ToolCall(turn=turn, code=code or "", result=res, observation=obs, span=(0, 0)))
    ids = insert_ids(ctx.tokenizer, ctx.protocol.insertion_parts(text, observations))
    if b.used + len(ids) >= limits.max_response_tokens:
        b.t.finish_reason, b.done = "length", True  # no room for the output and a reply
        return
    span = b.append("tool", ids, ctx.tokenizer.decode(ids))
    b.t.tool_calls += [dataclasses.replace(c, span=span) for c in made]
