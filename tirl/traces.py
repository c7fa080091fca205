"""Synthetic cold-start traces for the embedded arithmetic task (ReTool's stage 1, in miniature).

Two styles over the same problems, as chat ``messages`` rows that ``tirl sft`` reads:

* ``code``: a sentence of reasoning, a ```` ```python ```` program, its **real** sandbox output
  inserted exactly as the rollout inserts it (the ToRL protocol's ```` ```output ```` block, the
  same truncation), then a conclusion with ``\\boxed{answer}``. A trace is kept only if the
  program ran and printed the exact answer;
* ``text``: the same problems solved in words, the way a text-only SFT set is written: a
  decomposition of the product into partial products, each exact, the sum, and the boxed answer;
* ``mixed`` (issue #23): the mixed task's problems (``easy`` sums, differences and one-digit
  products, and the products), written with code on a fraction ``code_fraction`` of them chosen
  at random *independently of the kind*, in words otherwise (an easy one in one line). The traces
  never show when code helps; RL has to find it.

Phrasing (sentences, variable names, program shapes, decompositions) is drawn per trace from a
seeded ``random.Random``, so the model cannot just memorise one template; the same seed gives the
same traces everywhere.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Literal

from tirl.config import Config
from tirl.data import arithmetic_problems
from tirl.rollout import protocol as proto
from tirl.rollout.protocol import TORL
from tirl.sandbox import Sandbox, make_sandbox
from tirl.types import Problem, TirlError

Style = Literal["code", "text", "mixed"]

_OPENERS = [
    "We need the product of {a} and {b}.", "The answer is {a} times {b}.", "This asks for {a} \\times {b}.",
    "To solve this, multiply {a} by {b}.", "The total is {a} multiplied by {b}.", "We have to compute {a} \\cdot {b}.",
]
_TO_CODE = [
    "Let me compute it with Python.", "I will let Python do the multiplication.", "A short program gives the exact value.",
    "Let's run a quick calculation.", "I'll check this with code.", "Python can compute this exactly.",
]
_CONCLUDE = [
    "So the answer is \\boxed{{{ans}}}.", "The program prints {ans}, so the answer is \\boxed{{{ans}}}.",
    "Therefore the result is \\boxed{{{ans}}}.", "The output is {ans}. The answer is \\boxed{{{ans}}}.",
    "Hence the total is \\boxed{{{ans}}}.", "So {a} \\times {b} = {ans}, and the answer is \\boxed{{{ans}}}.",
]
_NAMES = [("a", "b"), ("x", "y"), ("m", "n"), ("first", "second"), ("count", "size"), ("p", "q")]


def _operands(problem: Problem) -> tuple[int, int]:
    """The two factors of a synthetic product problem (checked against its answer)."""
    nums = [int(x) for x in re.findall(r"\d+", problem.problem)]
    for i in range(len(nums)):
        for j in range(i + 1, len(nums)):
            if nums[i] * nums[j] == int(problem.answer):
                return nums[i], nums[j]
    raise TirlError(f"problem {problem.id!r} is not a product of two numbers in its text: {problem.problem!r}")


def _program(rng: random.Random, a: int, b: int) -> str:
    u, v = rng.choice(_NAMES)
    shape = rng.randrange(5)
    if shape == 0:
        return f"print({a} * {b})"
    if shape == 1:
        return f"{u} = {a}\n{v} = {b}\nprint({u} * {v})"
    if shape == 2:
        return f"{u} = {a}\n{v} = {b}\nresult = {u} * {v}\nprint(result)"
    if shape == 3:
        return f"from math import prod\nprint(prod([{a}, {b}]))"
    return f"def multiply({u}, {v}):\n    return {u} * {v}\n\nprint(multiply({a}, {b}))"


def code_response(rng: random.Random, a: int, b: int, run: Sandbox, head: int = 128, tail: int = 128) -> tuple[str, str]:
    """``(response, observation)``: reasoning, a program, its real output, the boxed answer."""
    code = _program(rng, a, b)
    turn = f"{rng.choice(_OPENERS).format(a=a, b=b)} {rng.choice(_TO_CODE)}\n```python\n{code}\n```"
    obs = proto.observation(run.run(code), head, tail)
    inserted = TORL.insertion(turn, obs)  # byte for byte what the rollout inserts after this turn
    ans = a * b
    return turn + inserted + rng.choice(_CONCLUDE).format(a=a, b=b, ans=ans), obs


def text_response(rng: random.Random, a: int, b: int) -> str:
    """Long multiplication in words: ``b`` split into place values (or ``a``), partial products, sum."""
    if rng.random() < 0.5:
        a, b = b, a
    parts = [int(d) * 10**k for k, d in enumerate(reversed(str(b))) if d != "0"][::-1]
    prods = [a * p for p in parts]
    lines = [rng.choice(_OPENERS).format(a=a, b=b),
             rng.choice(["Split {b} by place value: {split}.", "Write {b} = {split}.", "Break {b} into {split}."]).format(
                 b=b, split=" + ".join(map(str, parts)))]
    for p, q in zip(parts, prods):
        lines.append(rng.choice(["{a} \\times {p} = {q}.", "{a} times {p} is {q}.", "Then {a} \\cdot {p} = {q}."]).format(a=a, p=p, q=q))
    total = sum(prods)
    lines.append(rng.choice(["Adding them: {s} = {t}.", "The sum is {s} = {t}.", "Add the partial products: {s} = {t}."]).format(
        s=" + ".join(map(str, prods)), t=total))
    lines.append(rng.choice(_CONCLUDE).format(a=a, b=b, ans=total))
    return "\n".join(lines)


_EASY = re.compile(r"(\d+) (\+|-|\\times) (\d+)")
_EASY_OPENERS = ["We need {e}.", "This asks for {e}.", "The value of {e} is what we want.", "We compute {e}."]
_EASY_CODE = {"+": "{a} + {b}", "-": "{a} - {b}", "\\times": "{a} * {b}"}


def easy_code_response(rng: random.Random, p: Problem, run: Sandbox) -> tuple[str, str]:
    a, op, b = _EASY.search(p.problem).groups()
    u, v = rng.choice(_NAMES)
    expr = _EASY_CODE[op].format(a=a, b=b)
    code = rng.choice([f"print({expr})", f"{u} = {a}\n{v} = {b}\nprint({_EASY_CODE[op].format(a=u, b=v)})"])
    turn = f"{rng.choice(_EASY_OPENERS).format(e=f'{a} {op} {b}')} {rng.choice(_TO_CODE)}\n```python\n{code}\n```"
    obs = proto.observation(run.run(code), 128, 128)
    return turn + TORL.insertion(turn, obs) + f"So the answer is \\boxed{{{p.answer}}}.", obs


def easy_text_response(rng: random.Random, p: Problem) -> str:
    a, op, b = _EASY.search(p.problem).groups()
    return rng.choice(["{a} {op} {b} = {ans}. So the answer is \\boxed{{{ans}}}.",
                       "We have {a} {op} {b} = {ans}, so the answer is \\boxed{{{ans}}}.",
                       "{a} {op} {b} is {ans}. The answer is \\boxed{{{ans}}}."]).format(a=a, op=op, b=b, ans=p.answer)


def _response(style: str, p: Problem, rng: random.Random, sandbox: Sandbox | None) -> str:
    """One trace's response; a program's printed value is checked against the answer."""
    easy = p.source == "synthetic:easy"
    if style == "text":
        return easy_text_response(rng, p) if easy else text_response(rng, *_operands(p))
    response, obs = easy_code_response(rng, p, sandbox) if easy else code_response(rng, *_operands(p), sandbox)
    if obs.strip() != p.answer:
        raise TirlError(f"trace {p.id}: the program printed {obs!r}, expected {p.answer} (is the sandbox working?)")
    return response


def make_traces(n: int, style: Style, seed: int = 0, start: int = 0, sandbox: Sandbox | None = None,
                system: str | None = None, template: str = "{problem}", difficulty: int = 1,
                code_fraction: float = 0.3) -> list[dict]:
    """``n`` SFT rows (``messages``, plus ``answer``, ``id``, ``kind`` and ``uses_code``) on problems
    ``start .. start+n-1`` of ``seed``: products (``code``/``text``) or the mixed task (``mixed``:
    exactly ``round(code_fraction * n)`` of them, drawn at random whatever their kind, with code).
    Code needs a sandbox (the outputs are real)."""
    if style in ("code", "mixed") and sandbox is None:
        raise TirlError(f"{style} traces run their programs: pass a sandbox")
    kinds = ("easy", "product") if style == "mixed" else ("product",)
    problems = arithmetic_problems(n, seed=seed, difficulty=difficulty, kinds=kinds, start=start)
    with_code = set(random.Random(f"traces:mixed:{seed}:{start}").sample(range(n), round(code_fraction * n))) \
        if style == "mixed" else set(range(n)) if style == "code" else set()
    rows = []
    for i, p in enumerate(problems):
        rng = random.Random(f"trace:{style}:{p.id}")
        response = _response("code" if i in with_code else "text", p, rng, sandbox)
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": template.format(problem=p.problem)}, {"role": "assistant", "content": response}]
        rows.append({"id": p.id, "answer": p.answer, "kind": p.source.split(":", 1)[1], "uses_code": i in with_code,
                     "messages": msgs})
    return rows


def traces_for(cfg: Config, style: Style, n: int, seed: int, start: int = 0) -> list[dict]:
    """:func:`make_traces` with a recipe's prompt, difficulty and sandbox (opened for the code style, then closed)."""
    sandbox = make_sandbox(cfg.sandbox) if style in ("code", "mixed") else None
    try:
        return make_traces(n, style, seed=seed, start=start, sandbox=sandbox, system=cfg.prompt.system,
                           template=cfg.prompt.template, difficulty=cfg.data.difficulty,
                           code_fraction=cfg.sft.code_fraction)
    finally:
        if sandbox is not None:
            sandbox.close()


def write_traces(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
