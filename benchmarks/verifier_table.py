"""The verifier's labelled table of real-format pairs: tirl vs plain math-verify (precision/recall).

    .venv/bin/python benchmarks/verifier_table.py            # score tests/verifier_table.jsonl
    .venv/bin/python benchmarks/verifier_table.py --build    # rebuild it from ../shared/data/eval

The table (issue #24) pairs real golds of the seven benchmarks (AIME24/25, AMC23, GSM8K, MATH500,
OlympiadBench, Minerva) with responses written as ToRL (```python / ```output), ReTool (<code>,
<interpreter>, <answer>), chat (<tool_call> / tool messages) and plain chain-of-thought models write
them. Each gold gets one right and one wrong answer, and each label follows from how the answer was
made, never from a verifier: a right answer is the gold rewritten without changing its value
(another LaTeX spelling, an equivalent form, units, scientific notation; for Minerva, a number within
its grader's 1%), a wrong one changes it (a digit, a sign, an exponent, a rounding, a bracket, the
order of a pair). A class of its own puts a ``\\boxed{}`` in the tool output. Rows:
``{bench, id, gold, response, label, kind, why}``.

"plain math-verify" = ``verify(parse(gold), parse(response))`` on the whole response, math-verify's
default extraction and timeouts (what most trainers call). tirl = the reward path: tool output and
programs removed, the last box of the policy's text, :class:`tirl.reward.Verifier` with the
benchmark's numeric rule (:func:`tirl.reward.verify.rel_tol_for`).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import sys
import time
import warnings
from collections import defaultdict
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from pathlib import Path

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "tests" / "verifier_table.jsonl"
sys.path.insert(0, str(ROOT))

# ---------------------------------------------------------------------------------------------
# Responses in the protocols' formats
# ---------------------------------------------------------------------------------------------
def torl(answer: str, out: str = "", code: str = "print(result)") -> str:
    return (f"Let me compute this with Python.\n```python\n{code}\n```\n```output\n{out}\n```\n"
            f"So the final answer is $\\boxed{{{answer}}}$.")


def retool(answer: str, out: str = "", code: str = "print(result)") -> str:
    return (f"I will verify the computation.\n<code>\n```python\n{code}\n```\n</code>\n<interpreter>\n{out}\n"
            f"</interpreter>\nThe result confirms it.\n<answer>\n\\boxed{{{answer}}}\n</answer>")


def chat(answer: str, out: str = "", code: str = "print(result)") -> str:
    call = json.dumps({"name": "code_interpreter", "arguments": {"code": code}})
    return (f"<tool_call>\n{call}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{out}\n"
            f"</tool_response><|im_end|>\n<|im_start|>assistant\nThe answer is $\\boxed{{{answer}}}$.")


def cot(answer: str, out: str = "", code: str = "") -> str:
    return f"Working through the problem step by step gives the value below.\nTherefore, the answer is $\\boxed{{{answer}}}$."


FORMATS = [torl, retool, chat, cot]

# ---------------------------------------------------------------------------------------------
# Right and wrong answers, by the gold's kind
# ---------------------------------------------------------------------------------------------
_SCI = re.compile(r"^([+-]?\d+(?:\.\d*)?)e([+-]?\d+)$")


def fmt(x: Fraction, figs: int) -> str:
    """``x`` to ``figs`` significant figures as a plain decimal string (``60``, never ``6e+01``)."""
    d = Decimal(x.numerator) / Decimal(x.denominator)
    return format(d.quantize(Decimal(10) ** (d.adjusted() - figs + 1), rounding=ROUND_HALF_UP), "f")


def sci_tex(mantissa: str, exp: int) -> str:
    return f"{mantissa} \\times 10^{{{exp}}}"


def kind_of(gold: str) -> str:
    from tirl.reward.verify import digits_number, scientific

    g = gold.strip().strip("$").strip()
    if scientific(g) is not None and _SCI.match(g.replace(" ", "")):
        return "sci-notation"
    if "\\%" in g:
        return "percent"
    if digits_number(g) is not None:
        return "integer" if re.fullmatch(r"[+-]?\d+", g.replace(",", "")) else "decimal"
    if re.match(r"^(\\left)?[(\[].*,.*(\\right)?[)\]]$", g.replace(" ", "")):
        return "interval-tuple"
    if re.fullmatch(r"\\text\{\([A-E]\)\}", g) or re.fullmatch(r"\\text\{[A-Za-z ]+\}", g):
        return "text-option"
    return "expression"


def bump_digit(s: str, rng: random.Random) -> str | None:
    """Change one digit of ``s`` (never into a leading zero)."""
    spots = [m.start() for m in re.finditer(r"\d", s)]
    if not spots:
        return None
    i = rng.choice(spots)
    d = int(s[i])
    new = (d + rng.choice([1, 2, 3])) % 10
    if new == 0 and (i == 0 or not s[i - 1].isdigit()) and i + 1 < len(s) and s[i + 1].isdigit():
        new = 1 if d != 1 else 2
    return s[:i] + str(new) + s[i + 1:]


def integer_pair(g: str, rng: random.Random) -> tuple[str, str, str, str]:
    n = int(g.replace(",", ""))
    right = rng.choice([
        (f"{n:,}" if abs(n) >= 1000 else f"{n}", "thousands separator" if abs(n) >= 1000 else "the integer"),
        (f"{n} \\text{{ units}}", "unit text after the number"),
        (f"n = {n}", "named value: the variable's name and ="),
        (f"{n}.0", "a decimal with a zero fraction"),
    ])
    wrong = rng.choice([(str(n + 1), "off by one"), (str(n - 1), "off by one"),
                        (str(n * 10), "a digit too many"), (str(-n) if n else "1", "the sign")])
    return right[0], right[1], wrong[0], wrong[1]


def decimal_pair(g: str, minerva: bool, rng: random.Random) -> tuple[str, str, str, str]:
    from tirl.reward.verify import digits_number

    v = digits_number(g)
    plain = re.sub(r"\\text\{[^}]*\}|\^\{?\\circ\}?", "", g.strip().strip("$")).strip()
    if minerva:
        right = (fmt(v * Fraction(1004, 1000), 5), "within Minerva's 1% (0.4% off)")
        wrong = (fmt(v * Fraction(103, 100), 4), "3% off: outside Minerva's 1%")
    else:
        right = (plain + "0", "a trailing zero") if "." in plain else (plain, "the decimal")
        figs = len(plain.replace(".", "").replace("-", "").lstrip("0"))
        wrong = (fmt(v, max(figs - 1, 1)), "rounded to one figure fewer: a decimal gold is exact")
        if Fraction(wrong[0]) == v:
            wrong = (fmt(v * Fraction(11, 10), max(figs, 2)), "10% off")
    return right[0], right[1], wrong[0], wrong[1]


def sci_pair(g: str, rng: random.Random) -> tuple[str, str, str, str]:
    m = _SCI.match(g.replace(" ", ""))
    mant, exp = m.group(1), int(m.group(2))
    right = rng.choice([
        (sci_tex(mant, exp), "\\times 10^{} form"),
        (f"{mant} \\cdot 10^{{{exp}}} \\text{{ m}}", "\\cdot 10^{} form with units"),
        (sci_tex(f"{float(Fraction(mant) * Fraction(1003, 1000)):.4g}", exp), "4 figures within Minerva's 1% (0.3% off)"),
        (f"{mant}E{exp}", "capital E"),
    ])
    wrong = rng.choice([
        (sci_tex(mant, exp + 1), "the exponent off by one"),
        (sci_tex(f"{float(Fraction(mant) * Fraction(104, 100)):.3g}", exp), "4% off"),
        (sci_tex(mant, -exp) if exp else sci_tex(mant, 1), "the exponent's sign"),
    ])
    return right[0], right[1], wrong[0], wrong[1]


def reformat(g: str) -> str:
    s = g.strip().strip("$").strip()
    s = s.replace("\\frac", "\\dfrac")
    s = re.sub(r",(?!\\!|\s*\d{3}\b)", ", ", s)
    return s if s != g.strip().strip("$").strip() else f"{{{s}}}"


def equivalent_rewrite(g: str) -> tuple[str, str] | None:
    """A value-preserving rewrite that changes more than the spelling, where one is known."""
    s = g.strip().strip("$").strip()
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", s)
    if m:
        p, q = int(m.group(2)), int(m.group(3))
        den = q
        while den % 2 == 0:
            den //= 2
        while den % 5 == 0:
            den //= 5
        if den == 1:
            return f"{m.group(1)}{Fraction(p, q).numerator / Fraction(p, q).denominator:g}", "the fraction's exact decimal"
        return f"{m.group(1)}\\frac{{{3 * p}}}{{{3 * q}}}", "the fraction unreduced"
    m = re.fullmatch(r"(\d+)\\sqrt\{(\d+)\}", s)
    if m:
        return f"\\sqrt{{{int(m.group(1)) ** 2 * int(m.group(2))}}}", "the coefficient moved under the root"
    m = re.fullmatch(r"(-?\d+)\s*([+-])\s*(\d*\\sqrt\{\d+\})", s)
    if m:
        sign = "" if m.group(2) == "+" else "-"
        return f"{sign}{m.group(3)} + {m.group(1)}", "the sum commuted"
    return None


def expression_pair(g: str, rng: random.Random) -> tuple[str, str, str, str] | None:
    wrong = bump_digit(g.strip().strip("$"), rng)
    if wrong is None:
        return None
    rewrite = equivalent_rewrite(g)
    if rewrite and rng.random() < 0.8:
        return rewrite[0], rewrite[1], wrong, "one digit changed"
    return reformat(g), "the same expression in other LaTeX (dfrac, spacing, braces)", wrong, "one digit changed"


def interval_pair(g: str, rng: random.Random) -> tuple[str, str, str, str] | None:
    s = g.strip().strip("$").strip()
    m = re.fullmatch(r"\(\s*(-?\d+)\s*,\s*\\infty\s*\)", s)
    if m:
        right = (f"x > {m.group(1)}", "inequality as interval")
    elif (m := re.fullmatch(r"\(\s*-\\infty\s*,\s*(-?\d+)\s*\]", s)):
        right = (f"{m.group(1)} \\ge x", "inequality as interval, the variable on the right")
    elif (m := re.fullmatch(r"\(\s*-\\infty\s*,\s*(-?\d+)\s*\)", s)):
        right = (f"x < {m.group(1)}", "inequality as interval")
    elif s.startswith("(") and s.endswith(")") and "\\cup" not in s and ")," not in s:
        right = ("\\left(" + s[1:-1].replace(",", ", ") + "\\right)", "spacing and \\left( \\right)")
    else:
        right = (s.replace(",", ", "), "spacing")
    if s.startswith("(") and s.endswith("]"):
        wrong = ("[" + s[1:], "another bracket")
    elif s.startswith("(") and s.endswith(")") and s.count(",") == 1 and "\\infty" not in s:
        a, b = s[1:-1].split(",")
        if a.strip() == b.strip():
            return None
        wrong = (f"({b.strip()}, {a.strip()})", "the pair reversed")
    else:
        w = bump_digit(s, rng)
        if w is None:
            return None
        wrong = (w, "one digit changed")
    return right[0], right[1], wrong[0], wrong[1]


def text_pair(g: str, rng: random.Random) -> tuple[str, str, str, str]:
    m = re.fullmatch(r"\\text\{\(([A-E])\)\}", g)
    if m:
        other = "ABCDE"[("ABCDE".index(m.group(1)) + 1) % 5]
        return f"\\textbf{{({m.group(1)})}}", "option letter with its parentheses", other, "another option"
    word = re.fullmatch(r"\\text\{([A-Za-z ]+)\}", g).group(1)
    return word, "the word without \\text", word[::-1] if word[::-1] != word else word + "s", "another word"


def percent_pair(g: str, rng: random.Random) -> tuple[str, str, str, str]:
    num = re.sub(r"[^\d.]", "", g)
    return f"{num} percent", "percentage spelled 'percent'", f"{int(float(num)) + 1}\\%", "another percentage"


def pairs_for(bench: str, gold: str, rng: random.Random):
    kind = kind_of(gold)
    if kind == "integer" and bench != "minerva_math":
        return kind, integer_pair(gold.strip().strip("$"), rng)
    if kind == "integer":  # Minerva compares every number written in digits within 1%
        return kind, decimal_pair(gold, True, rng)
    if kind == "decimal":
        return kind, decimal_pair(gold, bench == "minerva_math", rng)
    if kind == "sci-notation":
        return kind, sci_pair(gold, rng)
    if kind == "interval-tuple":
        return kind, interval_pair(gold, rng)
    if kind == "text-option":
        return kind, text_pair(gold, rng)
    if kind == "percent":
        return kind, percent_pair(gold, rng)
    return kind, expression_pair(gold, rng)


def tool_output_rows(golds: list[tuple[str, str, str]], rng: random.Random) -> list[dict]:
    """A ``\\boxed{}`` printed by the program: never the answer (class 2)."""
    rows = []
    for i, (bench, pid, g) in enumerate(golds):
        n = int(g)
        fmt_ = FORMATS[(i // 3) % 3]
        code = f"print(r'\\boxed{{{n}}}')"
        case = i % 3
        if case == 0:  # the only box is in the tool output
            resp = _move_tool_after_answer(fmt_("", f"\\boxed{{{n}}}", code), n, keep_answer=False)
            resp += "\nThe program printed the answer."
            rows.append(_row(bench, pid, g, resp, False, "tool-output", "the only box is in the tool output"))
        elif case == 1:  # the model answers right; its program then prints a wrong box
            resp = fmt_(str(n), f"\\boxed{{{n + 1}}}", f"print(r'\\boxed{{{n + 1}}}')")
            resp = resp.replace("Let me compute", f"The answer is $\\boxed{{{n}}}$. Let me compute")
            resp = _move_tool_after_answer(resp, n)
            rows.append(_row(bench, pid, g, resp, True, "tool-output", "the model's box, then a program's wrong box"))
        else:  # the model answers wrong; the program printed the right box
            resp = fmt_(str(n + 1), f"\\boxed{{{n}}}", code)
            rows.append(_row(bench, pid, g, resp, False, "tool-output", "the program's box is right, the model's wrong"))
    return rows


def _move_tool_after_answer(resp: str, n: int, keep_answer: bool = True) -> str:
    """Drop the final answer line so the printed box comes last in the text (and, with
    ``keep_answer``, put the model's own answer first)."""
    resp = re.sub(r"\nSo the final answer is \$\\boxed\{[^}]*\}\$\.$", "", resp)
    resp = re.sub(r"\nThe result confirms it\.\n<answer>\n\\boxed\{[^}]*\}\n</answer>$", "", resp)
    resp = re.sub(r"<\|im_start\|>assistant\nThe answer is \$\\boxed\{[^}]*\}\$\.$", "<|im_start|>assistant\n", resp)
    if keep_answer and "The answer is $\\boxed" not in resp:
        resp = f"The answer is $\\boxed{{{n}}}$.\n" + resp
    return resp


def _row(bench, pid, gold, response, label, kind, why) -> dict:
    return {"bench": bench, "id": pid, "gold": gold, "response": response, "label": label, "kind": kind, "why": why}


PLAN = {"aime24": {"integer": 12}, "aime25": {"integer": 12}, "amc23": {"integer": 12}, "gsm8k": {"integer": 16},
        "math500": {"integer": 14, "decimal": 8, "text-option": 9, "interval-tuple": 15, "expression": 30},
        "olympiadbench": {"integer": 8, "decimal": 3, "percent": 1, "interval-tuple": 3, "expression": 10},
        "minerva_math": {"sci-notation": 30, "decimal": 24, "integer": 12}}


def build(data: Path) -> list[dict]:
    rng = random.Random(24)
    rows, tool_golds = [], []
    for bench, quota in PLAN.items():
        problems = [json.loads(line) for line in (data / f"{bench}.jsonl").open()]
        rng.shuffle(problems)
        taken = defaultdict(int)
        for p in problems:
            g, kind = p["answer"], kind_of(p["answer"])
            if taken[kind] >= quota.get(kind, 0) or len(g) > 60:
                continue
            _, made = pairs_for(bench, g, rng)
            if made is None:
                continue
            right, why_r, wrong, why_w = made
            taken[kind] += 1
            f1, f2 = rng.choice(FORMATS), rng.choice(FORMATS)
            out = right if f1 is not cot else ""
            rows.append(_row(bench, p["id"], g, f1(right, out), True, kind, why_r))
            rows.append(_row(bench, p["id"], g, f2(wrong, wrong if f2 is not cot else ""), False, kind, why_w))
            if kind == "integer" and bench in ("aime24", "aime25", "amc23", "gsm8k") and taken[kind] <= 8:
                tool_golds.append((bench, p["id"], g.strip()))
    return rows + tool_output_rows(tool_golds, rng)


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------
def load(path: Path = TABLE) -> list[dict]:
    return [json.loads(line) for line in path.open(encoding="utf-8") if line.strip()]


def tirl_verdicts(rows: list[dict]) -> list[bool]:
    from tirl.reward import Verifier, extract_answer
    from tirl.reward.verify import rel_tol_for
    from tirl.rollout.protocol import strip_code, strip_tool_output

    answers = [extract_answer(strip_code(strip_tool_output(r["response"]))) for r in rows]
    with Verifier(workers=2, timeout_s=5.0) as v:
        verdicts = v.verify_batch([(r["gold"], a) for r, a in zip(rows, answers)],
                                  rel_tol=[rel_tol_for(r["bench"]) for r in rows])
    return [x.correct for x in verdicts]


def math_verify_verdicts(rows: list[dict]) -> list[bool]:
    from math_verify import parse, verify

    out = []
    for r in rows:
        try:
            out.append(bool(verify(parse(f"${r['gold'].strip().strip('$')}$"), parse(r["response"]))))
        except Exception:  # noqa: BLE001 - an error is a rejection
            out.append(False)
    return out


def precision_recall(labels: list[bool], preds: list[bool]) -> tuple[float, float, int, int]:
    tp = sum(l and p for l, p in zip(labels, preds))
    fp = sum(p and not l for l, p in zip(labels, preds))
    fn = sum(l and not p for l, p in zip(labels, preds))
    return tp / max(tp + fp, 1), tp / max(tp + fn, 1), fp, fn


def table(rows: list[dict], ours: list[bool], theirs: list[bool], key: str) -> list[str]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        groups[r[key]].append(i)
    lines = [f"| {key} | pairs (right/wrong) | tirl precision | tirl recall | math-verify precision | math-verify recall |",
             "|---|---|---|---|---|---|"]

    def pr(p: float, fp: int, tp_fp: int) -> str:
        return f"{p:.3f} ({fp} FP)" if tp_fp else "- (0 accepted)"

    for name, idx in sorted(groups.items()) + [("**all**", list(range(len(rows))))]:
        lab = [rows[i]["label"] for i in idx]
        p1, r1, fp1, fn1 = precision_recall(lab, [ours[i] for i in idx])
        p2, r2, fp2, fn2 = precision_recall(lab, [theirs[i] for i in idx])
        acc1 = sum(ours[i] for i in idx)
        acc2 = sum(theirs[i] for i in idx)
        lines.append(f"| {name} | {len(idx)} ({sum(lab)}/{len(idx) - sum(lab)}) | {pr(p1, fp1, acc1)} | {r1:.3f} ({fn1} FN) "
                     f"| {pr(p2, fp2, acc2)} | {r2:.3f} ({fn2} FN) |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", action="store_true", help="rebuild the table from --data")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "eval"))
    ap.add_argument("--table", default=str(TABLE))
    ap.add_argument("--show-misses", action="store_true")
    args = ap.parse_args()
    if args.build:
        rows = build(Path(args.data))
        with open(args.table, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"wrote {len(rows)} rows to {args.table}")
        return 0
    rows = load(Path(args.table))
    t0 = time.perf_counter()
    ours = tirl_verdicts(rows)
    t1 = time.perf_counter()
    theirs = math_verify_verdicts(rows)
    t2 = time.perf_counter()
    print(f"{len(rows)} labelled pairs ({sum(r['label'] for r in rows)} right, {sum(not r['label'] for r in rows)} wrong); "
          f"tirl {t1 - t0:.1f} s, math-verify {t2 - t1:.1f} s\n")
    print("\n".join(table(rows, ours, theirs, "kind")) + "\n")
    print("\n".join(table(rows, ours, theirs, "bench")))
    if args.show_misses:
        for r, o, t in zip(rows, ours, theirs):
            if o != r["label"] or t != r["label"]:
                print(f"label={r['label']} tirl={o} mv={t} [{r['bench']} {r['kind']}] gold={r['gold']!r} why={r['why']}\n  "
                      + r["response"][-160:].replace("\n", "\\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
