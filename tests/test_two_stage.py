"""Two-stage selection (RandGreeDi): the math module on in-memory features."""

import numpy as np
import pytest

from fishersft_ray.features import FeatureSet, FeatureSummary
from fishersft_ray.select import select
from fishersft_ray.select.two_stage import part_of, partition, select_two_stage


def _pool(n=600, d=12, seed=0):
    rng = np.random.default_rng(seed)
    return FeatureSet.from_examples([rng.normal(size=(int(rng.integers(1, 9)), d)) * rng.uniform(0.3, 2)
                                     for _ in range(n)])


def test_partition_is_seeded_disjoint_near_balanced_and_a_function_of_each_key():
    keys = np.arange(10, 111)
    parts = partition(keys, 4, seed=7)
    assert sorted(np.concatenate(parts).tolist()) == keys.tolist()
    assert all(np.all(np.diff(p) > 0) for p in parts)
    again = partition(keys, 4, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, partition(keys, 4, seed=8)))
    # A key's part does not depend on the other keys: a shard can be split where it is stored.
    whole = part_of(keys, 4, seed=7)
    np.testing.assert_array_equal(part_of(keys[::3], 4, seed=7), whole[::3])
    for p, members in enumerate(parts):
        assert np.all(whole[np.searchsorted(keys, members)] == p)
    # Each key lands in a uniformly random part: 100K keys in 16 parts are within 3% of N/16.
    sizes = np.bincount(part_of(np.arange(100_000), 16, seed=0), minlength=16)
    assert np.all(np.abs(sizes - 6250) < 0.03 * 6250)
    with pytest.raises(ValueError, match="partitions"):
        partition(keys, 0, seed=0)


@pytest.mark.parametrize("unit, budget", [("examples", 25), ("tokens", 120)])
def test_one_part_is_exactly_the_one_stage_greedy(unit, budget):
    pool = _pool()
    one = select(pool, budget, lam=0.5, budget_unit=unit)
    two, account = select_two_stage(pool, budget, parts=1, lam=0.5, budget_unit=unit)
    np.testing.assert_array_equal(two.indices, one.indices)
    np.testing.assert_allclose(two.objective, one.objective)
    assert account["parts"] == 1


@pytest.mark.parametrize("unit, budget", [("examples", 25), ("tokens", 120)])
def test_many_parts_stay_feasible_close_and_certified(unit, budget):
    pool = _pool()
    one = select(pool, budget, lam=0.5, budget_unit=unit)
    two, account = select_two_stage(pool, budget, parts=6, oversample=2, seed=1, lam=0.5, budget_unit=unit)
    cost = len(two.indices) if unit == "examples" else pool.num_targets[two.indices].sum()
    assert cost <= budget and len(set(two.indices.tolist())) == len(two.indices)
    # The reported objective is f of the reported picks, whichever stage they came from.
    np.testing.assert_allclose(select(pool.subset(two.indices), len(two.indices), lam=0.5).objective[-1],
                               two.objective[-1], rtol=1e-9)
    assert two.objective[-1] >= 0.9 * one.objective[-1]
    # Σ of the parts' certificates bounds OPT over the whole pool: above any feasible value.
    assert account["upper_bound"] == two.upper_bound >= max(one.objective[-1], two.objective[-1])
    assert account["candidates"] <= 6 * 2 * budget and account["kept"] in {"union"} | {f"part {p}" for p in range(6)}
    again, _ = select_two_stage(pool, budget, parts=6, oversample=2, seed=1, lam=0.5, budget_unit=unit)
    np.testing.assert_array_equal(again.indices, two.indices)


def test_the_kept_answer_is_the_better_of_the_union_and_the_best_part():
    pool = _pool(n=200, seed=3)
    two, account = select_two_stage(pool, 10, parts=4, lam=0.5)
    assert two.objective[-1] == pytest.approx(max(account["union_value"], *account["part_values"]))


def test_summary_of_shards_matches_the_loaded_features(tmp_path):
    pool = _pool(n=50)
    directory = tmp_path / "shards"
    directory.mkdir()
    pool.subset(np.arange(30)).save(str(directory / "a.parquet"))
    pool.subset(np.arange(20, 50)).save(str(directory / "b.parquet"))  # rows 20..29 stored twice
    summary = FeatureSummary.of_shards(str(directory))
    loaded = FeatureSet.load(str(directory))
    np.testing.assert_array_equal(summary.row_index, loaded.row_index)
    np.testing.assert_array_equal(summary.num_targets, loaded.num_targets)
    assert summary.mean_token_energy() == pytest.approx(loaded.mean_token_energy(), rel=1e-12)


@pytest.mark.parametrize("unit, budget", [("examples", 12), ("tokens", 90)])
def test_sentence_od_runs_two_stage_within_budget(unit, budget):
    pool = _pool(n=300, seed=5)
    two, account = select_two_stage(pool, budget, parts=4, oversample=2, seed=2, method="sentence_od", lam=0.5,
                                    budget_unit=unit)
    cost = len(two.indices) if unit == "examples" else pool.num_targets[two.indices].sum()
    assert 0 < cost <= budget and len(set(two.indices.tolist())) == len(two.indices)
    assert two.method == "sentence_od" and two.upper_bound == account["upper_bound"] is not None
    # logdet_value is TokenOD's f(S) of the picks, the method's own objective stays its own.
    assert two.logdet_value == pytest.approx(select(pool, len(two.indices), lam=0.5,
                                                    eligible=two.indices).objective[-1], rel=1e-9)
    with pytest.raises(ValueError, match="certified method"):
        select_two_stage(pool, budget, parts=2, method="vopt")
