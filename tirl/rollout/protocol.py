"""The ToRL tool protocol: when to stop, which code to run, what to insert.

* **Stop** on ```` ```output ```` (what ToRL-trained models write) or on the closing fence of a
  ```` ```python ```` block (models that never saw ToRL's format never write ```` ```output ````).
* **Code**: the last closed ```` ```python ```` block of the current turn (stateless, as in ToRL).
* **Insert** ```` ```output\\n{observation}\\n```\\n```` (only the part the model did not write
  itself), where the observation is stdout, plus the last line of the traceback on error,
  cut to head + "..." + tail characters when long.
"""

from __future__ import annotations

import re
import signal as _signal

from tirl.rollout.engine import StopCondition
from tirl.types import ExecResult

OUTPUT_TRIGGER = "```output"
_LANG = r"```(?:python3?|py)\b[^\n]*\n"  # the opening fence of a Python block
_OPEN = re.compile(_LANG)
_FENCE = re.compile(r"^```", re.M)
_BLOCK = re.compile(_LANG + r"(.*?)^```", re.S | re.M)
EMPTY_OUTPUT = "(no output)"


def find_stop(text: str) -> int | None:
    """Offset just past the first tool trigger in ``text`` (one turn's generated text), or None."""
    ends = []
    i = text.find(OUTPUT_TRIGGER)
    if i >= 0:
        ends.append(i + len(OUTPUT_TRIGGER))
    m = _OPEN.search(text)
    if m:
        close = _FENCE.search(text, m.end())
        if close:
            ends.append(close.end())
    return min(ends) if ends else None


TORL_STOP = StopCondition(find=find_stop, strings=(OUTPUT_TRIGGER, "\n```"))


def extract_code(turn_text: str) -> str | None:
    """The last closed ```python block in one turn's text (None if there is none)."""
    blocks = _BLOCK.findall(turn_text)
    return blocks[-1] if blocks else None


def strip_code(text: str) -> str:
    """``text`` without its closed ```python blocks (where a final answer never counts)."""
    return _BLOCK.sub("", text)


def has_code(text: str) -> bool:
    return _BLOCK.search(text) is not None


def truncate_middle(text: str, head: int, tail: int) -> str:
    """Keep the first ``head`` and last ``tail`` characters around "..." when ``text`` is longer."""
    if len(text) <= head + tail:
        return text
    return text[:head] + "..." + text[len(text) - tail :]


def _error_line(res: ExecResult) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    if lines:
        return lines[-1].strip()
    if res.returncode is not None and res.returncode < 0:
        try:
            name = _signal.Signals(-res.returncode).name
        except ValueError:
            name = f"signal {-res.returncode}"
        return f"Error: the program was killed by {name}"
    return f"Error: the program exited with status {res.returncode}"


def observation(res: ExecResult, head: int = 128, tail: int = 128) -> str:
    """What the model sees of one execution. Never empty; never raises."""
    out = res.stdout.rstrip()
    if res.error is not None:
        err = f"SandboxError: {res.error}"
    elif res.timed_out:
        err = "TimeoutError: the program ran past the time limit and was stopped"
    elif res.returncode != 0:
        err = _error_line(res)
    else:
        err = ""
    body = "\n".join(p for p in (out, err) if p) or EMPTY_OUTPUT
    return truncate_middle(body, head, tail)


def insertion(turn_text: str, obs: str) -> str:
    """The text to append after a turn that ended on a trigger: the output block, minus what the
    model already wrote of it (```` ```output ```` itself, a newline)."""
    sep = "" if turn_text.endswith("\n") else "\n"
    last = list(_BLOCK.finditer(turn_text))
    after_block = turn_text[last[-1].end() :] if last else turn_text
    if OUTPUT_TRIGGER in after_block:
        return f"{sep}{obs}\n```\n"
    return f"{sep}{OUTPUT_TRIGGER}\n{obs}\n```\n"


def print_last_expression(code: str) -> str:
    """If the program ends with a bare expression (not a ``print(...)`` call), print its value
    when it is not None, as a REPL would (verl's recipe wraps the last line in ``print``).
    Code that does not parse is returned unchanged (the sandbox reports the SyntaxError)."""
    import ast

    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        return code
    node = tree.body[-1]
    value = node.value
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "print":
        return code
    lines = code.splitlines(keepends=True)
    head = "".join(lines[: node.lineno - 1]) + lines[node.lineno - 1][: node.col_offset]
    expr = ast.get_source_segment(code, value) or ast.unparse(value)
    tail_line = lines[node.end_lineno - 1][node.end_col_offset :] if node.end_lineno else ""
    rest = tail_line + "".join(lines[node.end_lineno :]) if node.end_lineno else ""
    return f"{head}__tirl_last__ = ({expr})\nif __tirl_last__ is not None:\n    print(__tirl_last__)\n{rest.lstrip(';')}"


def with_replay(history: list[str], code: str) -> str:
    """Run the trajectory's earlier successful blocks first, silently, then ``code`` (Qwen-Math /
    ToRA style state). Their output is discarded and an error in them is ignored."""
    if not history:
        return code
    cells = ",\n".join(repr(h) for h in history)
    return (
        "import contextlib as __tirl_cl, io as __tirl_io\n"
        f"for __tirl_cell in [{cells}]:\n"
        "    try:\n"
        "        with __tirl_cl.redirect_stdout(__tirl_io.StringIO()), __tirl_cl.redirect_stderr(__tirl_io.StringIO()):\n"
        "            exec(compile(__tirl_cell, '<previous cell>', 'exec'), globals())\n"
        "    except BaseException:\n"
        "        pass\n"
        "del __tirl_cl, __tirl_io, __tirl_cell\n" + code
    )
