"""TokenOD engine: lazy == naive, exact objective, budgets, prior, certificate, validation."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from fishersft_ray.features import FeatureSet
from fishersft_ray.tokenod import _as_pool, _BoundTightener, _GainEvaluator, select

# Small batched ops: one intra-op thread is much faster on a shared, loaded CPU.
torch.set_num_threads(1)


def random_examples(rng, n, d, max_len):
    """Examples with lengths 0, 1, > d and in between, some rank-deficient or all zero."""
    lengths = rng.integers(0, max_len + 1, size=n)
    lengths[:3] = [0, 1, max(d + 3, max_len)]
    examples = []
    for m in lengths:
        scale = rng.lognormal(0.0, 0.7)
        X = scale * rng.normal(size=(m, d))
        if rng.random() < 0.1 and m > 1:  # rank one
            X = np.outer(rng.normal(size=m), rng.normal(size=d))
        if rng.random() < 0.05:
            X = np.zeros((m, d))
        examples.append(X)
    return examples


def logdet_objective(examples, picks, lam, prior=()):
    d = examples[0].shape[1]
    sigma0 = lam * np.eye(d) + sum((X.T @ X for X in prior), np.zeros((d, d)))
    sigma = sigma0 + sum((examples[i].T @ examples[i] for i in picks), np.zeros((d, d)))
    return np.linalg.slogdet(sigma)[1] - np.linalg.slogdet(sigma0)[1]


CASES = [(seed, d, lam) for seed, (d, lam) in enumerate(
    [(4, 1.0), (8, 0.1), (16, 3.0), (24, 0.5), (8, 10.0), (32, 1.0)])]


@pytest.mark.parametrize("seed,d,lam", CASES)
@pytest.mark.parametrize("as_feature_set", [False, True])
@pytest.mark.parametrize("budget_unit", ["examples", "tokens"])
def test_lazy_picks_and_objective_match_naive(seed, d, lam, as_feature_set, budget_unit):
    rng = np.random.default_rng(seed)
    examples = random_examples(rng, 120, d, 3 * d)
    data = FeatureSet.from_examples(examples) if as_feature_set else examples
    budget = 15 if budget_unit == "examples" else int(0.15 * sum(len(X) for X in examples))
    naive = select(data, budget, lam=lam, method="naive", budget_unit=budget_unit)
    lazy = select(data, budget, lam=lam, method="lazy", budget_unit=budget_unit)
    np.testing.assert_array_equal(lazy.indices, naive.indices)
    np.testing.assert_allclose(lazy.objective, naive.objective, rtol=1e-9)
    np.testing.assert_allclose(lazy.gains, naive.gains, rtol=1e-9, atol=1e-12)
    assert lazy.variant == naive.variant
    assert lazy.evaluations < naive.evaluations
    # The objective is f(S) of the picks, independently recomputed.
    expected = [logdet_objective(examples, lazy.indices[:t + 1], lam)
                for t in range(len(lazy.indices))]
    rtol = 1e-5 if as_feature_set else 1e-9  # a FeatureSet stores float32 factors
    np.testing.assert_allclose(lazy.objective, expected, rtol=rtol)
    assert np.all(np.diff(lazy.objective) >= -1e-12)
    assert lazy.upper_bound >= lazy.objective[-1] - 1e-9
    assert 0 < lazy.certificate_ratio <= 1 + 1e-12


@pytest.mark.parametrize("seed", range(4))
def test_token_budget_never_exceeded_and_zero_cost_never_picked(seed):
    rng = np.random.default_rng(100 + seed)
    examples = random_examples(rng, 80, 6, 30)
    costs = np.array([len(X) for X in examples])
    for budget in [0, 1, 7, 50, 400, int(costs.sum()) + 5]:
        selection = select(examples, budget, budget_unit="tokens")
        used = costs[selection.indices].sum()
        assert used <= budget
        assert selection.cost == used
        assert np.all(costs[selection.indices] > 0)
        assert len(set(selection.indices.tolist())) == len(selection.indices)
    assert set(selection.indices.tolist()) == set(np.flatnonzero(costs > 0).tolist())


def test_feature_set_token_cost_is_num_targets():
    rng = np.random.default_rng(7)
    examples = [rng.normal(size=(5, 4)) for _ in range(10)]
    num_targets = [50, 1, 1, 1, 1, 1, 1, 1, 1, 0]
    data = FeatureSet.from_examples(examples, num_targets=num_targets)
    selection = select(data, 8, budget_unit="tokens")
    assert 0 not in selection.indices and 9 not in selection.indices
    assert len(selection.indices) == 8 and selection.cost == 8


def test_budget_at_least_n_returns_every_example_in_greedy_order():
    rng = np.random.default_rng(3)
    examples = random_examples(rng, 25, 5, 12)
    lazy = select(examples, 1000)
    naive = select(examples, 25, method="naive")
    assert sorted(lazy.indices.tolist()) == list(range(25))
    np.testing.assert_array_equal(lazy.indices, naive.indices)
    assert np.all(np.diff(lazy.gains[lazy.gains > 1e-9]) <= 1e-9)  # greedy gains shrink
    assert select(examples, 0).indices.size == 0


def test_batch_size_does_not_change_picks():
    rng = np.random.default_rng(5)
    examples = random_examples(rng, 200, 12, 40)
    reference = select(examples, 30, method="naive")
    for batch_size in [1, 3, 64, 10_000]:
        selection = select(examples, 30, batch_size=batch_size)
        np.testing.assert_array_equal(selection.indices, reference.indices)


def test_gain_is_logdet_increment_and_zero_examples_gain_zero():
    rng = np.random.default_rng(11)
    d = 6
    examples = [np.zeros((0, d)), np.zeros((4, d)), rng.normal(size=(3, d)),
                np.outer(np.ones(9), rng.normal(size=d)), rng.normal(size=(20, d))]
    selection = select(examples, 5, lam=0.3)
    gains = dict(zip(selection.indices.tolist(), selection.gains.tolist()))
    assert gains[0] == 0.0 and gains[1] == 0.0
    first = int(selection.indices[0])
    expected = np.linalg.slogdet(0.3 * np.eye(d) + examples[first].T @ examples[first])[1] \
        - d * math.log(0.3)
    assert selection.gains[0] == pytest.approx(expected, rel=1e-12)


def test_prior_discounts_what_was_already_trained_on():
    rng = np.random.default_rng(2)
    d = 8
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    strong = 3.0 * rng.normal(size=(30, 4)) @ basis[:, :4].T
    weaker = 2.0 * rng.normal(size=(30, 4)) @ basis[:, 4:].T
    examples = [strong, weaker, 0.1 * rng.normal(size=(5, d))]
    assert select(examples, 1).indices[0] == 0
    with_prior = select(examples, 1, prior=[strong.copy()])
    assert with_prior.indices[0] == 1
    # The gain of a copy of the prior is what is left after conditioning on it.
    plain_gain = select([strong], 1).gains[0]
    conditioned = select([strong], 1, prior=[strong]).gains[0]
    assert conditioned < 0.5 * plain_gain
    expected = logdet_objective([strong], [0], 1.0, prior=[strong])
    assert conditioned == pytest.approx(expected, rel=1e-10)
    # A FeatureSet prior acts the same.
    as_features = select(examples, 1, prior=FeatureSet.from_examples([strong]))
    assert as_features.indices[0] == 1
    lazy = select(examples, 3, prior=[strong])
    naive = select(examples, 3, prior=[strong], method="naive")
    np.testing.assert_array_equal(lazy.indices, naive.indices)


@pytest.mark.parametrize("seed", range(8))
def test_brute_force_guarantee_and_certificate(seed):
    rng = np.random.default_rng(1000 + seed)
    n_items = int(rng.integers(6, 13))
    d = int(rng.integers(2, 6))
    lam = float(rng.choice([0.1, 1.0, 5.0]))
    examples = [rng.lognormal(0, 0.5) * rng.normal(size=(int(m), d))
                for m in rng.integers(0, 8, size=n_items)]
    values = {}
    for size in range(5):
        for subset in itertools.combinations(range(n_items), size):
            values[subset] = logdet_objective(examples, subset, lam)
    for budget in range(1, 5):
        opt = max(v for s, v in values.items() if len(s) <= budget)
        for method in ["naive", "lazy"]:
            selection = select(examples, budget, lam=lam, method=method)
            assert selection.objective[-1] >= (1 - 1 / math.e) * opt - 1e-9
            assert selection.objective[-1] <= opt + 1e-9
            assert selection.upper_bound >= opt - 1e-9
    costs = np.array([len(X) for X in examples])
    token_budget = int(costs.sum() // 3)
    feasible = [v for s, v in values.items() if costs[list(s)].sum() <= token_budget]
    opt_tokens = max(feasible)
    # Only subsets of up to 4 items were enumerated: a valid lower bound on OPT.
    selection = select(examples, token_budget, lam=lam, budget_unit="tokens")
    assert selection.upper_bound >= opt_tokens - 1e-9
    assert selection.objective[-1] >= 0.5 * (1 - 1 / math.e) * opt_tokens - 1e-9


def test_validation_errors_name_the_culprit():
    good = [np.ones((2, 3)), np.ones((1, 3))]
    bad_value = [np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 3))]
    bad_value[3][1, 2] = np.nan
    with pytest.raises(ValueError, match="example 3"):
        select(bad_value, 2)
    bad_value[3][1, 2] = np.inf
    with pytest.raises(ValueError, match="example 3"):
        select(bad_value, 2)
    with pytest.raises(ValueError, match="example 2.*ragged"):
        select([np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 4))], 1)
    with pytest.raises(ValueError, match="prior example 1"):
        select(good, 1, prior=[np.ones((1, 3)), np.full((1, 3), np.nan)])
    with pytest.raises(ValueError, match="budget"):
        select(good, -1)
    for lam in [0.0, -1.0, float("nan")]:
        with pytest.raises(ValueError, match="lam"):
            select(good, 1, lam=lam)
    with pytest.raises(ValueError, match="method"):
        select(good, 1, method="stochastic")
    with pytest.raises(ValueError, match="budget_unit"):
        select(good, 1, budget_unit="bytes")
    with pytest.raises(ValueError, match="batch_size"):
        select(good, 1, batch_size=0)


def test_progress_callback_and_empty_input():
    calls = []
    examples = [np.eye(3)[i:i + 1] for i in range(3)]
    select(examples, 2, progress=lambda step, total: calls.append((step, total)))
    assert calls == [(1, 2), (2, 2)]
    assert select([], 5).indices.size == 0


def grown_design(seed, d, as_feature_set):
    """A pool, its evaluator after 0 picks and a tightener with every entry evaluated at Σ_0."""
    rng = np.random.default_rng(seed)
    examples = random_examples(rng, 40, d, 2 * d)
    data = FeatureSet.from_examples(examples) if as_feature_set else examples
    pool = _as_pool(data, "example")
    evaluator = _GainEvaluator(pool, 0.5 * np.eye(d), "cpu")
    gains, traces = evaluator.gains(np.arange(pool.n))
    tightener = _BoundTightener(pool, evaluator, 0.5, gains, traces,
                                evaluated_at_start=not as_feature_set)
    return rng, pool, evaluator, tightener, gains


@pytest.mark.parametrize("seed,d", [(0, 3), (1, 8), (2, 16)])
@pytest.mark.parametrize("as_feature_set", [False, True])
def test_tightened_bounds_are_valid_and_beat_the_stale_gain(seed, d, as_feature_set):
    # Arrays: snapshot (μ) bounds only; FeatureSet: spectral bounds only (never evaluated).
    rng, pool, evaluator, tightener, stale = grown_design(seed, d, as_feature_set)
    tightener.advance(0)
    for step, i in enumerate(rng.choice(pool.n, size=12, replace=False), start=1):
        evaluator.add(int(i))
        tightener.advance(step)
        bounds = tightener.bounds()
        true, _ = evaluator.gains(np.arange(pool.n))
        assert np.all(bounds >= true * (1 - 1e-12) - 1e-12)
        some = rng.choice(pool.n, size=7, replace=False)  # the per-entry path agrees
        np.testing.assert_allclose(tightener.bounds(some), bounds[some], rtol=1e-12)
    grown = stale > 1e-3
    assert np.all(bounds[grown] < stale[grown])


@pytest.mark.parametrize("seed", range(3))
def test_each_snapshot_bound_dominates_the_shrunk_gain(seed):
    rng = np.random.default_rng(seed)
    r = int(rng.integers(1, 9))
    sigma = rng.lognormal(0, 2, size=r) * (rng.random(r) < 0.8)  # eigenvalues of ZᵀZ
    stale, total = np.log1p(sigma).sum(), sigma.sum()
    for mu in [1.0, 1.01, 2.0, 37.0]:
        shrunk = np.log1p(sigma / mu).sum()
        jensen = r * np.log1p(total / (r * mu))
        superadditive = stale + np.log1p((mu - 1) * np.exp(-stale)) - np.log(mu)
        assert shrunk <= min(jensen, superadditive, stale) * (1 + 1e-12) + 1e-15
        if mu > 1 and stale > 0:
            assert min(jensen, superadditive) < stale


class Crash(Exception):
    pass


def run_crashing_at(data, budget, crash_at, **kwargs):
    """Run select, raising from the checkpoint hook at its ``crash_at``-th call; the last state."""
    states = []

    def hook(state):
        states.append(json.loads(json.dumps(state)))
        if len(states) == crash_at:
            raise Crash

    with pytest.raises(Crash):
        select(data, budget, checkpoint=hook, **kwargs)
    return states[-1]


@pytest.mark.parametrize("budget_unit,method", [("examples", "lazy"), ("tokens", "lazy"),
                                                ("examples", "naive")])
def test_resume_after_a_crash_gives_the_identical_answer(budget_unit, method):
    rng = np.random.default_rng(21)
    examples = random_examples(rng, 80, 8, 24)
    data = FeatureSet.from_examples(examples)
    budget = 12 if budget_unit == "examples" else 200
    kwargs = dict(lam=0.5, budget_unit=budget_unit, method=method)
    reference = select(data, budget, **kwargs)
    calls = []
    select(data, budget, checkpoint=calls.append, **kwargs)
    for crash_at in sorted({1, 5, len(calls) // 2, len(calls) - 1}):
        state = run_crashing_at(data, budget, crash_at, **kwargs)
        resumed = select(data, budget, resume=state, **kwargs)
        np.testing.assert_array_equal(resumed.indices, reference.indices)
        np.testing.assert_array_equal(resumed.gains, reference.gains)
        np.testing.assert_array_equal(resumed.objective, reference.objective)
        assert resumed.variant == reference.variant
        assert resumed.upper_bound >= resumed.objective[-1] - 1e-9
    if budget_unit == "tokens":  # crashes landed in both knapsack variants
        assert {c["running"] for c in calls} == {"cost_benefit", "unit_cost"}
    with pytest.raises(ValueError, match="budget"):
        select(data, budget + 1, resume=state, **kwargs)


def test_threads_argument_is_restored():
    before = torch.get_num_threads()
    select([np.eye(3)], 1, threads=2)
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        select([np.eye(3)], 1, threads=0)
