"""Intervals and paired differences for controlled studies: K seeds per variant, one fixed eval set.

Each variant of a study is trained with K seeds (typically 3) and every run is scored on the
same N eval examples. The quantity of interest is a variant's true mean: its expected score
over the population of seeds and the population of eval examples, since the fixed eval set is
itself a sample. Per-example scores [K, N] are read as a crossed two-way random-effects design,

    score[k, i] = mu + seed[k] + example[i] + residual[k, i],

so the grand mean's variance is sigma_seed^2 / K + sigma_example^2 / N + sigma_residual^2 / (KN).
It is estimated, from the ANOVA mean squares of the K x N matrix, as the sum of two terms:

- the seed term MS_seed / (KN) = var(seed means) / K, what a t interval over the seeds uses:
  seed variance plus residual noise, with K - 1 degrees of freedom;
- the example term max(MS_example - MS_residual, 0) / (KN), an estimate of sigma_example^2 / N:
  which examples the eval set happens to hold moves every seed alike, so the seed spread
  cannot show it; N - 1 degrees of freedom.

The interval is mean +- c * se with Cochran and Cox's critical value c: the two terms' Student
t quantiles averaged with the terms as weights. It is the t interval over seeds when the example
term is 0 and the t interval over examples when the seed term is negligible. Satterthwaite's
degrees of freedom instead under-cover with 3 seeds (92-93% for a nominal 95% when the seed
term holds most of the variance), since a seed term that happens to come out small also makes
the estimated degrees of freedom large. Run-level values [K] (a CIDEr per run, a cost) get the
plain t interval over seeds, df = K - 1. A paired comparison applies the same to the difference
matrix (variant - reference), which removes what the two variants share: the examples'
difficulty and any per-seed component common to both (same data order, same initialisation).
"""

import numpy as np
from scipy import optimize, stats

CI_METHOD = (
    "t interval over seeds plus the eval set's sampling variance "
    "(crossed seed x example ANOVA, Cochran-Cox critical value)"
)

ASSUMPTIONS = (
    "Intervals are for a variant's expected score over new training seeds and new eval examples "
    "drawn like the fixed eval set, assuming independent seeds, exchangeable examples, and seed "
    "and example effects that add, with roughly normal seed means; with 3 seeds they are wide "
    "where seed-to-seed spread dominates, and in simulation they cover 95-97% for a nominal 95%. "
    "They do not cover a shift to another eval distribution, other hyperparameters, or errors in "
    "the metric itself. Probability of improvement is one minus the one-sided p-value of 'the "
    "variant is no better' under the same interval: the confidence level at which a one-sided "
    "interval of the difference just excludes 0 (with a single t term, P(T > -difference / se)), "
    "so 0.5 means no evidence either way, near 1 better, near 0 worse."
)

_MOST_CONFIDENT = 1 - 1e-12  # probability_of_improvement is capped within 1e-12 of 0 and 1


def summarize(values: np.ndarray, level: float = 0.95) -> dict:
    """A variant's mean score over seeds (and examples) with a `level` interval for its true mean.

    values: [K] run-level values (one per seed) or [K, N] per-example values (row = seed,
    column = eval example). Example columns holding any NaN are dropped before anything is
    computed; NaN in run-level values is an error (align the seeds first).
    Returns {"mean", "ci_low", "ci_high", "n"} as plain Python values, n = K seeds; the ci_*
    are None when K < 2, since one seed gives no interval.
    """
    values = np.asarray(values, dtype=float)
    mean, terms, dfs = _mean_and_variance_terms(values)
    ci_low, ci_high = _interval(mean, terms, dfs, level)
    return {"mean": mean, "ci_low": ci_low, "ci_high": ci_high, "n": len(values)}


def compare(variant: np.ndarray, reference: np.ndarray, level: float = 0.95) -> dict:
    """The paired difference of two variants' means (variant - reference) with a `level` interval.

    variant, reference: same shape, [K] or [K, N]; row k of both comes from seed k and column i
    from eval example i (the caller keeps only the seeds both variants finished). The interval
    is summarize's on the difference matrix; an example column with NaN in either is dropped.
    "probability_of_improvement" = 1 - the one-sided p-value of "true difference <= 0": the
    level q at which the one-sided interval [difference - half_width(q), inf) has its bound at
    0. For run-level values it is t_cdf(difference / se, K - 1). 0.5 = no evidence, near 1 =
    variant better, near 0 = worse; with a zero standard error it is 1.0, 0.0 or 0.5 by the
    sign of the difference.
    Returns {"difference", "ci_low", "ci_high", "probability_of_improvement"} as plain Python
    values; all but "difference" are None when K < 2.
    """
    variant, reference = np.asarray(variant, dtype=float), np.asarray(reference, dtype=float)
    if variant.shape != reference.shape:
        raise ValueError(f"variant {variant.shape} and reference {reference.shape} must be paired")
    difference, terms, dfs = _mean_and_variance_terms(variant - reference)
    ci_low, ci_high = _interval(difference, terms, dfs, level)
    if terms is None:
        probability = None
    elif terms.sum() == 0:
        probability = float(np.sign(difference) / 2 + 0.5)
    else:
        confidence = _one_sided_confidence(abs(difference), terms, dfs)
        probability = confidence if difference >= 0 else 1 - confidence
    return {
        "difference": difference,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "probability_of_improvement": probability,
    }


def _mean_and_variance_terms(values: np.ndarray) -> tuple:
    """values [K] or [K, N] -> (grand mean, the terms [J] that add up to its estimated variance,
    their degrees of freedom [J]); the last two are None when K < 2."""
    values = _complete_examples(values)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, None, None
    if values.ndim == 1:
        return mean, np.array([np.var(values, ddof=1) / len(values)]), np.array([len(values) - 1])
    return (mean, *_crossed_variance_terms(values))


def _complete_examples(values: np.ndarray) -> np.ndarray:
    """[K] stays as it is; [K, N] loses its example columns with any NaN, and one example left
    ([K, 1]) becomes [K], since an example term needs two examples to estimate."""
    if values.ndim not in (1, 2) or len(values) == 0:
        raise ValueError(f"expected [K] or [K, N] values with K >= 1, got shape {values.shape}")
    if values.ndim == 1:
        if np.isnan(values).any():
            raise ValueError("run-level values hold NaN: keep only the seeds that finished")
        return values
    values = values[:, ~np.isnan(values).any(axis=0)]
    if values.shape[1] == 0:
        raise ValueError("every example column holds a NaN: nothing to summarise")
    return values[:, 0] if values.shape[1] == 1 else values


def _crossed_variance_terms(values: np.ndarray) -> tuple:
    """values [K, N], K and N >= 2 -> ([seed term, example term], [K - 1, N - 1]).

    Expected mean squares: E[MS_seed] = s_res^2 + N s_seed^2, E[MS_example] = s_res^2 +
    K s_example^2, E[MS_res] = s_res^2, so KN Var(grand mean) = E[MS_seed] + E[MS_example] -
    E[MS_res]. The seed term keeps s_res^2 inside MS_seed rather than subtracting it: with K - 1
    = 2 degrees of freedom MS_seed often falls below MS_res even when seeds vary a lot, and
    zeroing the seed component then would drop exactly the term the interval most needs.
    """
    seeds, examples = values.shape
    grand_mean = values.mean()
    seed_means = values.mean(axis=1)  # [K]
    example_means = values.mean(axis=0)  # [N]
    residuals = values - seed_means[:, None] - example_means[None, :] + grand_mean  # [K, N]
    ms_seed = examples * np.sum((seed_means - grand_mean) ** 2) / (seeds - 1)
    ms_example = seeds * np.sum((example_means - grand_mean) ** 2) / (examples - 1)
    ms_residual = np.sum(residuals**2) / ((seeds - 1) * (examples - 1))
    terms = np.array([ms_seed, max(ms_example - ms_residual, 0.0)]) / (seeds * examples)
    return terms, np.array([seeds - 1, examples - 1])


def _interval(mean: float, terms, dfs, level: float) -> tuple:
    """(ci_low, ci_high), or (None, None) without variance terms (one seed)."""
    if terms is None:
        return None, None
    half_width = _half_width(terms, dfs, 0.5 + level / 2)
    return mean - half_width, mean + half_width


def _half_width(terms: np.ndarray, dfs: np.ndarray, quantile: float) -> float:
    """Cochran-Cox: se times the terms' t quantiles averaged with the terms as weights.
    terms, dfs [J]; a zero variance gives a zero half-width."""
    standard_error = np.sqrt(terms.sum())
    if standard_error == 0:
        return 0.0
    return float(terms @ stats.t.ppf(quantile, dfs) / standard_error)


def _one_sided_confidence(distance: float, terms: np.ndarray, dfs: np.ndarray) -> float:
    """The quantile q >= 0.5 at which _half_width(terms, dfs, q) equals distance (>= 0): the
    half-width grows with q from 0 at q = 0.5, so one root."""
    def shortfall(quantile):
        return _half_width(terms, dfs, quantile) - distance

    if shortfall(_MOST_CONFIDENT) <= 0:
        return _MOST_CONFIDENT
    return float(optimize.brentq(shortfall, 0.5, _MOST_CONFIDENT))
