"""A statistical check of a sampler: N tokens drawn at one position against the exact distribution.

The reference distribution is computed here with numpy, independently of the engines' own
:func:`tirl.rollout.engine.sampling_logprobs`, from the trainer's logits. The test statistic is
Pearson's chi-square over bins of tokens: tokens sorted by exact probability are grouped, in rank
order, into bins that each expect at least ``min_expected`` of the N draws (the tail that never
reaches it joins the last bin), so a sampler that never draws outside the top 50 (where the exact
distribution has mass) lands far above the bound, while a correct sampler stays under it with
probability 1 - 1e-6 (the bound is that quantile of the chi-square distribution, Wilson-Hilferty)."""

from __future__ import annotations

import math

import numpy as np

Z_1E6 = 4.7534  # the standard normal's 1 - 1e-6 quantile


def exact_probs(logits_V, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The distribution a sampler with these settings must draw from (top-k, then top-p over
    what is left, the token that crosses ``top_p`` kept), in float64."""
    z = np.asarray(logits_V, dtype=np.float64) / (temperature or 1.0)
    if temperature == 0:
        out = np.zeros_like(z)
        out[int(np.argmax(z))] = 1.0
        return out
    keep = np.ones(z.shape, dtype=bool)
    order = np.argsort(-z, kind="stable")
    if top_k:
        keep[order[top_k:]] = False
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if top_p < 1.0:
        sp = p[order]
        before = np.cumsum(sp) - sp
        cut = order[before >= top_p]
        p[cut] = 0.0
        p /= p.sum()
    return p


def binned_chi2(draws, probs: np.ndarray, min_expected: float = 10.0) -> tuple[float, int, float]:
    """``(chi2, degrees of freedom, total variation between the binned distributions)``."""
    draws = np.asarray(draws)
    n = len(draws)
    counts = np.bincount(draws, minlength=len(probs)).astype(np.float64)
    order = np.argsort(-probs, kind="stable")
    bins_p, bins_c, acc_p, acc_c = [], [], 0.0, 0.0
    for t in order:
        acc_p, acc_c = acc_p + probs[t], acc_c + counts[t]
        if acc_p * n >= min_expected:
            bins_p.append(acc_p)
            bins_c.append(acc_c)
            acc_p = acc_c = 0.0
    if bins_p:
        bins_p[-1] += acc_p
        bins_c[-1] += acc_c
    expected = np.array(bins_p) * n
    observed = np.array(bins_c)
    chi2 = float(((observed - expected) ** 2 / np.maximum(expected, 1e-300)).sum())
    tv = 0.5 * float(np.abs(observed / n - np.array(bins_p)).sum())
    return chi2, max(len(bins_p) - 1, 1), tv


def chi2_bound(df: int, z: float = Z_1E6) -> float:
    """The chi-square distribution's quantile at the normal quantile ``z`` (Wilson-Hilferty)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def check_draws(draws, probs: np.ndarray, what: str = "") -> tuple[float, float]:
    """Asserts the draws follow ``probs``; returns ``(chi2, bound)``. Draws of probability-0
    tokens fail at once."""
    draws = np.asarray(draws)
    impossible = draws[probs[draws] == 0]
    assert len(impossible) == 0, f"{what}: drew {len(impossible)} tokens the distribution excludes, e.g. {impossible[:5]}"
    chi2, df, tv = binned_chi2(draws, probs)
    bound = chi2_bound(df)
    assert chi2 < bound, f"{what}: chi2 {chi2:.1f} over {df} df (bound {bound:.1f}); binned TV {tv:.3f}"
    return chi2, bound
