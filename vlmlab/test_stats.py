import warnings

import numpy as np
import pytest
from scipy import stats
from scipy.special import expit

from vlmlab.stats import ASSUMPTIONS, CI_METHOD, compare, summarize

STUDIES = 400  # simulated studies per coverage check: the 92-98% band is about +-2.7 binomial sd
SEEDS = 3


def simulate_paired_studies(rng, *, examples, seed_sd, seed_correlation, item_sd,
                            item_difference_sd, noise_sd, difference):
    """Studies of two variants on one eval set -> (variant, reference), each [STUDIES, SEEDS, N].

    Additive crossed model with true reference mean 0 and true difference `difference`: both
    variants share the example effects (same eval set); seed k's effect in the variant is
    correlated with seed k's in the reference (same data order, same init); the variant also
    helps some examples more than others (item_difference_sd); noise is independent per run.
    """
    shape = (STUDIES, SEEDS, examples)
    item = rng.normal(0, item_sd, (STUDIES, 1, examples))
    item_difference = rng.normal(0, item_difference_sd, (STUDIES, 1, examples))
    reference_seed = rng.normal(0, seed_sd, (STUDIES, SEEDS, 1))
    own_seed = rng.normal(0, seed_sd, (STUDIES, SEEDS, 1))
    variant_seed = (seed_correlation * reference_seed
                    + np.sqrt(1 - seed_correlation**2) * own_seed)
    reference = reference_seed + item + rng.normal(0, noise_sd, shape)
    variant = difference + variant_seed + item + item_difference + rng.normal(0, noise_sd, shape)
    return variant, reference


def bernoulli_mean(logit_mean, logit_sd):
    """E[expit(logit_mean + logit_sd * Z)], Z ~ N(0, 1), by Gauss-Hermite quadrature: the true
    accuracy when the seed and example logit effects are normal (their sds combined)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    return float(weights @ expit(logit_mean + logit_sd * nodes) / np.sqrt(2 * np.pi))


def summarize_coverage(studies, truth):
    """studies [STUDIES, K, N] -> share of their summarize intervals that hold `truth`."""
    results = [summarize(study) for study in studies]
    return np.mean([r["ci_low"] <= truth <= r["ci_high"] for r in results])


def compare_coverage(variants, references, truth):
    """[STUDIES, K, N] pairs -> share of their compare intervals that hold the true difference."""
    results = [compare(v, r) for v, r in zip(variants, references)]
    return np.mean([r["ci_low"] <= truth <= r["ci_high"] for r in results])


# Per-example regimes: which term of Var(grand mean) = s_seed^2/K + s_item^2/N + s_noise^2/(KN)
# dominates, for the reference alone (summarize) and for the difference (compare).
SUMMARIZE_REGIMES = {
    "seed dominant": dict(examples=200, seed_sd=1.0, item_sd=0.2, noise_sd=1.0),
    "example dominant": dict(examples=200, seed_sd=0.02, item_sd=1.0, noise_sd=1.0),
    "both": dict(examples=300, seed_sd=0.1, item_sd=1.0, noise_sd=1.0),
}
COMPARE_REGIMES = {
    "seed dominant": dict(examples=200, seed_sd=1.0, seed_correlation=0.5, item_sd=1.0,
                          item_difference_sd=0.1, noise_sd=1.0),
    "example dominant": dict(examples=200, seed_sd=0.1, seed_correlation=0.9, item_sd=1.0,
                             item_difference_sd=1.0, noise_sd=0.5),
    "both": dict(examples=200, seed_sd=0.3, seed_correlation=0.5, item_sd=1.0,
                 item_difference_sd=2.0, noise_sd=1.0),
}
# VQA-like: each answer right or wrong, P(right) = expit(logit), the logits built as above.
BERNOULLI = dict(examples=300, seed_sd=0.3, seed_correlation=0.5, item_sd=2.0,
                 item_difference_sd=0.5, noise_sd=0.0)
BERNOULLI_LOGIT_MEAN, BERNOULLI_LOGIT_DIFFERENCE = 0.5, 0.3


def simulate_bernoulli_studies(rng):
    """-> (variant, reference) 0/1 scores [STUDIES, SEEDS, N], (true variant, reference accuracy)."""
    variant_logit, reference_logit = simulate_paired_studies(
        rng, **BERNOULLI, difference=BERNOULLI_LOGIT_DIFFERENCE)
    variant = rng.random(variant_logit.shape) < expit(BERNOULLI_LOGIT_MEAN + variant_logit)
    reference = rng.random(reference_logit.shape) < expit(BERNOULLI_LOGIT_MEAN + reference_logit)
    reference_sd = np.hypot(BERNOULLI["seed_sd"], BERNOULLI["item_sd"])
    variant_sd = np.hypot(reference_sd, BERNOULLI["item_difference_sd"])
    truths = (bernoulli_mean(BERNOULLI_LOGIT_MEAN + BERNOULLI_LOGIT_DIFFERENCE, variant_sd),
              bernoulli_mean(BERNOULLI_LOGIT_MEAN, reference_sd))
    return (variant.astype(float), reference.astype(float)), truths


# ---------------------------------------------------------------- coverage

@pytest.mark.parametrize("regime", SUMMARIZE_REGIMES)
def test_summarize_covers_the_mean_over_seeds_and_examples(regime):
    rng = np.random.default_rng(20240601)
    _, reference = simulate_paired_studies(rng, **SUMMARIZE_REGIMES[regime], seed_correlation=0.0,
                                           item_difference_sd=0.0, difference=0.0)
    assert 0.92 <= summarize_coverage(reference + 0.6, 0.6) <= 0.98


@pytest.mark.parametrize("regime", COMPARE_REGIMES)
def test_compare_covers_the_true_difference(regime):
    rng = np.random.default_rng(20240602)
    variant, reference = simulate_paired_studies(rng, **COMPARE_REGIMES[regime], difference=0.1)
    assert 0.92 <= compare_coverage(variant, reference, 0.1) <= 0.98


def test_bernoulli_scores_are_covered():
    rng = np.random.default_rng(20240603)
    (variant, reference), (variant_truth, reference_truth) = simulate_bernoulli_studies(rng)
    assert 0.92 <= summarize_coverage(reference, reference_truth) <= 0.98
    assert 0.92 <= compare_coverage(variant, reference, variant_truth - reference_truth) <= 0.98


def naive_bootstrap_coverage(studies, truth, rng, resamples=1000):
    """Percentile bootstrap over each study's K seed means: studies [STUDIES, K, N] -> coverage."""
    seed_means = studies.mean(axis=2)  # [STUDIES, K]
    picks = rng.integers(0, SEEDS, (len(studies), resamples, SEEDS))  # [STUDIES, B, K]
    boot_means = np.take_along_axis(seed_means[:, None, :], picks, axis=2).mean(axis=2)  # [S, B]
    low, high = np.percentile(boot_means, [2.5, 97.5], axis=1)  # [STUDIES] each
    return np.mean((low <= truth) & (truth <= high))


def test_naive_bootstrap_over_three_seeds_under_covers():
    # Why not bootstrap: 3 seed means have 10 distinct resamples, and the 2.5-97.5 percentiles of
    # their means are the smallest and largest seed mean, which miss the truth 2 x (1/2)^3 = 25%
    # of the time when seed variance dominates.
    rng = np.random.default_rng(20240604)
    _, reference = simulate_paired_studies(rng, **SUMMARIZE_REGIMES["seed dominant"],
                                           seed_correlation=0.0, item_difference_sd=0.0,
                                           difference=0.0)
    assert naive_bootstrap_coverage(reference, 0.0, rng) < 0.85
    assert summarize_coverage(reference, 0.0) >= 0.92


# ---------------------------------------------------------------- units

def test_summarize_returns_plain_floats_and_the_seed_count():
    rng = np.random.default_rng(0)
    for values in (rng.random(3), rng.random((3, 50))):
        result = summarize(values)
        assert set(result) == {"mean", "ci_low", "ci_high", "n"}
        assert result["n"] == 3
        assert all(type(result[key]) is float for key in ("mean", "ci_low", "ci_high"))
        assert result["mean"] == pytest.approx(values.mean())
        assert result["ci_low"] < result["mean"] < result["ci_high"]


def test_run_level_values_get_the_t_interval_over_seeds():
    result = summarize(np.array([1.0, 2.0, 3.0]))
    half_width = 4.302652729911275 * 1.0 / np.sqrt(3)  # t_0.975 with 2 df, sd 1
    assert result["ci_low"] == pytest.approx(2.0 - half_width)
    assert result["ci_high"] == pytest.approx(2.0 + half_width)


def test_example_columns_with_nan_are_dropped():
    values = np.array([[0.2, np.nan, 0.5, 1.0], [0.4, 0.9, 0.7, np.nan], [0.3, 0.1, 0.6, 0.0]])
    assert summarize(values) == summarize(values[:, [0, 2]])
    assert summarize(values)["mean"] == pytest.approx(0.45)
    with pytest.raises(ValueError):
        summarize(np.full((3, 2), np.nan))
    with pytest.raises(ValueError):
        summarize(np.array([0.1, np.nan, 0.3]))


def test_one_seed_gives_no_interval():
    assert summarize(np.array([0.7])) == {"mean": 0.7, "ci_low": None, "ci_high": None, "n": 1}
    assert summarize(np.array([[0.5, 1.0]]))["ci_low"] is None
    result = compare(np.array([[0.5, 1.0]]), np.array([[0.5, 0.0]]))
    assert result == {"difference": 0.5, "ci_low": None, "ci_high": None,
                      "probability_of_improvement": None}


def test_degenerate_inputs_give_finite_results_without_warnings():
    rng = np.random.default_rng(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one_example = summarize(rng.random((3, 1)))  # falls back to the t interval over seeds
        constant_columns = summarize(np.tile(rng.random(20), (3, 1)))  # no seed variance at all
        constant = summarize(np.full((3, 20), 0.4))
        constant_gain = compare(np.full((3, 20), 0.5), np.full((3, 20), 0.25))
        constant_loss = compare(np.full(3, 0.25), np.full(3, 0.5))
    assert one_example["ci_low"] < one_example["ci_high"]
    assert constant_columns["ci_low"] < constant_columns["mean"] < constant_columns["ci_high"]
    assert constant["ci_low"] == pytest.approx(0.4) and constant["ci_high"] == pytest.approx(0.4)
    assert constant_gain["probability_of_improvement"] == 1.0
    assert constant_loss["probability_of_improvement"] == 0.0


def test_identical_variants_differ_by_nothing():
    values = np.random.default_rng(2).random((3, 40))
    assert compare(values, values) == {"difference": 0.0, "ci_low": 0.0, "ci_high": 0.0,
                                       "probability_of_improvement": 0.5}


def test_no_difference_on_average_gives_probability_one_half():
    reference = np.random.default_rng(3).random((3, 40))
    swapped = compare(reference[::-1], reference)  # same rows in another order: same mean
    assert swapped["difference"] == pytest.approx(0.0, abs=1e-12)
    assert swapped["probability_of_improvement"] == pytest.approx(0.5, abs=1e-6)


def test_a_clear_improvement_is_near_certain():
    rng = np.random.default_rng(4)
    reference = rng.random((3, 200)) < 0.5
    variant = rng.random((3, 200)) < 0.8
    result = compare(variant.astype(float), reference.astype(float))
    assert result["difference"] > 0.2 and result["ci_low"] > 0
    assert result["probability_of_improvement"] > 0.99
    assert compare(reference.astype(float), variant.astype(float))["probability_of_improvement"] < 0.01


def test_run_level_probability_is_the_t_probability():
    variant, reference = np.array([0.52, 0.55, 0.51]), np.array([0.50, 0.50, 0.50])
    differences = variant - reference
    standard_error = differences.std(ddof=1) / np.sqrt(3)
    expected = stats.t.cdf(differences.mean() / standard_error, 2)
    assert compare(variant, reference)["probability_of_improvement"] == pytest.approx(expected)
    assert compare(reference, variant)["probability_of_improvement"] == pytest.approx(1 - expected)


def test_compare_needs_paired_shapes():
    with pytest.raises(ValueError):
        compare(np.zeros((3, 10)), np.zeros((2, 10)))


def test_the_method_is_named_for_the_report():
    assert "Cochran-Cox" in CI_METHOD
    assert "seeds" in ASSUMPTIONS and "examples" in ASSUMPTIONS
