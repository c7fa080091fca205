"""Per-batch statistics of trajectories (ToRL Fig. 5, ReTool Fig. 3)."""

from __future__ import annotations

import statistics

from tirl.reward import void_turn
from tirl.rollout.protocol import count_code_lines, has_code
from tirl.types import Trajectory


def first_call_position(t: Trajectory) -> float | None:
    """Where the first tool call starts, as a fraction of the response (ReTool's code timing)."""
    if not t.tool_calls or t.response_len == 0:
        return None
    return (t.tool_calls[0].span[0] - t.prompt_len) / t.response_len


def _last_call_ok(t: Trajectory) -> float:
    return 1.0 if t.tool_calls[-1].result.ok else 0.0


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def rollout_metrics(trajs: list[Trajectory]) -> dict[str, float]:
    calls = [c for t in trajs for c in t.tool_calls]
    correct = [bool(t.reward_info.get("correct")) for t in trajs]
    with_calls = [t for t in trajs if t.tool_calls]
    positions = [p for p in map(first_call_position, trajs) if p is not None]
    return {
        "reward_mean": _mean([t.reward for t in trajs]),
        "reward_std": statistics.pstdev([t.reward for t in trajs]) if trajs else float("nan"),
        "accuracy": _mean([float(c) for c in correct]),
        "response_len": _mean([float(t.response_len) for t in trajs]),
        "policy_tokens": _mean([float(sum(t.mask)) for t in trajs]),
        "tool_calls_per_traj": _mean([float(len(t.tool_calls)) for t in trajs]),
        "tool_error_rate": _mean([0.0 if c.result.ok else 1.0 for c in calls]),
        "tool_timeout_rate": _mean([1.0 if c.result.timed_out else 0.0 for c in calls]),
        "code_ratio": _mean([1.0 if has_code(t.policy_text) else 0.0 for t in trajs]),
        "executed_code_ratio": _mean([1.0 if t.tool_calls else 0.0 for t in trajs]),
        "boxed_ratio": _mean([1.0 if t.reward_info.get("extracted") is not None else 0.0 for t in trajs]),
        "truncation_ratio": _mean([1.0 if t.finish_reason == "length" else 0.0 for t in trajs]),
        "code_pass_rate": _mean([_last_call_ok(t) for t in with_calls]),
        "code_pass_rate_correct": _mean([_last_call_ok(t) for t in with_calls if t.reward_info.get("correct")]),
        "code_pass_rate_incorrect": _mean([_last_call_ok(t) for t in with_calls if not t.reward_info.get("correct")]),
        "code_lines": _mean([float(count_code_lines(t.policy_text)) for t in trajs]),
        "first_call_position": _mean(positions),
        "void_turn_ratio": _mean([1.0 if void_turn(t) else 0.0 for t in trajs]),
        **{f"reward/{name}": _mean([t.reward_info.get("terms", {}).get(name, float("nan")) for t in trajs])
           for name in (trajs[0].reward_info.get("terms", {}) if trajs else {})},
    }


def per_source_metrics(trajs: list[Trajectory], keys: tuple[str, ...] = ("accuracy", "code_ratio")) -> dict[str, float]:
    """``<source>/<key>`` for each problem source when a batch mixes several (the mixed task's
    kinds during training: ``synthetic:easy/code_ratio``); empty for a batch of one source."""
    sources = sorted({t.problem.source for t in trajs})
    if len(sources) < 2:
        return {}
    out = {}
    for src in sources:
        m = rollout_metrics([t for t in trajs if t.problem.source == src])
        out |= {f"{src}/{k}": m[k] for k in keys}
    return out
