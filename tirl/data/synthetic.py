"""A seeded generator of arithmetic word problems where exact computation pays.

Each problem is made from its own ``random.Random(f"{seed}:{index}")``, so problem ``i`` of seed
``s`` is the same on every machine and in every process, however many problems are asked for.
Answers are exact integers computed with Python's big integers.

Kinds: multi-digit products, modular exponentiation, sums of series (squares, cubes, arithmetic
progressions), digit sums of powers, gcd/lcm, counting divisors, combinations, and ``easy``: small
sums, differences and one-digit products that a small model can do in text (the mixed task of
``mini-mixed`` pairs them with the products, which it cannot do without code).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from tirl.types import Problem

_Kind = Callable[[random.Random, int], tuple[str, int]]


def _digits(rng: random.Random, n: int) -> int:
    return rng.randint(10 ** (n - 1), 10**n - 1)


def _product(rng: random.Random, d: int) -> tuple[str, int]:
    a, b = _digits(rng, 3 + d), _digits(rng, 2 + d)
    item, unit = rng.choice([("crates", "bottles"), ("boxes", "pencils"), ("trucks", "bricks"), ("shelves", "books")])
    text = rng.choice([
        f"A warehouse has {a} {item}, each holding {b} {unit}. How many {unit} are there in total?",
        f"What is {a} \\times {b}?",
        f"A factory makes {b} {unit} per hour for {a} hours. How many {unit} does it make?",
    ])
    return text, a * b


def _modpow(rng: random.Random, d: int) -> tuple[str, int]:
    base, exp, mod = rng.randint(2, 99), rng.randint(50, 500 * d), rng.choice([97, 100, 1000, 1009, 10**4 + 7])
    text = rng.choice([
        f"What is the remainder when {base}^{{{exp}}} is divided by {mod}?",
        f"Compute {base}^{{{exp}}} \\bmod {mod}.",
    ])
    return text, pow(base, exp, mod)


def _series(rng: random.Random, d: int) -> tuple[str, int]:
    n = rng.randint(20, 200 * d)
    kind = rng.randrange(3)
    if kind == 0:
        return f"What is the sum of the squares of the integers from 1 to {n}?", n * (n + 1) * (2 * n + 1) // 6
    if kind == 1:
        return f"What is 1^3 + 2^3 + \\dots + {n}^3?", (n * (n + 1) // 2) ** 2
    a, step = rng.randint(1, 50), rng.randint(2, 19)
    return (
        f"A runner runs {a} laps on day 1 and {step} more laps each day than the day before. "
        f"How many laps has she run in total after {n} days?",
        n * a + step * n * (n - 1) // 2,
    )


def _digit_sum(rng: random.Random, d: int) -> tuple[str, int]:
    base, exp = rng.randint(2, 9), rng.randint(30, 100 * d)
    return f"What is the sum of the digits of {base}^{{{exp}}}?", sum(map(int, str(base**exp)))


def _gcd_lcm(rng: random.Random, d: int) -> tuple[str, int]:
    g = rng.randint(2, 60)
    a, b = g * rng.randint(10, 99 * d), g * rng.randint(10, 99 * d)
    if rng.random() < 0.5:
        return f"What is the greatest common divisor of {a} and {b}?", math.gcd(a, b)
    return f"What is the least common multiple of {a} and {b}?", math.lcm(a, b)


def _divisors(rng: random.Random, d: int) -> tuple[str, int]:
    n = rng.randint(1000, 10**5 * d)
    return f"How many positive divisors does {n} have?", sum(2 - (i * i == n) for i in range(1, math.isqrt(n) + 1) if n % i == 0)


def _choose(rng: random.Random, d: int) -> tuple[str, int]:
    n = rng.randint(15, 40 * d)
    k = rng.randint(3, max(4, n // 3))
    return f"In how many ways can a committee of {k} be chosen from {n} people?", math.comb(n, k)


def _easy(rng: random.Random, d: int) -> tuple[str, int]:
    op = rng.randrange(3)
    if op == 0:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        text, ans = f"{a} + {b}", a + b
    elif op == 1:
        a = rng.randint(5, 18)
        b = rng.randint(1, min(9, a - 1))
        text, ans = f"{a} - {b}", a - b
    else:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        text, ans = f"{a} \\times {b}", a * b
    return rng.choice([f"What is {text}?", f"Compute {text}.", f"Find the value of {text}."]), ans


KINDS: dict[str, _Kind] = {
    "product": _product,
    "modpow": _modpow,
    "series": _series,
    "digit_sum": _digit_sum,
    "gcd_lcm": _gcd_lcm,
    "divisors": _divisors,
    "choose": _choose,
    "easy": _easy,
}
ARITHMETIC = tuple(k for k in KINDS if k != "easy")  # synthetic:arithmetic, as before the easy kind


def make_problem(seed: int, index: int, difficulty: int = 1, kinds: tuple[str, ...] | None = None) -> Problem:
    rng = random.Random(f"{seed}:{index}")
    names = kinds or ARITHMETIC
    kind = names[rng.randrange(len(names))]
    text, answer = KINDS[kind](rng, difficulty)
    return Problem(id=f"arith-{seed}-{index}", problem=text, answer=str(answer), source=f"synthetic:{kind}")


def arithmetic_problems(
    n: int, seed: int = 0, difficulty: int = 1, kinds: tuple[str, ...] | None = None, start: int = 0
) -> list[Problem]:
    """``n`` problems with indices ``start .. start+n-1`` (disjoint ranges give disjoint sets)."""
    unknown = set(kinds or ()) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown problem kinds {sorted(unknown)}; known: {sorted(KINDS)}")
    return [make_problem(seed, i, difficulty, kinds) for i in range(start, start + n)]
