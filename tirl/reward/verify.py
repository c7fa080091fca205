"""Answer equivalence: an exact fast path, then math-verify (gold first, both wrapped as LaTeX math).

This is the walking-skeleton verifier; the strict verifier (process pool with hard timeouts,
interval/tuple/set rules, no decimal-for-exact credit) replaces it.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction

_INT = re.compile(r"^[+-]?\d+$")


def _normalise(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\text\{\s*([^}]*)\}", r"\1", s)
    s = s.replace("\\!", "").replace("\\,", "").replace("{,}", "")
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)  # thousands separators
    return s.replace(" ", "")


def _exact(gold: str, answer: str) -> bool | None:
    """True/False when both sides are plain numbers; None when math-verify must decide."""
    g, a = _normalise(gold), _normalise(answer)
    if g == a:
        return True
    try:
        if (_INT.match(g) or "/" in g or "." in g) and (_INT.match(a) or "/" in a or "." in a):
            return Fraction(g) == Fraction(a)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def is_equivalent(gold: str, answer: str, timeout_s: int = 5) -> bool:
    fast = _exact(gold, answer)
    if fast is not None:
        return fast
    from math_verify import parse, verify

    # math-verify's timeouts use signal.alarm, which only works in the main thread.
    t = timeout_s if threading.current_thread() is threading.main_thread() else None
    try:
        g = parse(f"${gold}$", parsing_timeout=t)
        a = parse(f"${answer}$", parsing_timeout=t)
        return bool(g and a and verify(g, a, timeout_seconds=t))
    except Exception:  # a verifier failure is an incorrect answer, never a crashed step
        return False
