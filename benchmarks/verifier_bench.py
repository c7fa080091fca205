"""Verifier throughput: tirl's verifier vs naive math-verify, same inputs, same run.

    .venv/bin/python benchmarks/verifier_bench.py [--data ../shared/data]

Naive math-verify = ``verify(parse(gold), parse(answer))`` in this process (what most trainers
call; its default timeouts use signal.alarm, so it must run on the main thread). tirl = the
batched :class:`tirl.reward.Verifier` (fast exact path in-process, 2 worker processes with a
hard timeout for the rest). Also counts how often each accepts a wrong answer and rejects a
right one on the same inputs.
"""

import argparse
import logging
import random
import re
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)


def integer_pairs(n, rng):
    out = []
    for _ in range(n):
        g = rng.randint(0, 10**6)
        a = g if rng.random() < 0.5 else g + rng.choice([-1, 1])
        out.append((str(g), str(a), a == g))
    return out


def symbolic_pairs(n, rng):
    out = []
    for _ in range(n):
        p, q, k, m = rng.randint(1, 40), rng.randint(2, 40), rng.randint(2, 9), rng.choice([2, 3, 5, 6, 7])
        kind = rng.randrange(4)
        if kind == 0:
            out.append((f"\\frac{{{p}}}{{{q}}}", f"\\dfrac{{{2 * p}}}{{{2 * q}}}", True))
        elif kind == 1:
            out.append((f"{k}\\sqrt{{{m}}}", f"\\sqrt{{{k * k * m}}}", True))
        elif kind == 2:
            out.append((f"\\frac{{{p}}}{{{q}}}", f"{p / q:.6f}", p / q == float(f"{p / q:.6f}")))
        else:
            out.append((f"{k}\\sqrt{{{m}}}", f"{k}", False))
    return out


def reformat(gold: str) -> str:
    """A MATH answer written differently but equivalently."""
    s = re.sub(r",(?!\\!|\s*\d{3}\b)", ", ", gold.replace("\\frac", "\\dfrac"))  # not inside 10,080
    s = re.sub(r"^\((.*)\)$", r"\\left(\1\\right)", s)
    return f"{s}" if s != gold else f"{{{gold}}}"


def math500_pairs(data: Path):
    from tirl.data import load_problems

    probs = load_problems(data / "eval" / "math500.jsonl")
    return [(p.answer, reformat(p.answer), True) for p in probs]


def naive(pairs):
    from math_verify import parse, verify

    out = []
    for g, a, _ in pairs:
        try:
            out.append(bool(verify(parse(f"${g}$"), parse(f"${a}$"))))
        except Exception:
            out.append(False)
    return out


def ours(pairs, verifier, fast=True):
    return [v.correct for v in verifier.verify_batch([(g, a) for g, a, _ in pairs], fast=fast)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--n-int", type=int, default=3000)
    ap.add_argument("--n-sym", type=int, default=600)
    args = ap.parse_args()
    from tirl.reward import Verifier

    rng = random.Random(0)
    sets = {"integers": integer_pairs(args.n_int, rng), "fractions/radicals": symbolic_pairs(args.n_sym, rng)}
    if Path(args.data, "eval", "math500.jsonl").is_file():
        sets["MATH-500 golds vs reformatted"] = math500_pairs(Path(args.data))
    with Verifier(workers=2, timeout_s=5.0) as v:
        v.verify_batch([("x+1", "1+x")])  # start the workers outside the timing
        print("| set | n | tirl answers/s | naive math-verify answers/s | tirl wrong accepts / right rejects | naive wrong accepts / right rejects |")
        print("|---|---|---|---|---|---|")
        if "MATH-500 golds vs reformatted" in sets:
            sets["MATH-500 reformatted, parser forced (fast path off)"] = sets["MATH-500 golds vs reformatted"]
        for name, pairs in sets.items():
            t0 = time.perf_counter()
            a = ours(pairs, v, fast="forced" not in name)
            t_ours = time.perf_counter() - t0
            t0 = time.perf_counter()
            b = naive(pairs)
            t_naive = time.perf_counter() - t0
            truth = [e for _, _, e in pairs]

            def errs(res):
                return sum(r and not e for r, e in zip(res, truth)), sum(e and not r for r, e in zip(res, truth))

            print(f"| {name} | {len(pairs)} | {len(pairs) / t_ours:,.0f} | {len(pairs) / t_naive:,.0f} | "
                  f"{errs(a)[0]} / {errs(a)[1]} | {errs(b)[0]} / {errs(b)[1]} |")


if __name__ == "__main__":
    main()
