"""Selection engine (select/greedy.py + select/logdet.py): lazy == naive, exact objective,
budgets, prior, certificate, validation, resume, λ conditioning, FeatureSet checks, the guard."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from fishersft_ray.features import FeatureSet
from fishersft_ray.select import Hooks, Selection, logdet_gains, select
from fishersft_ray.select.logdet import _as_pool, _BoundTightener, _GainEvaluator


# Small batched ops: one intra-op thread is much faster on a shared, loaded CPU.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    select(examples, 2, hooks=Hooks(progress=lambda step, total: calls.append((step, total))))
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


@pytest.mark.parametrize("seed,d", [(0, 8), (1, 16)])
@pytest.mark.parametrize("as_feature_set", [False, True])
def test_rank_updated_bounds_are_within_rounding_of_the_gain(seed, d, as_feature_set):
    """Woodbury updates of cached Grams, chained pick after pick: never below the direct
    gain, within 1e-8 of it, and applied exactly where a Gram and the picks' factors are kept."""
    rng = np.random.default_rng(seed)
    examples = [X[:d] for X in random_examples(rng, 40, d, 2 * d)]  # a Gram per batch: widths ≤ d
    pool = _as_pool(FeatureSet.from_examples(examples) if as_feature_set else examples, "example")
    evaluator = _GainEvaluator(pool, 0.5 * np.eye(d), "cpu")
    evaluator.track_updates()
    reference = _GainEvaluator(pool, 0.5 * np.eye(d), "cpu")
    ids = np.arange(pool.n)
    evaluator.gains(ids)
    picked, updated = [], 0
    for i in rng.choice(np.flatnonzero(pool.widths), size=10, replace=False).tolist():
        evaluator.add(i)
        reference.add(i)
        picked.append(i)
        bounds, traces, done = evaluator.updates.updated_gains(ids)
        true, true_traces = reference.gains(ids)
        expected = (pool.widths > 0) & ~np.isin(ids, picked)
        if pool.widths[i] > evaluator.updates.max_rows:  # too many rows picked since the Grams
            expected[:] = False
        np.testing.assert_array_equal(done, expected)
        assert np.all(bounds[done] >= true[done]) and np.all(traces[done] >= true_traces[done])
        np.testing.assert_allclose(bounds[done], true[done], rtol=1e-8, atol=1e-10)
        evaluator.gains(ids[~done & ~np.isin(ids, picked)])  # fresh Grams; the rest chain on
        updated += int(done.sum())
    assert updated > 0


@pytest.mark.parametrize("budget_unit", ["examples", "tokens"])
def test_rank_updates_and_a_tiny_gram_cache_leave_the_picks_unchanged(monkeypatch, budget_unit):
    from fishersft_ray.select import logdet

    rng = np.random.default_rng(5)
    data = FeatureSet.from_examples(random_examples(rng, 150, 12, 30))
    budget = 20 if budget_unit == "examples" else 300
    naive = select(data, budget, lam=0.5, method="naive", budget_unit=budget_unit)
    lazy = select(data, budget, lam=0.5, budget_unit=budget_unit)
    assert lazy.bound_updates > 0 and naive.bound_updates == 0
    monkeypatch.setattr(logdet, "GRAM_CACHE_BYTES", 3000)  # a few Grams at a time
    small = select(data, budget, lam=0.5, budget_unit=budget_unit)
    monkeypatch.setattr(logdet, "RANK_UPDATES", False)
    plain = select(data, budget, lam=0.5, budget_unit=budget_unit)
    assert plain.bound_updates == 0 and 0 < small.bound_updates < lazy.bound_updates
    for run in (lazy, small, plain):
        np.testing.assert_array_equal(run.indices, naive.indices)
        np.testing.assert_array_equal(run.gains, naive.gains)


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
        select(data, budget, **kwargs, hooks=Hooks(checkpoint=hook))
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
    select(data, budget, **kwargs, hooks=Hooks(checkpoint=calls.append))
    for crash_at in sorted({1, 5, len(calls) // 2, len(calls) - 1}):
        state = run_crashing_at(data, budget, crash_at, **kwargs)
        resumed = select(data, budget, **kwargs, hooks=Hooks(resume=state))
        np.testing.assert_array_equal(resumed.indices, reference.indices)
        np.testing.assert_array_equal(resumed.gains, reference.gains)
        np.testing.assert_array_equal(resumed.objective, reference.objective)
        assert resumed.variant == reference.variant
        assert resumed.upper_bound >= resumed.objective[-1] - 1e-9
    if budget_unit == "tokens":  # crashes landed in both knapsack variants
        assert {c["running"] for c in calls} == {"cost_benefit", "unit_cost"}
    with pytest.raises(ValueError, match="budget"):
        select(data, budget + 1, **kwargs, hooks=Hooks(resume=state))


def test_threads_argument_is_restored():
    before = torch.get_num_threads()
    select([np.eye(3)], 1, threads=2)
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        select([np.eye(3)], 1, threads=0)


def test_selection_defaults_and_certificate_none_without_bound():
    selection = select([np.eye(3)[i:i + 1] for i in range(3)], 2)
    assert selection.method == "tokenod" and selection.excluded_near_duplicates == 0
    bare = Selection(np.array([0]), np.array([1.0]), np.array([1.0]), None, 1, 1.0, "examples")
    assert bare.certificate_ratio is None


@pytest.mark.parametrize("as_feature_set", [False, True])
def test_every_prefix_is_the_greedy_answer_under_an_example_budget(as_feature_set):
    rng = np.random.default_rng(8)
    examples = random_examples(rng, 60, 6, 15)
    data = FeatureSet.from_examples(examples) if as_feature_set else examples
    full = select(data, 20, lam=0.5)
    for k in (1, 4, 11, 19):
        np.testing.assert_array_equal(select(data, k, lam=0.5).indices, full.indices[:k])


# --- λ against the data: the conditioning check ---------------------------------------


def subspace_examples(rng, n, d, k, spread=3.0):
    """Rows in a k-dim subspace of R^d with scales over `spread` decades: Σ_S keeps
    eigenvalues at λ whatever is picked (the hard case for precision)."""
    basis = np.linalg.qr(rng.normal(size=(d, k)))[0].T * np.logspace(0, -spread, k)[:, None]
    return [rng.normal(size=(int(m), k)) @ basis for m in rng.integers(1, 3 * k, size=n)]


def advised_lam(message):
    import re

    return float(re.search(r"--lam >= ([0-9.e+-]+)", message).group(1))


@pytest.mark.parametrize("as_feature_set", [False, True])
@pytest.mark.parametrize("method", ["naive", "lazy"])
def test_tiny_lam_is_rejected_with_advice_naming_the_flags(as_feature_set, method):
    rng = np.random.default_rng(4)
    examples = [rng.normal(size=(int(m), 8)) for m in rng.integers(1, 12, size=30)]
    data = FeatureSet.from_examples(examples) if as_feature_set else examples
    with pytest.raises(ValueError, match="--lam .*--lam-relative") as error:
        select(data, 5, lam=1e-15, method=method)
    safe = advised_lam(str(error.value))
    largest = max(np.linalg.norm(X, 2) ** 2 for X in examples)
    assert safe == pytest.approx(largest / 1e12, rel=1e-2)  # MAX_CONDITION = 1e12
    select(data, 5, lam=1.01 * safe, method=method)  # the advice is enough
    with pytest.raises(ValueError, match="--lam"):
        select(data, 5, lam=0.5 * safe, method=method, budget_unit="tokens")
    with pytest.raises(ValueError, match="--lam"):
        logdet_gains(data, [0, 1], lam=1e-15)


def test_a_heavy_prior_counts_in_the_conditioning():
    rng = np.random.default_rng(5)
    examples = [rng.normal(size=(3, 6)) for _ in range(10)]
    select(examples, 2, lam=1e-6)
    with pytest.raises(ValueError, match="--lam"):
        select(examples, 2, lam=1e-6, prior=[1e5 * rng.normal(size=(2, 6))])


def test_ineligible_examples_do_not_count_in_the_conditioning():
    rng = np.random.default_rng(6)
    examples = [rng.normal(size=(3, 6)) for _ in range(10)] + [1e4 * rng.normal(size=(2, 6))]
    with pytest.raises(ValueError, match="--lam"):
        select(examples, 2, lam=1e-6)
    assert 10 not in select(examples, 2, lam=1e-6, eligible=np.arange(10)).indices


@pytest.mark.parametrize("method", ["naive", "lazy"])
def test_a_factorisation_that_still_fails_is_a_value_error(monkeypatch, method):
    import fishersft_ray.select.logdet as logdet

    monkeypatch.setattr(logdet, "MAX_CONDITION", math.inf)  # let λ through the check
    rng = np.random.default_rng(0)
    examples = subspace_examples(rng, 30, 12, 4)
    largest = max(np.linalg.norm(X, 2) ** 2 for X in examples)
    with pytest.raises(ValueError, match="linear algebra failed.*--lam"):
        select(examples, 10, lam=largest * 1e-17, method=method)


def test_picks_and_gains_are_exact_at_the_accepted_conditioning_limit():
    """At κ = MAX_CONDITION the picks equal a 60-digit greedy and gains are accurate."""
    mpmath = pytest.importorskip("mpmath")
    from fishersft_ray.select.logdet import MAX_CONDITION

    rng = np.random.default_rng(2)
    examples = subspace_examples(rng, 16, 8, 3)
    largest = max(np.linalg.norm(X, 2) ** 2 for X in examples)
    lam = largest / (MAX_CONDITION - 1) * (1 + 1e-9)
    picks, gains = [], []
    with mpmath.workdps(60):
        grams = [mpmath.matrix((X.T @ X).tolist()) for X in examples]
        sigma = mpmath.eye(8) * mpmath.mpf(lam)
        for _ in range(5):
            current = mpmath.log(mpmath.det(sigma))
            scored = [(mpmath.log(mpmath.det(sigma + G)) - current, -i)
                      for i, G in enumerate(grams) if i not in picks]
            gain, negative = max(scored)
            picks.append(-negative)
            gains.append(float(gain))
            sigma = sigma + grams[-negative]
    for method in ("naive", "lazy"):
        selection = select(examples, 5, lam=lam, method=method)
        assert selection.indices.tolist() == picks
        np.testing.assert_allclose(selection.gains, gains, rtol=1e-5)


# --- FeatureSet validation --------------------------------------------------------------


def small_feature_set(**keys):
    rng = np.random.default_rng(9)
    return FeatureSet.from_examples([rng.normal(size=(int(m), 4)) for m in (2, 3, 5, 1, 4)], **keys)


def tampered(features, factors=None, spectrum=None, offsets=None):
    return FeatureSet(features.factors.copy() if factors is None else factors,
                      features.spectrum.copy() if spectrum is None else spectrum,
                      features.offsets if offsets is None else offsets,
                      row_index=features.row_index, ids=features.ids)


@pytest.mark.parametrize("method", ["naive", "lazy"])
@pytest.mark.parametrize("budget_unit", ["examples", "tokens"])
def test_nan_factors_are_rejected_naming_the_example(method, budget_unit):
    features = small_feature_set(row_index=[10, 11, 12, 13, 14], ids=list("abcde"))
    factors = features.factors.copy()
    factors[features.offsets[2] + 1, 3] = np.nan
    with pytest.raises(ValueError, match=r"example 2 \(row_index 12, id 'c'\).*non-finite"):
        select(tampered(features, factors=factors), 3, method=method, budget_unit=budget_unit)


@pytest.mark.parametrize("method", ["naive", "lazy"])
def test_a_spectrum_that_does_not_match_the_factors_is_rejected(method):
    features = small_feature_set()
    spectrum = features.spectrum.copy()
    spectrum[features.offsets[3]:features.offsets[4]] = 0.0
    with pytest.raises(ValueError, match="example 3 .*spectrum does not match"):
        select(tampered(features, spectrum=spectrum), 3, method=method)
    swapped = features.spectrum.copy()
    swapped[features.offsets[1]:features.offsets[2]] *= 2.0
    with pytest.raises(ValueError, match="example 1 .*spectrum does not match"):
        select(tampered(features, spectrum=swapped), 3, method=method)
    negative = features.spectrum.copy()
    negative[features.offsets[4]] = -1.0
    with pytest.raises(ValueError, match="example 4 .*negative spectrum"):
        select(tampered(features, spectrum=negative), 3, method=method)
    nan = features.spectrum.copy()
    nan[features.offsets[2]] = np.nan
    with pytest.raises(ValueError, match="example 2 .*non-finite spectrum"):
        select(tampered(features, spectrum=nan), 3, method=method)


@pytest.mark.parametrize("method", ["naive", "lazy"])
def test_factor_wider_than_d_is_rejected(method):
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(9, 4)).astype(np.float32)
    spectrum = np.zeros(9, np.float32)
    offsets = np.array([0, 2, 9])
    for a, b in zip(offsets[:-1], offsets[1:]):  # a spectrum consistent in sum
        spectrum[a] = float(np.sum(rows[a:b].astype(np.float64) ** 2))
    features = FeatureSet(rows, spectrum, offsets)
    with pytest.raises(ValueError, match="example 1 .*7 rows, more than d = 4"):
        select(features, 1, method=method)


def test_a_memory_mapped_feature_set_is_validated_by_streaming(tmp_path, monkeypatch):
    import fishersft_ray.validation as validation

    features = small_feature_set()
    factors = features.factors.copy()
    factors[features.offsets[4]] = np.inf
    path = tmp_path / "factors.f32"
    factors.tofile(path)
    mapped = np.memmap(path, np.float32, "r", shape=factors.shape)
    monkeypatch.setattr(validation, "VALIDATION_CHUNK_ELEMENTS", 8)  # two rows per read
    with pytest.raises(ValueError, match="example 4"):
        validation.check_feature_set(tampered(features, factors=mapped))
    good = np.memmap(tmp_path / "good.f32", np.float32, "w+", shape=factors.shape)
    good[:] = features.factors
    good.flush()
    mapped = np.memmap(tmp_path / "good.f32", np.float32, "r", shape=factors.shape)
    on_disk = select(tampered(features, factors=mapped), 3)
    np.testing.assert_array_equal(on_disk.indices, select(features, 3).indices)


# --- near-duplicate guard ---------------------------------------------------------------


def planted_near_copies(seed, n_base=30, copies=30, d=8):
    """Examples plus near-copies of some of them (scaled, jittered), and two empty ones."""
    rng = np.random.default_rng(seed)
    base = [rng.normal(size=(int(m), d)) + 2 * rng.normal(size=d)
            for m in rng.integers(1, 3 * d, size=n_base)]
    examples = list(base)
    for _ in range(copies):
        source = base[int(rng.integers(n_base))]
        examples.append(source * (1 + 0.01 * rng.normal()) + 0.01 * rng.normal(size=source.shape))
    examples += [np.zeros((0, d)), np.zeros((0, d))]
    return [examples[i] for i in rng.permutation(len(examples))]


def max_pair_cosine(embeddings, picks):
    unit = embeddings[picks] / np.maximum(np.linalg.norm(embeddings[picks], axis=1, keepdims=True), 1e-300)
    cosine = unit @ unit.T
    np.fill_diagonal(cosine, -1)
    return cosine.max()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("as_feature_set", [False, True])
@pytest.mark.parametrize("budget_unit", ["examples", "tokens"])
def test_guard_lazy_equals_naive_and_keeps_twins_out(seed, as_feature_set, budget_unit):
    examples = planted_near_copies(seed)
    data = FeatureSet.from_examples(examples) if as_feature_set else examples
    embeddings = np.stack([X.mean(axis=0) if len(X) else np.zeros(8) for X in examples])
    budget = 25 if budget_unit == "examples" else 250
    kwargs = dict(lam=0.5, budget_unit=budget_unit, near_dup_cosine=0.99)
    naive = select(data, budget, method="naive", **kwargs)
    lazy = select(data, budget, **kwargs)
    np.testing.assert_array_equal(lazy.indices, naive.indices)
    np.testing.assert_allclose(lazy.gains, naive.gains, rtol=1e-9, atol=1e-12)
    assert 0 < lazy.excluded_near_duplicates <= naive.excluded_near_duplicates
    nonzero = [i for i in lazy.indices if len(examples[i])]
    assert max_pair_cosine(embeddings, nonzero) < 0.99
    unguarded = select(data, budget, lam=0.5, budget_unit=budget_unit)
    assert max_pair_cosine(embeddings, [i for i in unguarded.indices if len(examples[i])]) >= 0.99
    assert lazy.upper_bound >= lazy.objective[-1] - 1e-9
    again = select(data, budget, **kwargs)
    np.testing.assert_array_equal(again.indices, lazy.indices)
    assert again.excluded_near_duplicates == lazy.excluded_near_duplicates


def test_guard_never_pairs_rows_of_zeros_and_checks_its_threshold():
    d = 4
    examples = [np.zeros((0, d)), np.zeros((0, d)), np.eye(d)[:1], 2 * np.eye(d)[:1], np.eye(d)[1:2]]
    selection = select(examples, 5, near_dup_cosine=0.9)
    assert sorted(selection.indices.tolist()) == [0, 1, 3, 4]  # 2 is a twin of 3, zeros never
    assert selection.excluded_near_duplicates == 1
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="near_dup_cosine"):
            select(examples, 2, near_dup_cosine=bad)
    features = FeatureSet(np.eye(d, dtype=np.float32), np.ones(d, np.float32), np.arange(d + 1))
    with pytest.raises(ValueError, match="embeddings"):  # a hand-built set without embeddings
        select(features, 2, near_dup_cosine=0.9)


def test_guard_resume_gives_the_identical_answer():
    examples = planted_near_copies(5)
    data = FeatureSet.from_examples(examples)
    kwargs = dict(lam=0.5, budget_unit="tokens", near_dup_cosine=0.99)
    reference = select(data, 200, **kwargs)
    state = run_crashing_at(data, 200, 7, **kwargs)
    resumed = select(data, 200, **kwargs, hooks=Hooks(resume=state))
    np.testing.assert_array_equal(resumed.indices, reference.indices)
    np.testing.assert_array_equal(resumed.objective, reference.objective)
    with pytest.raises(ValueError, match="near_dup_cosine"):
        select(data, 200, lam=0.5, budget_unit="tokens", hooks=Hooks(resume=state))


@pytest.mark.parametrize("method", ["naive", "lazy"])
def test_eligible_restricts_the_picks_and_matches_a_subset_run(method):
    rng = np.random.default_rng(12)
    examples = random_examples(rng, 50, 6, 15)
    data = FeatureSet.from_examples(examples)
    eligible = np.flatnonzero(np.array([len(X) for X in examples]) <= 8)
    for budget_unit, budget in (("examples", 10), ("tokens", 60)):
        picked = select(data, budget, method=method, budget_unit=budget_unit, eligible=eligible)
        alone = select(data.subset(eligible), budget, method=method, budget_unit=budget_unit)
        np.testing.assert_array_equal(picked.indices, eligible[alone.indices])
        np.testing.assert_allclose(picked.objective, alone.objective, rtol=1e-12)
    mask = np.zeros(len(examples), bool)
    mask[eligible] = True
    np.testing.assert_array_equal(select(data, 10, eligible=mask).indices,
                                  select(data, 10, eligible=eligible).indices)
    with pytest.raises(ValueError, match="eligible"):
        select(data, 3, eligible=[0, 99])


def test_no_select_function_takes_more_than_eight_parameters():
    """Settings travel as one SelectionRequest (and Hooks), never as long argument lists."""
    import ast
    import pathlib

    import fishersft_ray.select

    too_many = []
    for path in sorted(pathlib.Path(fishersft_ray.select.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                arguments = node.args
                names = [a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs]
                names += [a.arg for a in (arguments.vararg, arguments.kwarg) if a is not None]
                count = len([name for name in names if name not in ("self", "cls")])
                if count > 8:
                    too_many.append(f"{path.name}:{node.lineno} {getattr(node, 'name', 'lambda')} ({count})")
    assert not too_many, too_many
