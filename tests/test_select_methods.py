"""Selection methods: the samplers, V-optimal and sentence-OD through the driver, the
registry (``run_method``) and the near-duplicate guard across methods."""

from types import SimpleNamespace

import numpy as np
import pytest

from fishersft_ray import select as selection
from fishersft_ray.features import FeatureSet
from fishersft_ray.select import CERTIFIED, METHODS, Hooks, SelectionRequest, logdet_gains, run_method
from fishersft_ray.select.methods import TARGETED
from fishersft_ray.select.vopt import select_vopt


# Small batched ops: one intra-op thread is much faster on a shared, loaded CPU.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def feature_pool(seed=0, n=120, d=8, max_len=30):
    rng = np.random.default_rng(seed)
    examples = [rng.normal(size=(int(m), d)) * rng.lognormal(0, 0.5, size=d) + rng.normal(size=d)
                for m in rng.integers(1, max_len, size=n)]
    return FeatureSet.from_examples(examples)


@pytest.mark.parametrize("method", ["uniform", "longest", "density"])
def test_baselines_respect_budgets(method):
    rng = np.random.default_rng(0)
    costs = rng.integers(1, 60, size=300)
    pool = SimpleNamespace(num_targets=costs)
    embeddings = rng.standard_normal((300, 8))
    pickers = {
        "uniform": lambda budget, unit: selection.uniform_random(pool, budget, budget_unit=unit, seed=1),
        "longest": lambda budget, unit: selection.longest_first(pool, budget, budget_unit=unit),
        "density": lambda budget, unit: selection.density_sampling(pool, embeddings, budget,
                                                                   budget_unit=unit, seed=1),
    }
    by_examples = pickers[method](40, "examples")
    assert len(by_examples) == 40 and len(set(by_examples)) == 40
    by_tokens = pickers[method](1500, "tokens")
    assert costs[by_tokens].sum() <= 1500
    assert costs[by_tokens].sum() > 1500 - costs.max()  # the fill does not stop early
    assert len(set(by_tokens)) == len(by_tokens)
    if method == "longest":
        assert costs[by_examples].min() >= np.sort(costs)[-40]


def test_density_sampling_prefers_sparse_regions():
    rng = np.random.default_rng(0)
    cluster = rng.standard_normal((1, 8)) + 0.01 * rng.standard_normal((200, 8))
    spread = rng.standard_normal((100, 8))
    embeddings = np.vstack([cluster, spread])
    picked = selection.density_sampling(SimpleNamespace(num_targets=np.ones(300)), embeddings, 50, seed=0)
    assert np.sum(picked >= 200) > 40  # uniform would give ~17 of 50 from the spread part


def test_v_optimal_matches_a_brute_force_greedy_and_respects_token_budgets():
    rng = np.random.default_rng(0)
    scales = np.array([3.0, 1.0, 1.0, 0.3, 0.3, 0.1])
    examples = [rng.normal(size=(int(m), 6)) * scales for m in rng.integers(1, 9, size=50)]
    features = FeatureSet.from_examples(examples)
    gram = sum(X.T @ X for X in examples)

    def variance(chosen):
        sigma = np.eye(6) + sum((examples[i].T @ examples[i] for i in chosen), np.zeros((6, 6)))
        return np.trace(gram @ np.linalg.inv(sigma))

    greedy = []
    for _ in range(6):
        greedy.append(min((i for i in range(50) if i not in greedy), key=lambda i: variance(greedy + [i])))
    np.testing.assert_array_equal(select_vopt(features, 6, batch_size=4).indices, greedy)
    picked = select_vopt(features, 30, budget_unit="tokens", batch_size=4).indices
    assert 0 < features.num_targets[picked].sum() <= 30 and len(set(picked.tolist())) == len(picked)


# --- V-optimal through the driver ---------------------------------------------------------


def test_v_optimal_runs_through_the_driver_naive_lazy_and_registry_agree():
    rng = np.random.default_rng(0)
    scales = np.array([3.0, 1.0, 1.0, 0.3, 0.3, 0.1])
    examples = [rng.normal(size=(int(m), 6)) * scales for m in rng.integers(1, 9, size=50)]
    features = FeatureSet.from_examples(examples)
    stored = [features.factor(i).astype(np.float64) for i in range(features.n)]  # float32 rows
    gram = sum(F.T @ F for F in stored)
    naive = select_vopt(features, 6, method="naive")
    lazy = run_method("vopt", features, SelectionRequest(6))
    np.testing.assert_array_equal(lazy.indices, naive.indices)
    assert lazy.method == "vopt" and lazy.upper_bound is None and lazy.certificate_ratio is None
    assert lazy.evaluations < naive.evaluations
    # objective = tr(G Σ_0⁻¹) − tr(G Σ_S⁻¹), gains its increments
    chosen = lazy.indices.tolist()
    sigma = np.eye(6) + sum(stored[i].T @ stored[i] for i in chosen)
    expected = np.trace(gram) - np.trace(gram @ np.linalg.inv(sigma))
    assert lazy.objective[-1] == pytest.approx(expected, rel=1e-9)
    np.testing.assert_allclose(np.cumsum(lazy.gains), lazy.objective, rtol=1e-9)
    # arrays work too
    np.testing.assert_array_equal(select_vopt(examples, 6).indices, lazy.indices)


# --- the registry ---------------------------------------------------------------------------


def test_registry_lists_every_method_and_rejects_unknown_names():
    assert METHODS == ("tokenod", "vopt", "sentence_od", "uniform", "longest_first", "density", "balanced",
                       "targeted", "targeted_vopt", "rds")
    assert CERTIFIED == {"tokenod", "sentence_od", "targeted"}
    with pytest.raises(ValueError, match="unknown selection method 'best'.*tokenod.*density"):
        run_method("best", feature_pool(), SelectionRequest(3))


def target_for(name, features):
    """A target set (a few of the pool's own examples) for the methods that read one."""
    return [features.factor(i) for i in range(0, 40, 10)] if name in TARGETED else None


@pytest.mark.parametrize("name", METHODS)
def test_every_method_respects_budgets_and_eligibility(name):
    features = feature_pool(1)
    costs = features.num_targets
    eligible = np.flatnonzero(costs <= np.median(costs))
    for budget_unit, budget in (("examples", 12), ("tokens", 150)):
        for allowed in (None, eligible):
            picked = run_method(name, features, SelectionRequest(budget, budget_unit=budget_unit, eligible=allowed,
                                                                 seed=3, groups=np.arange(features.n) % 3,
                                                                 target=target_for(name, features)))
            indices = picked.indices
            assert picked.method == name and picked.variant in (budget_unit, "cost_benefit",
                                                                "unit_cost", "examples")
            assert len(set(indices.tolist())) == len(indices) > 0
            used = len(indices) if budget_unit == "examples" else costs[indices].sum()
            assert used <= budget and picked.cost == used
            if budget_unit == "examples":
                assert len(indices) == budget
            if allowed is not None:
                assert set(indices.tolist()) <= set(eligible.tolist())
            if name in CERTIFIED:
                assert picked.upper_bound >= picked.objective[-1] - 1e-9
                assert 0 < picked.certificate_ratio <= 1 + 1e-12
            else:
                assert picked.upper_bound is None and picked.certificate_ratio is None


@pytest.mark.parametrize("name", ["uniform", "longest_first", "density"])
def test_samplers_report_logdet_gains_of_their_picks(name):
    features = feature_pool(2)
    prior = feature_pool(3, n=4)
    for budget_unit, budget in (("examples", 10), ("tokens", 120)):
        picked = run_method(name, features,
                            SelectionRequest(budget, budget_unit=budget_unit, lam=0.7, prior=prior))
        gains, objective = logdet_gains(features, picked.indices, 0.7, prior=prior)
        np.testing.assert_array_equal(picked.gains, gains)
        np.testing.assert_array_equal(picked.objective, objective)
        np.testing.assert_allclose(np.cumsum(gains), objective, rtol=1e-9)
        assert picked.evaluations == len(picked.indices) and picked.variant == budget_unit


def test_logdet_gains_are_tokenods_units():
    features = feature_pool(4)
    tokenod = run_method("tokenod", features, SelectionRequest(8, lam=0.5))
    gains, objective = logdet_gains(features, tokenod.indices, 0.5)
    np.testing.assert_allclose(gains, tokenod.gains, rtol=1e-10)
    np.testing.assert_allclose(objective, tokenod.objective, rtol=1e-10)


def test_samplers_match_their_definitions_and_seeds():
    """Positions as baselines.py gave them: seeded permutation, stable length order,
    Efraimidis-Spirakis keys over the inverse kernel density."""
    features = feature_pool(5)
    costs = features.num_targets
    n = features.n
    np.testing.assert_array_equal(run_method("uniform", features, SelectionRequest(9, seed=4)).indices,
                                  np.random.default_rng(4).permutation(n)[:9])
    np.testing.assert_array_equal(run_method("longest_first", features, SelectionRequest(9)).indices,
                                  np.argsort(-costs, kind="stable")[:9])
    density, _ = selection.kernel_density(features.embeddings)
    weights = 1.0 / density
    keys = np.log(np.random.default_rng(2).random(n)) / (weights / weights.max())
    np.testing.assert_array_equal(run_method("density", features, SelectionRequest(9, seed=2)).indices,
                                  np.argsort(-keys, kind="stable")[:9])
    # tokens: walk the order, keep what fits
    order = np.random.default_rng(4).permutation(n)
    np.testing.assert_array_equal(run_method("uniform", features,
                                             SelectionRequest(100, budget_unit="tokens", seed=4)).indices,
                                  selection.fill_budget(order, costs, 100, "tokens"))
    # eligible: the sampler runs on the eligible pool alone
    eligible = np.flatnonzero(costs % 2 == 0)
    np.testing.assert_array_equal(run_method("uniform", features,
                                             SelectionRequest(5, eligible=eligible, seed=1)).indices,
                                  eligible[np.random.default_rng(1).permutation(len(eligible))[:5]])


def test_sentence_od_is_logdet_on_one_embedding_row_per_example():
    features = feature_pool(6)
    picked = run_method("sentence_od", features, SelectionRequest(200, budget_unit="tokens", lam=0.3))
    rows = [row[None, :] for row in features.embeddings]
    one_row = FeatureSet.from_examples(rows, num_targets=features.num_targets)
    alone = selection.select(one_row, 200, budget_unit="tokens", lam=0.3)
    np.testing.assert_array_equal(picked.indices, alone.indices)
    np.testing.assert_array_equal(picked.objective, alone.objective)
    assert picked.method == "sentence_od"


def test_driver_methods_checkpoint_and_resume_through_the_registry():
    features = feature_pool(7)
    for name in ("tokenod", "vopt", "sentence_od"):
        states = []
        reference = run_method(name, features, SelectionRequest(8), Hooks(checkpoint=states.append))
        resumed = run_method(name, features, SelectionRequest(8), Hooks(resume=states[3]))
        np.testing.assert_array_equal(resumed.indices, reference.indices)
        np.testing.assert_array_equal(resumed.objective, reference.objective)
        other = "tokenod" if name != "tokenod" else "vopt"
        with pytest.raises(ValueError, match="objective"):
            run_method(other, features, SelectionRequest(8), Hooks(resume=states[3]))


# --- the near-duplicate guard in every method -----------------------------------------------


def pool_with_near_copies(seed=0):
    from test_select import planted_near_copies

    return FeatureSet.from_examples(planted_near_copies(seed, n_base=40, copies=40))


@pytest.mark.parametrize("name", METHODS)
def test_guard_keeps_twins_out_of_every_method(name):
    features = pool_with_near_copies()
    norms = np.linalg.norm(features.embeddings, axis=1, keepdims=True)
    unit = features.embeddings / np.maximum(norms, 1e-30)  # rows of zeros (no targets) stay zero
    for budget_unit, budget in (("examples", 30), ("tokens", 400)):
        picked = run_method(name, features, SelectionRequest(budget, budget_unit=budget_unit, near_dup_cosine=0.99,
                                                             seed=1, groups=np.arange(features.n) % 3,
                                                             target=target_for(name, features)))
        cosine = unit[picked.indices] @ unit[picked.indices].T
        np.fill_diagonal(cosine, -1)
        assert cosine.max() < 0.99
        assert picked.excluded_near_duplicates > 0
        used = len(picked.indices) if budget_unit == "examples" else features.num_targets[picked.indices].sum()
        assert used <= budget


def test_guard_is_exact_for_vopt_and_sentence_od_naive_vs_lazy():
    features = pool_with_near_copies(1)
    lazy = run_method("vopt", features, SelectionRequest(20, near_dup_cosine=0.99))
    naive = select_vopt(features, 20, method="naive", near_dup_cosine=0.99)
    one_row = FeatureSet.from_examples([row[None, :] for row in features.embeddings],
                                       num_targets=features.num_targets)
    sentence = run_method("sentence_od", features,
                          SelectionRequest(300, budget_unit="tokens", near_dup_cosine=0.99))
    sentence_naive = selection.select(one_row, 300, budget_unit="tokens", method="naive",
                                      near_dup_cosine=0.99)
    np.testing.assert_array_equal(sentence.indices, sentence_naive.indices)
    # V-optimal is not submodular: lazy is a heuristic; on this pool it agrees with naive.
    np.testing.assert_array_equal(lazy.indices, naive.indices)


def test_sampler_guard_skips_twins_while_walking_the_order():
    features = pool_with_near_copies(2)
    order = np.random.default_rng(1).permutation(features.n)
    guarded = run_method("uniform", features, SelectionRequest(25, seed=1, near_dup_cosine=0.99)).indices
    norms = np.linalg.norm(features.embeddings, axis=1, keepdims=True)
    unit = features.embeddings / np.maximum(norms, 1e-30)
    expected = []
    for i in order:  # the definition, by hand
        if len(expected) == 25:
            break
        if not expected or (unit[expected] @ unit[i]).max() < 0.99:
            expected.append(int(i))
    np.testing.assert_array_equal(guarded, expected)
    np.testing.assert_array_equal(
        selection.uniform_random(features, 25, seed=1, near_dup_cosine=0.99), expected)


# --- the label-aware baseline ---------------------------------------------------------------


def group_tokens(picks, costs, groups):
    return np.bincount(groups[picks], costs[picks], minlength=groups.max() + 1)


def test_balanced_spends_equal_tokens_per_group_up_to_one_example():
    rng = np.random.default_rng(0)
    costs = rng.integers(1, 40, size=600)
    groups = np.repeat([0, 1, 2, 3], [450, 50, 50, 50])  # one majority, three minorities
    pool = SimpleNamespace(n=600, num_targets=costs)
    for budget_unit, budget in (("examples", 60), ("tokens", 1500)):
        request = dict(budget_unit=budget_unit, groups=groups, report_logdet=False)
        picks = run_method("balanced", pool, SelectionRequest(budget, seed=4, **request)).indices
        spent = group_tokens(picks, costs, groups)
        slack = costs.max() * (1 if budget_unit == "examples" else 2)  # tokens: the fill past the order's prefix
        assert spent.max() - spent.min() <= slack, spent
        used = len(picks) if budget_unit == "examples" else costs[picks].sum()
        assert used <= budget and (budget_unit == "tokens" or used == budget)
        again = run_method("balanced", pool, SelectionRequest(budget, seed=4, **request)).indices
        other = run_method("balanced", pool, SelectionRequest(budget, seed=5, **request)).indices
        np.testing.assert_array_equal(picks, again)
        assert set(picks.tolist()) != set(other.tolist())


def test_balanced_fills_the_budget_when_a_group_runs_out():
    costs = np.full(100, 10)
    groups = np.repeat([0, 1, 2], [80, 15, 5])
    pool = SimpleNamespace(n=100, num_targets=costs)
    picks = run_method("balanced", pool, SelectionRequest(60, groups=groups, report_logdet=False)).indices
    counts = np.bincount(groups[picks], minlength=3)
    # group 2 gives all it has, group 1 too; their unused share goes to group 0
    assert len(picks) == 60 and counts.tolist() == [40, 15, 5]
    by_tokens = run_method("balanced", pool,
                           SelectionRequest(300, budget_unit="tokens", groups=groups, report_logdet=False))
    assert np.bincount(groups[by_tokens.indices], minlength=3).tolist() == [13, 12, 5]  # 300 tokens = 30 picks


def test_balanced_needs_groups_and_other_methods_never_read_them():
    features = feature_pool(4, n=40)
    with pytest.raises(ValueError, match="balanced needs each example's group.*--group-field"):
        run_method("balanced", features, SelectionRequest(5))
    for name in ("tokenod", "uniform", "density"):
        with_labels = run_method(name, features, SelectionRequest(8, groups=np.arange(40) % 2, seed=1)).indices
        np.testing.assert_array_equal(with_labels, run_method(name, features, SelectionRequest(8, seed=1)).indices)
