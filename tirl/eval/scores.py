"""Benchmark scores from k samples per problem.

* ``avg@k``: mean accuracy over all k samples (ReTool reports avg@32; avg@1 = greedy accuracy);
* ``pass@k``: the unbiased estimator of Chen et al. (2021), ``1 - C(n-c, k) / C(n, k)`` for n samples
  of which c are correct, averaged over problems;
* ``maj@k``: correct if the most frequent extracted answer among the k samples is correct
  (answers grouped by their normalised form; ties go to the answer seen first; no answer never wins).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from tirl.reward.verify import normalise, plain_number


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def answer_key(answer: str | None) -> str | None:
    """Answers that are obviously the same value vote together (``1,000`` = ``1000`` = ``1000.0``)."""
    if answer is None:
        return None
    value = plain_number(answer)
    return f"#{value}" if value is not None else normalise(answer)


def majority_correct(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    votes = Counter(k for k in map(answer_key, answers) if k is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(k for k in map(answer_key, answers) if k is not None and votes[k] == top)
    return any(c for a, c in zip(answers, correct) if answer_key(a) == winner)


def problem_scores(answers: Sequence[str | None], correct: Sequence[bool], ks: Sequence[int]) -> dict[str, float]:
    n, c = len(correct), sum(map(bool, correct))
    out = {f"avg@{n}": c / n}
    for k in ks:
        if k <= n:
            out[f"pass@{k}"] = pass_at_k(n, c, k)
    out[f"maj@{n}"] = float(majority_correct(answers, correct))
    return out


def aggregate(per_problem: list[dict[str, float]]) -> dict[str, float]:
    keys = per_problem[0].keys() if per_problem else []
    return {k: sum(p[k] for p in per_problem) / len(per_problem) for k in keys}
