"""Selection aimed at a target set (select/targeted.py) and the exact lazy loop of V-optimal
designs (greedy._bounded_lazy_greedy with vopt.py's bound)."""

import numpy as np
import pytest

from fishersft_ray.features import FeatureSet
from fishersft_ray.select import SelectionRequest, run_method
from fishersft_ray.select.logdet import run_objective
from fishersft_ray.select.request import Hooks
from fishersft_ray.select.targeted import principal_directions, rds_scores, run_targeted_vopt
from fishersft_ray.select.vopt import VOptimalObjective

D = 8


def _pool_and_target(seed=0, n=120):
    """A pool with an anisotropic spectrum and a target leaning on one direction of it."""
    rng = np.random.default_rng(seed)
    scales = np.linspace(2.0, 0.2, D)
    pool = [rng.normal(size=(int(m), D)) * scales for m in rng.integers(1, 10, size=n)]
    lean = rng.normal(size=D)
    target = [rng.normal(size=(int(m), D)) * scales * 0.3 + np.outer(rng.normal(size=int(m)), lean)
              for m in rng.integers(2, 7, size=6)]
    return pool, target


def test_the_bound_holds_for_every_later_design():
    """Δ(i|S′) ≤ scale(S′) · term_i(S) for S ⊆ S′: the inequality that makes lazy greedy exact."""
    pool, target = _pool_and_target(1)
    features = FeatureSet.from_examples(pool)
    request = SelectionRequest(5)
    rng = np.random.default_rng(2)
    from fishersft_ray.select.logdet import _as_pool

    rows = _as_pool(features, "example")
    gram = sum(X.T @ X for X in target)
    objective = VOptimalObjective(rows, np.eye(D), request, gram=gram)
    checked = 0
    for _ in range(20):
        objective.reset()
        order = rng.permutation(features.n)
        earlier, later = order[:int(rng.integers(0, 5))], order[:int(rng.integers(5, 25))]
        for i in earlier:
            objective.add(int(i))
        candidates = order[30:]
        _, terms = objective.gains(candidates)
        for i in later[len(earlier):]:
            objective.add(int(i))
        gains, _ = objective.gains(candidates)
        assert np.all(gains <= objective.bound_scale() * terms + 1e-12)
        checked += len(candidates)
    # The initial terms (from the stored spectra) bound the gains at Σ_0 too.
    objective.reset()
    initial = objective.initial_bounds(np.arange(features.n))
    gains, _ = objective.gains(np.arange(features.n))
    assert np.all(gains <= initial.values + 1e-12) and checked > 1000


@pytest.mark.parametrize("budget_unit, budget", [("examples", 8), ("tokens", 40)])
def test_targeted_vopt_lazy_picks_what_naive_and_a_brute_force_greedy_pick(budget_unit, budget):
    pool, target = _pool_and_target(0)
    features = FeatureSet.from_examples(pool)
    request = SelectionRequest(budget, budget_unit=budget_unit, target=target)
    lazy = run_method("targeted_vopt", features, request)
    naive = run_targeted_vopt(features, request, method="naive")
    np.testing.assert_array_equal(lazy.indices, naive.indices)
    assert lazy.upper_bound is None and lazy.method == "targeted_vopt"
    assert lazy.evaluations < naive.evaluations
    # The definition, by hand: the target's variance along its principal directions U.
    gram = sum(np.asarray(X, np.float64).T @ np.asarray(X, np.float64) for X in target)
    directions = principal_directions(gram)
    k = directions.shape[1]
    projected = [np.asarray(features.factor(i), np.float64) @ directions for i in range(features.n)]
    small = directions.T @ gram @ directions

    def variance(chosen):
        sigma = np.eye(k) + sum((projected[i].T @ projected[i] for i in chosen), np.zeros((k, k)))
        return np.trace(small @ np.linalg.inv(sigma))

    if budget_unit == "examples":  # least target variance each step
        chosen = []
        for _ in range(budget):
            chosen.append(min((i for i in range(features.n) if i not in chosen),
                              key=lambda i: variance(chosen + [i])))
        np.testing.assert_array_equal(lazy.indices, chosen)
    else:
        assert 0 < features.num_targets[lazy.indices].sum() <= budget
    assert lazy.objective[-1] == pytest.approx(variance([]) - variance(lazy.indices.tolist()), rel=1e-6)


def test_vopt_lazy_is_exact_through_the_same_bound():
    pool, _ = _pool_and_target(3)
    features = FeatureSet.from_examples(pool)
    request = SelectionRequest(10)
    lazy = run_method("vopt", features, request)
    naive = run_objective(VOptimalObjective, features, request, method="naive", label="vopt")
    np.testing.assert_array_equal(lazy.indices, naive.indices)


def test_targeted_vopt_resumes_from_a_checkpoint_to_the_same_picks():
    pool, target = _pool_and_target(4)
    features = FeatureSet.from_examples(pool)
    request = SelectionRequest(8, target=target)
    states = []
    full = run_method("targeted_vopt", features, request, Hooks(checkpoint=states.append))
    state = states[3]
    resumed = run_method("targeted_vopt", features, request, Hooks(resume=state))
    np.testing.assert_array_equal(resumed.indices, full.indices)


def test_targeted_is_certified_tokenod_on_the_targets_directions():
    pool, target = _pool_and_target(5)
    features = FeatureSet.from_examples(pool)
    request = SelectionRequest(6, target=target)
    picked = run_method("targeted", features, request)
    gram = sum(np.asarray(X).T @ np.asarray(X) for X in target)
    directions = principal_directions(gram)
    assert 1 <= directions.shape[1] < D
    values = np.linalg.eigvalsh(gram)[::-1]
    k = directions.shape[1]
    assert values[:k].sum() >= 0.9 * values.sum() > values[:k - 1].sum()
    # The same picks as TokenOD on the projected states, with its certificate.
    projected = run_method("tokenod", FeatureSet.from_examples([X @ directions for X in pool]),
                           SelectionRequest(6))
    np.testing.assert_array_equal(picked.indices, projected.indices)
    assert picked.upper_bound is not None and 0 < picked.certificate_ratio <= 1


def test_rds_ranks_by_the_largest_cosine_to_a_target_example_and_fills_the_budget():
    pool, target = _pool_and_target(6)
    features = FeatureSet.from_examples(pool)
    means = np.array([X.mean(axis=0) for X in pool])
    target_means = np.array([X.mean(axis=0) for X in target])
    unit = means / np.linalg.norm(means, axis=1, keepdims=True)
    target_unit = target_means / np.linalg.norm(target_means, axis=1, keepdims=True)
    scores = (unit @ target_unit.T).max(axis=1)
    np.testing.assert_allclose(rds_scores(features, target), scores, rtol=1e-5)
    order = np.argsort(-rds_scores(features, target), kind="stable")
    picked = run_method("rds", features, SelectionRequest(7, target=target))
    np.testing.assert_array_equal(picked.indices, order[:7])
    tokens = run_method("rds", features, SelectionRequest(30, budget_unit="tokens", target=target))
    spent, expected = 0, []
    for i in order:  # walk the ranking, keep what still fits
        if spent + features.num_targets[i] <= 30:
            expected.append(i)
            spent += features.num_targets[i]
    np.testing.assert_array_equal(tokens.indices, expected)


def test_targeted_methods_accept_a_target_featureset_and_arrays_alike():
    pool, target = _pool_and_target(7)
    features = FeatureSet.from_examples(pool)
    as_features = FeatureSet.from_examples(target, dtype=np.float64)
    for name in ("targeted", "targeted_vopt", "rds"):
        a = run_method(name, features, SelectionRequest(5, target=target))
        b = run_method(name, features, SelectionRequest(5, target=as_features))
        np.testing.assert_array_equal(a.indices, b.indices)


def test_bad_targets_get_one_line_errors():
    pool, target = _pool_and_target(8)
    features = FeatureSet.from_examples(pool)
    for name in ("targeted", "targeted_vopt", "rds"):
        with pytest.raises(ValueError, match="none was given"):
            run_method(name, features, SelectionRequest(5))
        with pytest.raises(ValueError, match="no target tokens"):
            run_method(name, features, SelectionRequest(5, target=[np.zeros((0, D))]))
        with pytest.raises(ValueError, match="dimension 5 but the pool's have 8"):
            run_method(name, features, SelectionRequest(5, target=[np.ones((3, 5))]))
        other = FeatureSet.from_examples(target, meta={"model_fingerprint": "b" * 64})
        mine = FeatureSet.from_examples(pool, meta={"model_fingerprint": "a" * 64})
        with pytest.raises(ValueError, match="another model"):
            run_method(name, mine, SelectionRequest(5, target=other))
    with pytest.raises(ValueError, match="does not select for a target set"):
        run_method("tokenod", features, SelectionRequest(5, target=target))
