"""Lazy greedy with a tolerance (``SelectionRequest.greedy_tolerance``, issue 30 item 6): each
pick is within 1 − ε of the best priority among what still fits, the a-priori guarantee
holds against brute force, and the option is checked, recorded and kept out of exact runs."""

import itertools
import math

import numpy as np
import pytest

from fishersft_ray.features import FeatureSet
from fishersft_ray.select import Hooks, SelectionRequest, run_method, select
from fishersft_ray.select.greedy import KNAPSACK_VARIANTS, InitialBounds, guaranteed_ratio, run_greedy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def near_tie_examples(rng, n, d):
    """Examples whose gain per token lie close together, as real hidden states' do: a shared
    mean, a decaying covariance, lengths 1 to 3d."""
    scales = 1.0 / np.sqrt(1.0 + np.arange(d))
    mean = rng.normal(size=d)
    return [mean + rng.normal(size=(int(m), d)) * scales for m in rng.integers(1, 3 * d, size=n)]


def gain(examples, sigma, i):
    X = examples[i]
    return np.linalg.slogdet(sigma + X.T @ X)[1] - np.linalg.slogdet(sigma)[1]


def worst_step_ratio(examples, selection, budget, budget_unit, lam):
    """min over the picks of (pick's priority) / (best priority among the unpicked examples
    that still fit), recomputed from scratch in float64; priorities are gain / tokens for
    the cost-benefit run, gains otherwise."""
    d = examples[0].shape[1]
    costs = np.array([len(X) for X in examples], float)
    per_token = selection.variant == "cost_benefit"
    sigma, left, worst = lam * np.eye(d), float(budget), math.inf
    picks = selection.indices.tolist()
    for k, i in enumerate(picks):
        candidates = [j for j in range(len(examples)) if j not in picks[:k] and costs[j] > 0
                      and (budget_unit == "examples" or costs[j] <= left)]
        priority = {j: gain(examples, sigma, j) / (costs[j] if per_token else 1.0) for j in candidates}
        worst = min(worst, priority[i] / max(priority.values()))
        sigma = sigma + examples[i].T @ examples[i]
        left -= costs[i]
    return worst


@pytest.mark.parametrize("tolerance", [0.1, 0.3])
@pytest.mark.parametrize("budget_unit", ["examples", "tokens"])
@pytest.mark.parametrize("as_feature_set", [False, True])
def test_each_pick_is_within_one_minus_epsilon_of_the_best_that_fits(tolerance, budget_unit, as_feature_set):
    rng = np.random.default_rng(7)
    examples = near_tie_examples(rng, 120, 8)
    data = FeatureSet.from_examples(examples) if as_feature_set else examples
    budget = 12 if budget_unit == "examples" else int(0.2 * sum(len(X) for X in examples))
    exact = select(data, budget, budget_unit=budget_unit)
    tolerant = select(data, budget, budget_unit=budget_unit, greedy_tolerance=tolerance)
    assert tolerant.greedy_tolerance == tolerance and exact.greedy_tolerance == 0.0
    assert tolerant.cost <= budget
    assert worst_step_ratio(examples, exact, budget, budget_unit, 1.0) > 1 - 1e-9
    ratio = worst_step_ratio(examples, tolerant, budget, budget_unit, 1.0)
    assert 1 - tolerance - 1e-9 <= ratio < 1 - 1e-6  # within the tolerance, and it did use it
    assert tolerant.evaluations + tolerant.bound_updates < exact.evaluations + exact.bound_updates
    assert tolerant.upper_bound >= exact.objective[-1] - 1e-9  # its certificate bounds OPT too


class ModularObjective:
    """f(S) = Σ_S values: gains never change, the stale bounds are whatever the test sets."""

    submodular = True
    knapsack_variants = KNAPSACK_VARIANTS
    lazy_batch = 1  # one evaluation at a time: the test controls the order

    def __init__(self, values, bounds):
        self.values, self.bounds = np.asarray(values, float), np.asarray(bounds, float)
        self.n, self.costs = len(self.values), np.ones(len(self.values))
        self.picked = []

    def reset(self):
        self.picked = []

    def gains(self, ids):
        return self.values[np.asarray(ids)], None

    def add(self, i):
        self.picked.append(i)

    @property
    def value(self):
        return float(self.values[self.picked].sum())

    def initial_bounds(self, eligible):
        return InitialBounds(self.bounds.copy(), None, 0, False)

    def bound_tightener(self, initial):
        return None


@pytest.mark.parametrize("tolerance,pick", [(0.0, 1), (0.1, 1), (0.14, 1), (0.16, 0), (0.3, 0)])
def test_a_fresh_entry_is_taken_exactly_when_it_is_within_one_minus_epsilon_of_every_bound(tolerance, pick):
    # Entry 0 (bound 1.3) is evaluated first and is worth 0.85; entry 1 is worth 1.0 and its
    # stale bound is 1.0: 0 is taken iff 0.85 ≥ (1 − ε)·1.0, i.e. ε ≥ 0.15.
    objective = ModularObjective([0.85, 1.0], [1.3, 1.0])
    selection = run_greedy(objective, SelectionRequest(1, greedy_tolerance=tolerance))
    assert selection.indices.tolist() == [pick]


@pytest.mark.parametrize("seed", range(6))
def test_tolerant_selection_meets_its_guarantee_against_brute_force(seed):
    rng = np.random.default_rng(300 + seed)
    examples = [rng.lognormal(0, 0.5) * rng.normal(size=(int(m), 3)) for m in rng.integers(1, 7, size=9)]
    costs = np.array([len(X) for X in examples])
    sigma0 = np.eye(3)
    value = {subset: np.linalg.slogdet(sigma0 + sum((examples[i].T @ examples[i] for i in subset),
                                                    np.zeros((3, 3))))[1]
             for size in range(len(examples) + 1) for subset in itertools.combinations(range(len(examples)), size)}
    for budget_unit, budget in (("examples", 3), ("tokens", int(costs.sum() // 3))):
        size = (lambda s: len(s)) if budget_unit == "examples" else (lambda s: costs[list(s)].sum())
        opt = max(v for s, v in value.items() if size(s) <= budget)
        for tolerance in (0.2, 0.5, 0.9):
            selection = select(examples, budget, budget_unit=budget_unit, greedy_tolerance=tolerance)
            assert selection.guaranteed_ratio >= guaranteed_ratio(budget_unit, tolerance)
            assert selection.objective[-1] >= selection.guaranteed_ratio * opt - 1e-9
            assert selection.upper_bound >= opt - 1e-9


def test_guaranteed_ratio_is_the_classical_one_without_a_tolerance():
    assert guaranteed_ratio("examples") == pytest.approx(1 - 1 / math.e)
    assert guaranteed_ratio("tokens") == pytest.approx((1 - 1 / math.e) / 2)
    assert guaranteed_ratio("examples", 0.5) == pytest.approx(1 - math.exp(-0.5))
    assert guaranteed_ratio("tokens", 0.5) == pytest.approx(0.25 * (1 - math.exp(-0.5)))
    # Small examples next to the budget: cost-benefit alone is within 1 − e^(−α(1 − c_max/B)).
    assert guaranteed_ratio("tokens", 0.3, 0.25) == pytest.approx(1 - math.exp(-0.7 * 0.75))
    assert guaranteed_ratio("tokens", 0.3, 0.25, unit_cost_run=False) == pytest.approx(1 - math.exp(-0.7 * 0.75))
    assert guaranteed_ratio("tokens", 0.3, 0.9, unit_cost_run=False) == pytest.approx(1 - math.exp(-0.7 * 0.1))


def test_the_selection_records_its_guarantee_and_a_tolerant_token_run_skips_unit_cost_when_it_cannot_help():
    examples = near_tie_examples(np.random.default_rng(5), 80, 6)
    tokens = sum(len(X) for X in examples)
    share = max(len(X) for X in examples) / (0.3 * tokens)
    assert select(examples, 8).guaranteed_ratio == pytest.approx(1 - 1 / math.e)
    exact = select(examples, 0.3 * tokens, budget_unit="tokens")
    assert exact.guaranteed_ratio == pytest.approx(guaranteed_ratio("tokens", 0.0, share))
    checkpoints = []
    tolerant = select(examples, 0.3 * tokens, budget_unit="tokens", greedy_tolerance=0.2,
                      hooks=Hooks(checkpoint=checkpoints.append))
    assert {c["running"] for c in checkpoints} == {"cost_benefit"}
    assert tolerant.guaranteed_ratio == pytest.approx(1 - math.exp(-0.8 * (1 - share)))
    # A budget under twice the largest example keeps both runs (the pair's bound can be the better).
    small = max(len(X) for X in examples) * 1.5
    checkpoints.clear()
    select(examples, small, budget_unit="tokens", greedy_tolerance=0.2, hooks=Hooks(checkpoint=checkpoints.append))
    assert {c["running"] for c in checkpoints} == {"cost_benefit", "unit_cost"}
    assert run_method("uniform", FeatureSet.from_examples(examples), SelectionRequest(8)).guaranteed_ratio is None


@pytest.mark.parametrize("option", ["greedy_tolerance", "stochastic_delta"])
def test_the_options_are_checked_and_kept_to_lazy_greedy_on_a_submodular_objective(option):
    examples = near_tie_examples(np.random.default_rng(3), 20, 4)
    for bad in (-0.1, 1.0, float("nan"), True):
        with pytest.raises(ValueError, match=option):
            SelectionRequest(5, **{option: bad})
    with pytest.raises(ValueError, match=option):
        select(examples, 5, method="naive", **{option: 0.1})
    with pytest.raises(ValueError, match=option):
        run_method("vopt", FeatureSet.from_examples(examples), SelectionRequest(5, **{option: 0.1}))


@pytest.mark.parametrize("budget_unit", ["examples", "tokens"])
def test_a_tolerant_run_resumes_within_its_guarantee_and_never_as_an_exact_one(budget_unit):
    rng = np.random.default_rng(11)
    examples = near_tie_examples(rng, 50, 5)
    budget = 10 if budget_unit == "examples" else int(0.2 * sum(len(X) for X in examples))
    kwargs = dict(budget_unit=budget_unit, greedy_tolerance=0.3)
    states = []
    select(examples, budget, **kwargs, hooks=Hooks(checkpoint=states.append))
    state = states[len(states) // 2]
    resumed = select(examples, budget, **kwargs, hooks=Hooks(resume=state))
    assert worst_step_ratio(examples, resumed, budget, budget_unit, 1.0) >= 0.7 - 1e-9
    with pytest.raises(ValueError, match="greedy_tolerance"):
        select(examples, budget, budget_unit=budget_unit, hooks=Hooks(resume=state))
    with pytest.raises(ValueError, match="greedy_tolerance"):
        select(examples, budget, budget_unit=budget_unit, greedy_tolerance=0.1, hooks=Hooks(resume=state))
