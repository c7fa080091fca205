"""Rewards: small terms ``(trajectory, cfg) -> float`` combined with weights.

``reward.terms = {name = weight, ...}``; a term with weight 0 is still computed and logged (a
metric). Before the terms run, :func:`score` extracts every trajectory's final answer from the
text the *policy* wrote, outside its code blocks (tool outputs and programs never count), and
checks them all against the references in one batch (``reward_info["correct"]``), numbers
within the tolerance of the problem's benchmark where its grader has one (Minerva: 1%).

Terms:

* ``correct`` — ToRL/ReTool outcome reward: ``reward.correct`` (+1) if the answer is equivalent
  to the reference, else ``reward.incorrect`` (-1; no answer is wrong).
* ``exec_penalty`` — ToRL's penalty for non-executable code (use weight 0.5 for its -0.5): -1 when
  the last executed code block failed. Unlike ToRL's code, a response that ran no code at all is
  not penalised.
* ``overlong`` — DAPO's soft overlong punishment: 0 up to ``max - buffer`` response tokens, then
  falling linearly to -1 at ``max`` (``reward.overlong_max_tokens``, default the rollout budget),
  -1 beyond.
* ``format`` — 1 if a final answer could be extracted (a closed ``\\boxed{}``), else 0.
* ``tool_cost`` — minus the number of tool calls the trajectory made (weight 0.1 = a cost of 0.1
  per call; weight 0, the default in recipes that list it, logs it as a metric).
"""

from __future__ import annotations

from typing import Any, Callable

from tirl.reward.extract import extract_answer, last_boxed
from tirl.reward.verify import Verdict, Verifier, default_verifier, is_equivalent, rel_tol_for
from tirl.rollout.protocol import has_code, strip_code
from tirl.types import TirlError, Trajectory

TermFn = Callable[[Trajectory, Any], float]
REWARD_TERMS: dict[str, TermFn] = {}


def register_term(name: str) -> Callable[[TermFn], TermFn]:
    def deco(fn: TermFn) -> TermFn:
        REWARD_TERMS[name] = fn
        return fn

    return deco


@register_term("correct")
def correct_term(traj: Trajectory, cfg: Any) -> float:
    return cfg.correct if traj.reward_info.get("correct") else cfg.incorrect


@register_term("exec_penalty")
def exec_penalty_term(traj: Trajectory, cfg: Any) -> float:
    return -1.0 if traj.tool_calls and not traj.tool_calls[-1].result.ok else 0.0


@register_term("overlong")
def overlong_term(traj: Trajectory, cfg: Any) -> float:
    max_len, buffer = cfg.overlong_max_tokens, cfg.overlong_buffer
    if not max_len or buffer <= 0:
        return 0.0
    n = traj.response_len
    if n <= max_len - buffer:
        return 0.0
    if n <= max_len:
        return (max_len - buffer - n) / buffer
    return -1.0


@register_term("format")
def format_term(traj: Trajectory, cfg: Any) -> float:
    return 1.0 if traj.reward_info.get("extracted") is not None else 0.0


@register_term("tool_cost")
def tool_cost_term(traj: Trajectory, cfg: Any) -> float:
    return -float(len(traj.tool_calls))


def check_terms(names) -> None:
    unknown = sorted(set(names) - set(REWARD_TERMS))
    if unknown:
        raise TirlError(f"unknown reward terms {unknown}; registered: {sorted(REWARD_TERMS)}")


def void_turn(t: Trajectory) -> bool:
    """SimpleTIR's void turn: a model turn with neither a complete code block nor a final answer."""
    return any(not has_code(s.text) and extract_answer(strip_code(s.text)) is None
               for s in t.segments if s.kind == "model")


def policy_answer(traj: Trajectory) -> str | None:
    return extract_answer(strip_code(traj.policy_text))


def score(trajectories: list[Trajectory], cfg: Any, verifier: Verifier | None = None,
          benchmark: str | None = None) -> None:
    """Fill ``reward`` and ``reward_info`` (extracted, correct, how, terms) in place. Numbers are
    compared by the rule of ``benchmark``, or else of each problem's source (:func:`rel_tol_for`)."""
    check_terms(cfg.terms)
    verifier = verifier or default_verifier()
    answers = [policy_answer(t) for t in trajectories]
    verdicts = verifier.verify_batch([(t.problem.answer, a) for t, a in zip(trajectories, answers)],
                                     rel_tol=[rel_tol_for(benchmark or t.problem.source) for t in trajectories])
    for t, a, v in zip(trajectories, answers, verdicts):
        t.reward_info = {"extracted": a, "correct": v.correct, "how": v.how}
        terms = {name: float(REWARD_TERMS[name](t, cfg)) for name in cfg.terms}
        t.reward_info["terms"] = terms
        t.reward = sum(cfg.terms[name] * value for name, value in terms.items())


__all__ = ["REWARD_TERMS", "Verdict", "Verifier", "extract_answer", "is_equivalent", "last_boxed", "policy_answer",
           "register_term", "score", "void_turn"]
