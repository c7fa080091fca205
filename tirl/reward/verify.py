"""Answer equivalence: strict, fast, never hangs.

``is_equivalent(gold, answer)`` decides in three tiers:

1. **Fast path, in-process** (no sympy): normalised string equality; plain numbers on both sides
   (integers with leading zeros or thousands separators, ``a/b``, ``\\frac{a}{b}``, decimals,
   repeating decimals ``0.1\\overline{6}``; percentages are NOT assumed) compared exactly as
   fractions (integers: 60-100k pairs/s measured).
2. **Exact numeric path, in a worker**: both sides parsed (math-verify's LaTeX parser, gold first);
   when both are numbers without free symbols, equality is decided exactly with sympy, after
   turning the answer's decimals into exact rationals. So ``0.5 = 1/2`` but ``0.3333333 != 1/3``,
   ``3.14159265 != pi`` and ``1/2^99 != 1/2^98`` (math-verify's 6-digit rounding says yes).
3. **math-verify** for everything structural (expressions, equations, intervals with their
   brackets, ordered tuples, unordered sets, matrices, text answers), both sides wrapped as
   ``$...$`` and gold first, its own timeouts off (they use ``signal.alarm``).

Tiers 2-3 run in a pool of worker processes with a hard per-answer timeout: a worker that
does not answer in time is killed and replaced and the answer counts as incorrect.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import select
import subprocess
import sys
import threading
from dataclasses import dataclass
from fractions import Fraction

# ---------------------------------------------------------------------------------------------
# Tier 1: normalisation and plain numbers (pure Python, no sympy)
# ---------------------------------------------------------------------------------------------
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"^(-?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}$")
_FRAC_SHORT = re.compile(r"^(-?)\\[dt]?frac(\d)(\d)$")
_NUM = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")
_RATIO = re.compile(r"^([+-]?\d+)\.?/([+-]?\d+)\.?$")  # 3/4; Minerva's Python-style golds: -3./2
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")
_REPEATING = re.compile(r"^([+-]?)(\d*)\.(\d*)\\overline\{?(\d+)\}?$")  # 0.1\overline{6} = 1/6
# scientific notation, after normalise(): 4.5e33, 1.24E-8, 3\times10^{8}, 3\cdot10^8, 3*10^8, 3x10^{-8}
_SCI = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+))(?:[eE]([+-]?\d+)|(?:\\times|\\cdot|\*|×|x)10\^(?:\{([+-]?\d+)\}|([+-]?\d)))$")


def unwrap_braces(s: str) -> str:
    """``{{x}}`` -> ``x``: brace groups that wrap the whole string (they change nothing in LaTeX)."""
    s = s.strip()
    while len(s) >= 2 and s[0] == "{" and s[-1] == "}":
        depth = 0
        for i, c in enumerate(s):
            depth += {"{": 1, "}": -1}.get(c, 0)
            if depth == 0 and i < len(s) - 1:
                return s
        s = s[1:-1].strip()
    return s


def normalise(s: str) -> str:
    """Remove presentation only: ``$``, spaces, ``\\left``/``\\right``, ``\\!``/``\\,``, a trailing
    period, ``^\\circ``, display-style fraction variants; never changes a value."""
    s = unwrap_braces(s.strip().strip("$").strip())
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "").replace("\\;", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("{,}", ",")
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    s = re.sub(r"\^\{?\\circ\}?$", "", s)
    return s


def _strip_units(s: str) -> str:
    """``12\\text{ cm}`` -> ``12``; ``\\text{12}`` -> ``12`` (a number followed or wrapped by text)."""
    m = _TEXT.fullmatch(s)
    if m:
        return m.group(1).strip()
    return re.sub(r"(?<=[\d}])\\(?:text|mbox|mathrm)\{[^{}]*\}$", "", s)


def _strip_parens(s: str) -> str:
    """``((5))`` -> ``5``: outer parentheses that wrap everything and hold no comma (not a tuple)."""
    while len(s) > 2 and s[0] == "(" and s[-1] == ")" and "," not in s:
        depth = 0
        for i, c in enumerate(s):
            depth += {"(": 1, ")": -1}.get(c, 0)
            if depth == 0 and i < len(s) - 1:
                return s  # the first "(" closes before the end: (a)(b), not one wrapper
        s = s[1:-1]
    return s


def scientific(s: str) -> tuple[Fraction, int] | None:
    """``(exact value, significant figures)`` of a number in scientific notation (``4.5e33``,
    ``1.24E-8``, ``3 \\times 10^{8}``, ``3\\cdot10^8``), or None. ``3.0e8`` states 2 figures."""
    m = _SCI.match(_strip_parens(_strip_units(normalise(s))))
    if not m:
        return None
    mantissa, exp = m.group(1), int(m.group(2) or m.group(3) or m.group(4))
    if abs(exp) > 400:
        return None
    digits = mantissa.lstrip("+-").replace(".", "").lstrip("0") or "0"
    return Fraction(mantissa) * Fraction(10) ** exp, max(len(digits), 1)


def sig_figs_match(gold: tuple[Fraction, int], answer: Fraction, answer_figs: int | None) -> bool:
    """A gold in scientific notation states its significant figures: the answer matches if it gives
    at least as many (an exact number always does) and, rounded to the gold's, equals the gold."""
    value, figs = gold
    if value == 0:
        return answer == 0
    if answer_figs is not None and answer_figs < figs:
        return False
    exp = _floor_log10(abs(value))
    unit = Fraction(10) ** (exp - figs + 1)  # the gold's last stated digit
    q = answer / unit
    rounded = (q + Fraction(1, 2)).__floor__() if q >= 0 else -((-q + Fraction(1, 2)).__floor__())  # half away from 0
    return rounded * unit == value


def _floor_log10(x: Fraction) -> int:
    e = len(str(x.numerator)) - len(str(x.denominator))
    while Fraction(10) ** e > x:
        e -= 1
    while Fraction(10) ** (e + 1) <= x:
        e += 1
    return e


def _figures(s: str) -> int | None:
    """Significant figures an answer states: None for an exact one (an integer, a fraction)."""
    sci = scientific(s)
    if sci is not None:
        return sci[1]
    t = _strip_parens(_strip_units(normalise(s))).lstrip("+-").replace(",", "")
    if "." in t and _NUM.match(t):
        return len(t.replace(".", "").lstrip("0")) or 1
    return None


def digits_number(s: str) -> Fraction | None:
    """The value of a number written in digits (an integer, a decimal, scientific notation): what
    Minerva's grader can ``float()``; None for fractions and anything else."""
    sci = scientific(s)
    if sci is not None:
        return sci[0]
    t = _strip_parens(_strip_units(normalise(s)))
    if _THOUSANDS.match(t):
        t = t.replace(",", "")
    return Fraction(t) if _NUM.match(t) else None


def plain_number(s: str) -> Fraction | None:
    """The exact value of a plain number written in ``s`` (digits, scientific notation, a repeating
    decimal, a fraction), or None if ``s`` is anything else."""
    digits = digits_number(s)
    if digits is not None:
        return digits
    s = _strip_parens(_strip_units(normalise(s)))
    m = _REPEATING.match(s)
    if m:
        sign, whole, fixed, rep = m.groups()
        value = Fraction(int(whole or 0)) + Fraction(int(fixed or 0), 10 ** len(fixed))
        value += Fraction(int(rep), (10 ** len(rep) - 1) * 10 ** len(fixed))
        return -value if sign == "-" else value
    for pat in (_FRAC, _FRAC_SHORT):
        m = pat.match(s)
        if m and int(m.group(3)) != 0:
            value = Fraction(int(m.group(2)), int(m.group(3)))
            return -value if m.group(1) else value
    m = _RATIO.match(s)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    return None


_OPTION = re.compile(r"^\(?([A-E])\)?$")
_OPTION_ANSWER = re.compile(r"^(?:\\text(?:bf)?\{)?\(([A-E])\)\}?(?:[^A-Za-z].*)?$")
_NAMED = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?=(?!=)(.+)$")
_INEQ = re.compile(r"^(?:(?P<lo>[^<>=]+?)(?P<lop><|\\leq|\\le)(?P<v1>[A-Za-z])(?P<hop><|\\leq|\\le)(?P<hi>[^<>=]+)"
                   r"|(?P<v2>[A-Za-z])(?P<op>>|<|\\geq|\\ge|\\leq|\\le)(?P<num>[^<>=]+)"
                   r"|(?P<num2>[^<>=]+?)(?P<op2>>|<|\\geq|\\ge|\\leq|\\le)(?P<v3>[A-Za-z]))$")
_FLIP = {">": "<", "<": ">", "\\geq": "\\leq", "\\ge": "\\le", "\\leq": "\\geq", "\\le": "\\ge"}
# a percentage, after normalise(): 20\%, 20%, 20percent, 20percent (per cent), 20\text{percent}
_PERCENT = re.compile(r"^(.+?)(?:\\%|%|\\(?:text|mbox|mathrm)\{(?:\\%|%|percent)\}|percent)$")
# a list of named items (E_1, E_2; A, C; (A), (C)), after normalise()
_NAME = r"(?:\(?[A-Za-z]\)?(?:_\{?[A-Za-z0-9]+\}?)?)"
_NAMES = re.compile(rf"^{_NAME}(?:(?:,|;|and|,and){_NAME})*$")


def equivalent_form(gold: str, answer: str) -> str:
    """The answer rewritten into the gold's form when one of these named rules applies (else as is):

    * **option letter**: the gold is a letter A-E, the answer that option written with its letter
      in parentheses (``(B)``, ``\\textbf{(B)}\\ 15``) -> the letter;
    * **named value**: the gold has no ``=``, the answer is one variable's name, ``=``, a value
      (``b = m``) -> the value;
    * **inequality as interval**: the gold is an interval, the answer a one-variable inequality
      (``k > -5``, ``-2 < x \\le 3``) -> the interval it describes (``(-5, \\infty)``, ``(-2, 3]``)."""
    g, a = normalise(gold), normalise(answer)
    if _OPTION.match(g):
        m = _OPTION_ANSWER.match(a)
        return m.group(1) if m else answer
    if "=" in g or "\\le" in g or "\\ge" in g or "<" in g or ">" in g:
        return answer
    if g[:1] in "([" and g[-1:] in ")]" and g.count(",") == 1:
        m = _INEQ.match(a)
        if m and m.group("v1"):
            return f"{'(' if m.group('lop') == '<' else '['}{m.group('lo')},{m.group('hi')}{')' if m.group('hop') == '<' else ']'}"
        if m:
            op, num = (m.group("op"), m.group("num")) if m.group("v2") else (_FLIP[m.group("op2")], m.group("num2"))
            closed = op in ("\\ge", "\\geq", "\\le", "\\leq")
            if op in (">", "\\ge", "\\geq"):
                return f"{'[' if closed else '('}{num},\\infty)"
            return f"(-\\infty,{num}{']' if closed else ')'}"
    m = _NAMED.match(a)
    return m.group(1) if m else answer


def percent_verdict(gold: str, answer: str) -> bool | None:
    """**percentage**: a gold ``p\\%`` (a plain number p) is matched by p with any percent spelling
    (``\\%``, ``%``, ``percent``, ``per cent``, ``\\text{ percent}``), by p alone (MATH's graders drop
    the sign) and by p/100; None when the gold is not a percentage or the answer not a number."""
    gp = _PERCENT.match(normalise(gold))
    g = plain_number(gp.group(1)) if gp else None
    if g is None:
        return None
    ap = _PERCENT.match(normalise(answer))
    if ap:
        a = plain_number(ap.group(1))
        return None if a is None else a == g
    a = plain_number(answer)
    return None if a is None else a in (g, g / 100)


def _names(s: str) -> list[str] | None:
    s = normalise(s)
    s = _TEXT.fullmatch(s).group(1).replace(" ", "") if _TEXT.fullmatch(s) else s  # \text{(A), (C)}
    s = re.sub(r"^\\\{(.*)\\\}$", r"\1", s)  # \{E_1, E_2\}: a set of names is the same list
    s = _TEXT.sub(lambda m: m.group(1) if m.group(1).strip() == "and" else m.group(0), s)
    if not _NAMES.match(s):
        return None
    items = re.findall(_NAME, s.replace("and", ","))
    return sorted(re.sub(r"[(){}]", "", x) for x in items)


def names_verdict(gold: str, answer: str) -> bool | None:
    """**named list**: a gold that lists two or more named items (``E_1, E_2``; ``A, C``; ``(A), (C)``)
    is matched by the same names in any order, separated by commas, ``;`` or "and", optionally as
    a set; None when the gold is no such list."""
    g = _names(gold)
    if g is None or len(g) < 2:
        return None
    a = _names(answer)
    return a == g if a is not None else None


def within(gold: Fraction, answer: Fraction, rel_tol: float) -> bool:
    """Minerva's numeric rule: equal, or apart by less than ``rel_tol`` of the two values' mean."""
    return answer == gold or abs(answer - gold) < Fraction(rel_tol) * abs(answer + gold) / 2


_BASE = re.compile(r"^([0-9A-Z]*\d[0-9A-Z]*)_\{?(\d+)\}?$")  # 52_8, 1011_{2}, 2A7_{16}


def base_verdict(gold: str, answer: str) -> bool | None:
    """**number in a base**: a gold ``52_8`` is matched by the same digits in the same base
    (``52_{8}``) or by the digits alone (the question names the base), never by another base's
    digits (math-verify reads ``52_9`` as ``52_8``); None when the gold is no such number."""
    g = _BASE.match(normalise(gold))
    if not g:
        return None
    a = normalise(answer)
    m = _BASE.match(a)
    if m:
        return m.groups() == g.groups()
    return a == g.group(1) if re.fullmatch(r"[0-9A-Z]+", a) else None


def _rule_verdict(gold: str, answer: str) -> bool | None:
    """The named rules that decide a pair outright (percentage, named list, base), else None."""
    for rule in (percent_verdict, names_verdict, base_verdict):
        v = rule(gold, answer)
        if v is not None:
            return v
    return None


def fast_verdict(gold: str, answer: str, rel_tol: float | None = None) -> bool | None:
    """True/False when tier 1 can decide, None when the pool must. ``rel_tol``: the benchmark's
    relative tolerance for a gold written in digits (:data:`BENCHMARK_REL_TOL`), else exact."""
    answer = equivalent_form(gold, answer)
    if normalise(gold) == normalise(answer):
        return True
    ruled = _rule_verdict(gold, answer)
    if ruled is not None:
        return ruled
    g, a = plain_number(gold), plain_number(answer)
    if g is not None and a is not None:
        if rel_tol is not None and digits_number(gold) is not None:
            return within(g, a, rel_tol)
        sci = scientific(gold)
        return sig_figs_match(sci, a, _figures(answer)) if sci is not None else g == a
    return None


# ---------------------------------------------------------------------------------------------
# Tiers 2-3: in a worker process
# ---------------------------------------------------------------------------------------------
def _exactify(expr):
    import sympy

    return expr.xreplace({f: sympy.Rational(str(f)) for f in expr.atoms(sympy.Float)})


def _numeric(x):
    import sympy

    return isinstance(x, sympy.Expr) and not x.free_symbols and x.is_number


def _exact_value(expr) -> Fraction:
    """A numeric sympy expression as an exact fraction (irrationals to 60 digits)."""
    import sympy

    value = _exactify(expr)
    exact = value if value.is_Rational else sympy.Rational(str(sympy.N(value, 60)))
    return Fraction(int(exact.p), int(exact.q))


def slow_verdict(gold: str, answer: str, rel_tol: float | None = None) -> bool:
    """Tiers 2-3. Runs in a worker; may be slow on pathological input (the pool bounds it)."""
    answer = equivalent_form(gold, answer)
    ruled = _rule_verdict(gold, answer)
    if ruled is not None:
        return ruled
    from math_verify import parse, verify

    sci = scientific(gold)
    tol_gold = digits_number(gold) if rel_tol is not None else None

    def number_matches(value: Fraction) -> bool:  # the gold is a number with a stated precision or tolerance
        return within(tol_gold, value, rel_tol) if tol_gold is not None else sig_figs_match(sci, value, _figures(answer))

    plain = plain_number(answer)
    if (sci is not None or tol_gold is not None) and plain is not None:
        return number_matches(plain)
    a = parse(f"${unwrap_braces(answer)}$", parsing_timeout=None)
    if sci is not None or tol_gold is not None:  # math-verify would read the e of 3e8 as Euler's number
        return bool(a) and _numeric(a[0]) and number_matches(_exact_value(a[0]))
    g = parse(f"${unwrap_braces(gold)}$", parsing_timeout=None)
    if not g or not a:
        return False
    g0, a0 = g[0], a[0]
    if _numeric(g0) and _numeric(a0):
        # a number: the answer must equal the gold exactly (decimals on both sides taken at face
        # value: 0.35 is 35/100, and 0.349 or 0.3 is not it)
        return _exactly_equal(g0, a0)
    entries = _numeric_entries(g0, a0)
    if entries is not None:  # a tuple, interval or set of numbers: each entry exactly
        return entries
    return bool(verify(g, a, timeout_seconds=None))


def _exactly_equal(g, a) -> bool:
    import sympy

    g, a = _exactify(g), _exactify(a)
    return g == a or (g.is_finite is not False and a.is_finite is not False and bool(sympy.simplify(g - a) == 0))


def _numeric_entries(g, a) -> bool | None:
    """Exact comparison of two tuples / intervals / finite sets whose entries are all numbers
    (math-verify would round each entry to 6 digits); None when either side is anything else.
    A pair ``(a, b)`` parses as an open interval on both sides alike."""
    import sympy

    def parts(x):
        if isinstance(x, sympy.Tuple):
            return "tuple", list(x.args)
        if isinstance(x, sympy.Interval):
            return f"interval{bool(x.left_open):d}{bool(x.right_open):d}", [x.start, x.end]
        if isinstance(x, sympy.FiniteSet):
            return "set", sorted(x.args, key=lambda v: float(sympy.N(v)) if _numeric(v) else 0.0)
        return None, None

    (kg, eg), (ka, ea) = parts(g), parts(a)
    if kg is None or ka is None or not all(_numeric(v) for v in eg + ea):
        return None
    if kg != ka or len(eg) != len(ea):
        return False
    return all(_exactly_equal(x, y) for x, y in zip(eg, ea))


@dataclass
class Verdict:
    correct: bool
    how: str  # "fast" (tier 1) | "slow" (tiers 2-3) | "timeout" | "error: ..." | "no answer"


class _Worker:
    """One ``python -m tirl.reward.worker`` process (a plain subprocess: no dependence on the
    caller's ``__main__``, unlike multiprocessing's spawn)."""

    def __init__(self):
        self.start()

    def start(self) -> None:
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "tirl.reward.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True, bufsize=1)
        if self._readline(120) != '"ready"':
            self.close()
            raise RuntimeError("verifier worker failed to start (python -m tirl.reward.worker)")

    def _readline(self, timeout: float) -> str | None:
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            return None
        line = self.proc.stdout.readline()
        return line.strip() if line else None

    def ask(self, gold: str, answer: str, timeout: float, rel_tol: float | None = None) -> Verdict:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps([gold, answer, rel_tol]) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.restart()
            return Verdict(False, "error: verifier worker died")
        line = self._readline(timeout)
        if line is None:  # hung on a pathological input (or died): kill it; the answer is incorrect
            self.restart()
            return Verdict(False, "timeout")
        status, value = json.loads(line)
        return Verdict(bool(value), "slow") if status == "ok" else Verdict(False, f"error: {value}")

    def restart(self) -> None:
        self.close()
        self.start()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f and f.close()
            except OSError:
                pass


class Verifier:
    """Batched, thread-safe answer checking with a hard per-answer timeout.

    Workers (fresh interpreters, so safe beside torch and threads) start on the first answer
    that needs them. ``verify_batch`` runs the fast path inline and spreads the rest over the workers."""

    def __init__(self, workers: int = 2, timeout_s: float = 5.0):
        self.n_workers, self.timeout_s = workers, timeout_s
        self._workers: queue.Queue[_Worker] | None = None
        self._lock = threading.Lock()
        self.stats = {"fast": 0, "slow": 0, "timeouts": 0, "errors": 0}

    def _pool(self) -> queue.Queue[_Worker]:
        with self._lock:
            if self._workers is None:
                q: queue.Queue[_Worker] = queue.Queue()
                starters = [threading.Thread(target=lambda: q.put(_Worker())) for _ in range(self.n_workers)]
                for t in starters:
                    t.start()
                for t in starters:
                    t.join()
                if q.qsize() == 0:
                    raise RuntimeError("no verifier worker could start")
                self._workers = q
            return self._workers

    def verify(self, gold: str, answer: str | None, fast: bool = True, rel_tol: float | None = None) -> Verdict:
        """``fast=False`` skips tier 1 (the self-check uses it to exercise the parser on every gold).
        ``rel_tol``: the benchmark's numeric tolerance (:func:`rel_tol_for`); None = exact."""
        if answer is None:
            return Verdict(False, "no answer")
        quick = fast_verdict(gold, answer, rel_tol) if fast else None
        if quick is not None:
            self.stats["fast"] += 1
            return Verdict(quick, "fast")
        pool = self._pool()
        worker = pool.get()
        try:
            v = worker.ask(gold, answer, self.timeout_s, rel_tol)
        finally:
            pool.put(worker)
        self.stats["slow" if v.how == "slow" else "timeouts" if v.how == "timeout" else "errors"] += 1
        return v

    def verify_batch(self, pairs: list[tuple[str, str | None]], fast: bool = True,
                     rel_tol: float | None | list[float | None] = None) -> list[Verdict]:
        """``rel_tol``: one tolerance for all pairs or one per pair (None = exact)."""
        tols = rel_tol if isinstance(rel_tol, list) else [rel_tol] * len(pairs)
        if len(tols) != len(pairs):
            raise ValueError(f"verify_batch: {len(pairs)} pairs but {len(tols)} tolerances")
        out: list[Verdict | None] = [None] * len(pairs)
        slow = []
        for i, (g, a) in enumerate(pairs):
            if a is None:
                out[i] = Verdict(False, "no answer")
                continue
            quick = fast_verdict(g, a, tols[i]) if fast else None
            if quick is None:
                slow.append(i)
            else:
                self.stats["fast"] += 1
                out[i] = Verdict(quick, "fast")
        if slow:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=self.n_workers) as ex:
                for i, v in zip(slow, ex.map(lambda i: self.verify(*pairs[i], fast=False, rel_tol=tols[i]), slow)):
                    out[i] = v
        return out  # type: ignore[return-value]

    async def averify_batch(self, pairs: list[tuple[str, str | None]],
                            rel_tol: float | None | list[float | None] = None) -> list[Verdict]:
        return await asyncio.get_running_loop().run_in_executor(None, lambda: self.verify_batch(pairs, rel_tol=rel_tol))

    def close(self) -> None:
        if self._workers is not None:
            while not self._workers.empty():
                self._workers.get().close()
            self._workers = None

    def __enter__(self) -> "Verifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Benchmarks whose own grader compares numbers within a relative tolerance. Minerva's OCWCourses
# grader (the paper's appendix; lm-evaluation-harness ``ocw_courses.py`` and DeepSeek-Math's
# ``ocwcourses_eval_utils.py``, ``numeric_equality(threshold=0.01)``) accepts a numeric answer
# to a gold written in digits when they differ by less than 1% of their mean.
BENCHMARK_REL_TOL: dict[str, float] = {"minerva_math": 0.01}


def rel_tol_for(source: str) -> float | None:
    """The numeric tolerance of a problem's benchmark: its name, ``data_source`` or the source a
    data file gives (``minerva``, ``minerva_math``, ``.../minerva_math/test.jsonl`` -> 0.01); every
    other benchmark compares exactly (None)."""
    key = (source or "").strip().lower()
    if "minerva" in key:
        key = "minerva_math"
    return BENCHMARK_REL_TOL.get(key)


_default: Verifier | None = None


def default_verifier() -> Verifier:
    global _default
    if _default is None:
        _default = Verifier()
    return _default


def is_equivalent(gold: str, answer: str) -> bool:
    """One pair through the shared default verifier (for a different timeout, make a ``Verifier``)."""
    return default_verifier().verify(gold, answer).correct
