"""Data: problems from the embedded generator or from files, and a seeded sampler over them."""

from __future__ import annotations

import random

from tirl.data.loader import get_field, load_problems
from tirl.data.synthetic import arithmetic_problems, make_problem
from tirl.types import Problem, TirlError

__all__ = ["ProblemSampler", "arithmetic_problems", "build_problems", "get_field", "load_problems", "make_problem",
           "parse_synthetic"]


def build_problems(
    source: str,
    *,
    problem_field: str = "problem",
    answer_field: str = "answer",
    id_field: str | None = "id",
    limit: int | None = None,
    num_synthetic: int = 2000,
    difficulty: int = 1,
    seed: int = 0,
) -> list[Problem]:
    """``source`` is a file path or ``synthetic:<kinds>[@start]``: ``synthetic:arithmetic`` (every
    kind), ``synthetic:product`` or ``synthetic:product+gcd_lcm`` (those kinds only), with ``@start``
    taking problems from index ``start`` on (disjoint ranges: disjoint train / held-out sets)."""
    if source.startswith("synthetic:"):
        kinds, start = parse_synthetic(source)
        return arithmetic_problems(min(num_synthetic, limit or num_synthetic), seed=seed, difficulty=difficulty,
                                   kinds=kinds, start=start)
    return load_problems(source, problem_field, answer_field, id_field, limit)


def parse_synthetic(source: str) -> tuple[tuple[str, ...] | None, int]:
    """``synthetic:product+series@500`` -> ``(("product", "series"), 500)``; ``arithmetic`` = all kinds."""
    from tirl.data.synthetic import KINDS

    spec = source.split(":", 1)[1]
    names, _, start = spec.partition("@")
    if start and not start.isdigit():
        raise TirlError(f"synthetic source {source!r}: the part after '@' must be a start index (e.g. @1000)")
    kinds = None if names == "arithmetic" else tuple(names.split("+"))
    unknown = set(kinds or ()) - set(KINDS)
    if unknown or not names:
        raise TirlError(f"unknown synthetic source {source!r}; use synthetic:arithmetic or synthetic:<kind>[+<kind>][@start] "
                        f"with kinds {', '.join(KINDS)}")
    return kinds, int(start or 0)


class ProblemSampler:
    """Epoch-wise shuffled sampling without replacement; its whole state is (seed, epoch, cursor)."""

    def __init__(self, problems: list[Problem], seed: int = 0, shuffle: bool = True):
        if not problems:
            raise TirlError("no problems to sample from")
        self.problems, self.seed, self.shuffle = problems, seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(len(self.problems)))
        if self.shuffle:
            random.Random(f"{self.seed}:epoch{self.epoch}").shuffle(order)
        return order

    def next(self, n: int) -> list[Problem]:
        out = []
        for _ in range(n):
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._make_order()
            out.append(self.problems[self._order[self.cursor]])
            self.cursor += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.cursor = state["seed"], state["epoch"], state["cursor"]
        self._order = self._make_order()
