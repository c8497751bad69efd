"""Stochastic greedy (``SelectionRequest.stochastic_delta``, ``select --stochastic-greedy``,
issue 30 item 6): the best of each step's random sample, found lazily; its guarantee in
expectation under an example budget, a certificate that bounds OPT (brute force) under both
budgets, seeded and resumable, and recorded in the manifest."""

import itertools
import json
import math

import numpy as np
import pytest

from fishersft_ray.cli import main
from fishersft_ray.select import Hooks, select
from fishersft_ray.select.greedy import guaranteed_ratio, stochastic_sample_size

from test_token_scale import near_tie_examples

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("budget_unit", ["examples", "tokens"])
def test_a_sample_that_covers_the_pool_is_exact_greedy(budget_unit):
    # δ so small that every step's sample is every candidate: lazy within the sample is
    # then lazy greedy over the pool, with valid bounds, so the picks are naive greedy's.
    examples = near_tie_examples(np.random.default_rng(4), 40, 5)
    budget = 8 if budget_unit == "examples" else int(0.2 * sum(len(X) for X in examples))
    naive = select(examples, budget, budget_unit=budget_unit, method="naive")
    covered = select(examples, budget, budget_unit=budget_unit, stochastic_delta=1e-300)
    np.testing.assert_array_equal(covered.indices, naive.indices)
    np.testing.assert_allclose(covered.objective, naive.objective, rtol=1e-12)


def test_sample_size_is_n_over_k_log_one_over_delta():
    assert stochastic_sample_size(1000, 10, math.exp(-3)) == 300
    assert stochastic_sample_size(1000, 10, 0.05) == math.ceil(100 * math.log(20))
    assert stochastic_sample_size(5, 0, 0.5) == math.ceil(5 * math.log(2))


@pytest.mark.parametrize("budget_unit", ["examples", "tokens"])
def test_samples_are_seeded_and_take_fewer_evaluations_than_lazy_greedy(budget_unit):
    examples = near_tie_examples(np.random.default_rng(8), 400, 6)
    budget = 20 if budget_unit == "examples" else int(0.05 * sum(len(X) for X in examples))
    exact = select(examples, budget, budget_unit=budget_unit, method="naive")
    runs = [select(examples, budget, budget_unit=budget_unit, stochastic_delta=0.2, seed=seed) for seed in range(4)]
    again = select(examples, budget, budget_unit=budget_unit, stochastic_delta=0.2, seed=0)
    np.testing.assert_array_equal(again.indices, runs[0].indices)
    assert len({tuple(run.indices) for run in runs}) > 1  # the seed draws the samples
    for run in runs:
        assert run.stochastic_delta == 0.2 and run.cost <= budget
        # The final certificate bounds OPT ≥ exact greedy's value.
        assert run.upper_bound >= exact.objective[-1] - 1e-9
        assert run.objective[-1] >= 0.9 * exact.objective[-1]
    assert np.mean([run.evaluations for run in runs]) < exact.evaluations / 4


@pytest.mark.parametrize("seed", range(4))
def test_stochastic_runs_meet_their_guarantee_in_expectation_and_certify_opt(seed):
    rng = np.random.default_rng(500 + seed)
    examples = [rng.lognormal(0, 0.5) * rng.normal(size=(int(m), 3)) for m in rng.integers(1, 7, size=10)]
    costs = np.array([len(X) for X in examples])
    value = {subset: np.linalg.slogdet(np.eye(3) + sum((examples[i].T @ examples[i] for i in subset),
                                                       np.zeros((3, 3))))[1]
             for size in range(len(examples) + 1) for subset in itertools.combinations(range(len(examples)), size)}
    for budget_unit, budget in (("examples", 3), ("tokens", int(costs.sum() // 3))):
        size = (lambda s: len(s)) if budget_unit == "examples" else (lambda s: costs[list(s)].sum())
        opt = max(v for s, v in value.items() if size(s) <= budget)
        runs = [select(examples, budget, budget_unit=budget_unit, stochastic_delta=0.3, seed=s) for s in range(8)]
        for run in runs:
            assert run.upper_bound >= opt - 1e-9  # the certificate is a proof for every run
            assert run.cost <= budget
        if budget_unit == "examples":
            ratio = runs[0].guaranteed_ratio
            assert ratio == pytest.approx(1 - math.exp(-0.7))
            assert np.mean([run.objective[-1] for run in runs]) >= ratio * opt
        else:
            assert runs[0].guaranteed_ratio is None  # none a priori under a token budget


def test_the_lazy_certificate_is_tighter_than_the_stale_bounds():
    # Exact greedy certifies from its stale bounds; the stochastic run's final certificate
    # evaluates the top of the knapsack at the final S, which is at least as tight here.
    examples = near_tie_examples(np.random.default_rng(9), 300, 6)
    budget = int(0.05 * sum(len(X) for X in examples))
    exact = select(examples, budget, budget_unit="tokens")
    stochastic = select(examples, budget, budget_unit="tokens", stochastic_delta=0.1)
    assert stochastic.certificate_ratio > 0.5
    assert stochastic.upper_bound >= exact.objective[-1] - 1e-9
    assert stochastic.certificate_ratio >= exact.certificate_ratio - 0.05


@pytest.mark.parametrize("budget_unit", ["examples", "tokens"])
def test_a_stochastic_run_resumes_to_the_same_picks(budget_unit):
    examples = near_tie_examples(np.random.default_rng(12), 120, 5)
    budget = 12 if budget_unit == "examples" else int(0.1 * sum(len(X) for X in examples))
    kwargs = dict(budget_unit=budget_unit, stochastic_delta=0.2, seed=3)
    states = []
    whole = select(examples, budget, **kwargs, hooks=Hooks(checkpoint=states.append))
    resumed = select(examples, budget, **kwargs, hooks=Hooks(resume=states[len(states) // 2]))
    np.testing.assert_array_equal(resumed.indices, whole.indices)
    with pytest.raises(ValueError, match="seed"):
        select(examples, budget, **{**kwargs, "seed": 4}, hooks=Hooks(resume=states[len(states) // 2]))
    with pytest.raises(ValueError, match="stochastic_delta"):
        select(examples, budget, budget_unit=budget_unit, hooks=Hooks(resume=states[len(states) // 2]))


def test_the_guarantee_is_in_expectation_under_examples_and_none_under_tokens():
    assert guaranteed_ratio("examples", 0.3, stochastic_delta=0.05) == pytest.approx(1 - math.exp(-0.7 * 0.95))
    assert guaranteed_ratio("tokens", 0.3, 0.1, stochastic_delta=0.05) is None


def test_select_records_the_greedy_and_its_guarantee_in_the_manifest(tmp_path, tiny_llama_dir, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"row {i} " + " ".join(f"w{(i * 7 + j) % 50}" for j in range(6 + i % 9))})
                              + "\n" for i in range(60)))
    common = ["select", "--input", str(corpus), "--format", "text", "--model", str(tiny_llama_dir), "--executor",
              "local", "--features", str(tmp_path / "features")]
    assert main([*common, "--output", str(tmp_path / "tok"), "--budget", "80", "--budget-unit", "tokens",
                 "--stochastic-greedy", "0.1", "--greedy-tolerance", "0.2"]) == 0
    selection = json.loads((tmp_path / "tok" / "manifest.json").read_text())["selection"]
    guarantee = selection["guarantee"]
    assert guarantee["stochastic_delta"] == 0.1 and guarantee["greedy_tolerance"] == 0.2
    assert guarantee["guaranteed_ratio"] is None and "no a-priori guarantee" in guarantee["text"]
    assert 0 < selection["certificate_ratio"] <= 1
    assert main([*common, "--output", str(tmp_path / "ex"), "--budget", "8"]) == 0
    exact = json.loads((tmp_path / "ex" / "manifest.json").read_text())["selection"]["guarantee"]
    assert exact["guaranteed_ratio"] == pytest.approx(1 - 1 / math.e) and "exact greedy" in exact["text"]
    for flags, message in ((["--stochastic-greedy", "1.5"], "--stochastic-greedy must be a number in"),
                           (["--greedy-tolerance", "0.2", "--method", "uniform"], "--greedy-tolerance applies to")):
        assert main([*common, "--output", str(tmp_path / "bad"), "--budget", "8", *flags]) == 2
        assert message in capsys.readouterr().err
