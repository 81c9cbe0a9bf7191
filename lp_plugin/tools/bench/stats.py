"""The statistics lp-bench reports and gates on (pure Python, no torch).

A figure measured over rounds is kept as ``{"median", "min", "max", "runs"}``. A ratio against
another config is taken round by round (:func:`paired`): each round measures every config back to
back, so a drift between rounds (clocks, host load) cancels. Noise is measured on a log scale, where
a ratio of 0.9 and one of 1/0.9 are equally far from 1.
"""

from __future__ import annotations

import math
import statistics

# the standard error of a median of n normal values is about sqrt(pi/2) * sigma / sqrt(n)
MEDIAN_SE = math.sqrt(math.pi / 2)


def stat(values) -> dict | None:
    """median/min/max of the timed runs (None when there are none)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": list(values)}


def median_of(figure):
    """The median of a :func:`stat` figure, or a plain number as it is (None stays None)."""
    return figure.get("median") if isinstance(figure, dict) else figure


def runs_of(figure) -> list:
    runs = figure.get("runs") if isinstance(figure, dict) else None
    return [v for v in runs if isinstance(v, (int, float))] if runs else []


def paired(figure, reference) -> dict | None:
    """:func:`stat` of ``figure / reference`` taken round by round; None unless both have every round."""
    a, b = runs_of(figure), runs_of(reference)
    if not a or len(a) != len(b) or not all(b):
        return None
    return stat([x / y for x, y in zip(a, b)])


def log_rms(ratios) -> float | None:
    """The spread of ratios whose true value is 1 (the plain model against itself): the root mean
    square of their logarithms (a standard deviation about 0)."""
    logs = [math.log(r) for r in ratios if r and r > 0]
    return math.sqrt(sum(x * x for x in logs) / len(logs)) if logs else None


def log_sd(values) -> float:
    """The sample standard deviation of the logarithms of positive values (0 for fewer than two)."""
    logs = [math.log(v) for v in values if v and v > 0]
    return statistics.stdev(logs) if len(logs) > 1 else 0.0


def median_se(sigma: float, n: int) -> float:
    """Standard error of the median of ``n`` values with spread ``sigma``."""
    return MEDIAN_SE * sigma / math.sqrt(max(n, 1))


# one-sided 0.1% critical values of Student's t by degrees of freedom (pyperf keeps a table like
# this for its 95% test); beyond the table the normal value 3.090
_T_999 = {
    1: 318.31,
    2: 22.327,
    3: 10.215,
    4: 7.173,
    5: 5.893,
    6: 5.208,
    7: 4.785,
    8: 4.501,
    9: 4.297,
    10: 4.144,
    11: 4.025,
    12: 3.930,
    13: 3.852,
    14: 3.787,
    15: 3.733,
    16: 3.686,
    17: 3.646,
    18: 3.610,
    19: 3.579,
    20: 3.552,
    22: 3.505,
    24: 3.467,
    26: 3.435,
    28: 3.408,
    30: 3.385,
    40: 3.307,
    60: 3.232,
    120: 3.160,
}


def t_critical(dof: int) -> float:
    """The one-sided p = 0.001 critical value of Student's t (rounded towards fewer degrees of freedom)."""
    if dof < 1:
        return _T_999[1]
    fitting = [d for d in _T_999 if d <= dof]
    return _T_999[max(fitting)] if dof <= 120 else 3.090


def _u_counts(m: int, n: int, memo: dict) -> list:
    """How many orderings of two samples of sizes m and n give each Mann-Whitney U (0..m*n)."""
    key = (m, n)
    if key not in memo:
        if m == 0 or n == 0:
            memo[key] = [1]
        else:
            # the largest value is either one of the m (it beats all n: U grows by n) or one of the n
            with_m, with_n = _u_counts(m - 1, n, memo), _u_counts(m, n - 1, memo)
            counts = [0] * (m * n + 1)
            for u, c in enumerate(with_m):
                counts[u + n] += c
            for u, c in enumerate(with_n):
                counts[u] += c
            memo[key] = counts
    return memo[key]


def mann_whitney_p(a, b) -> float:
    """Two-sided p-value of the Mann-Whitney U test of samples ``a`` and ``b``: exact for up to 20
    values each (ties counted against significance, as asv does), else the normal approximation."""
    m, n = len(a), len(b)
    wins = sum(1 for x in a for y in b if x > y)
    ties = sum(1 for x in a for y in b if x == y)
    u = min(wins + ties, m * n - wins)  # the tie-breaking least favourable to significance
    if m <= 20 and n <= 20:
        counts = _u_counts(m, n, {})
        return min(1.0, 2 * sum(counts[: u + 1]) / math.comb(m + n, m))
    z = (u + 0.5 - m * n / 2) / math.sqrt(m * n * (m + n + 1) / 12)
    return min(1.0, math.erfc(-z / math.sqrt(2)))


def mann_whitney_can_reject(m: int, n: int, alpha: float) -> bool:
    """Whether samples of sizes m and n can give p < alpha at all (the most extreme ordering)."""
    return m > 0 and n > 0 and 2 / math.comb(m + n, m) < alpha
