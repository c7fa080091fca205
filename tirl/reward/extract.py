"""Final-answer extraction from the text the policy wrote.

* the last **complete** ``\\boxed{...}`` / ``\\fbox{...}`` (braces matched, nesting allowed), or
  ``\\boxed x`` (a single token after a space); an unclosed box is no answer;
* ReTool's wrapper: if the text has ``<answer>...</answer>`` blocks, only the last one counts
  (its last box, or, without a box, its plain content);
* callers pass only policy-written text with code blocks removed: tool outputs and programs
  never provide an answer.
"""

from __future__ import annotations

import re

_BOX = re.compile(r"\\(?:boxed|fbox)\s*(\{|\s+(?=[^\s{]))")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed x``."""
    found = None
    for m in _BOX.finditer(text):
        if m.group(1) == "{":
            depth, i = 1, m.end()
            while i < len(text) and depth:
                c = text[i]
                if c == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
                    i += 2  # an escaped brace \{ \} does not open or close
                    continue
                depth += {"{": 1, "}": -1}.get(c, 0)
                i += 1
            if depth == 0:
                found = text[m.end() : i - 1].strip()
        else:  # \boxed 5 : one token, up to whitespace, $ or end
            tok = re.match(r"[^\s$]+", text[m.end() :])
            if tok:
                found = tok.group(0).rstrip(".,;")
    return found


def extract_answer(text: str) -> str | None:
    """The final answer in ``text`` (see module docstring), or None."""
    blocks = _ANSWER.findall(text)
    if blocks:
        inner = blocks[-1]
        boxed = last_boxed(inner)
        if boxed is not None:
            return boxed or None
        plain = inner.strip()
        return plain or None
    boxed = last_boxed(text)
    return boxed if boxed else None
