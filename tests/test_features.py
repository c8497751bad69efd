"""Feature shards: the storage rule, the shard schema and the FeatureSet round trip."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fishersft_ray.features import SHARD_SCHEMA, FeatureSet, count_near_twins, factor_from_rows, shard_table
from fishersft_ray.select import select
from fishersft_ray.select.rules import length_cap_tokens


@pytest.mark.parametrize("m,d", [(0, 5), (1, 5), (3, 5), (5, 5), (6, 5), (40, 8)])
def test_factor_from_rows_reproduces_gram(m, d):
    X = np.random.default_rng(m * 10 + d).normal(size=(m, d))
    factor, spectrum = factor_from_rows(X)
    assert factor.dtype == np.float32 and spectrum.dtype == np.float32
    assert factor.shape == (min(m, d), d) and spectrum.shape == (min(m, d),)
    gram = X.T @ X
    np.testing.assert_allclose(factor.astype(np.float64).T @ factor, gram, rtol=1e-5, atol=1e-5)
    eigenvalues = np.sort(np.clip(np.linalg.eigvalsh(gram), 0, None))[::-1][:min(m, d)]
    np.testing.assert_allclose(spectrum, eigenvalues, rtol=1e-5, atol=1e-5)
    if m <= d:
        np.testing.assert_array_equal(factor, X.astype(np.float32))


def test_factor_from_rows_drops_numerically_zero_eigenpairs():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 2)) @ rng.normal(size=(2, 6))  # rank 2, m > d
    factor, spectrum = factor_from_rows(X)
    assert factor.shape == (2, 6) and spectrum.shape == (2,)
    np.testing.assert_allclose(factor.astype(np.float64).T @ factor, X.T @ X, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m", [4, 20])
def test_max_rank_keeps_the_top_eigenpairs(m):
    d, keep = 6, 2
    X = np.random.default_rng(m).normal(size=(m, d))
    factor, spectrum = factor_from_rows(X, max_rank=keep)
    w, V = np.linalg.eigh(X.T @ X)
    top = V[:, -keep:] @ np.diag(w[-keep:]) @ V[:, -keep:].T
    assert factor.shape == (keep, d)
    np.testing.assert_allclose(spectrum, w[::-1][:keep], rtol=1e-5)
    np.testing.assert_allclose(factor.astype(np.float64).T @ factor, top, rtol=1e-5, atol=1e-5)


def random_feature_set(seed=0, n=30, d=7):
    rng = np.random.default_rng(seed)
    examples = [rng.normal(size=(int(m), d)) for m in rng.integers(0, 3 * d, size=n)]
    return examples, FeatureSet.from_examples(
        examples, row_index=np.arange(n) * 3 + 5, ids=[f"row-{i}" for i in range(n)],
        meta={"model": "toy"})


def test_shard_table_from_records_and_columns_agree():
    examples, features = random_feature_set()
    records = [dict(row_index=int(features.row_index[i]), id=features.ids[i],
                    num_tokens=len(examples[i]) + 1, num_targets=len(examples[i]),
                    truncated=False, factor=features.factor(i),
                    spectrum=features.spectrum[features.offsets[i]:features.offsets[i + 1]],
                    embedding=features.embeddings[i])
               for i in range(features.n)]
    from_records = shard_table(records, features.dim, {"model": "toy"})
    columns = {name: [r[name] for r in records] for name in records[0]}
    from_columns = shard_table(columns, features.dim, {"model": "toy"})
    assert from_records.equals(from_columns)
    assert from_records.schema.remove_metadata().equals(SHARD_SCHEMA)
    meta = json.loads(from_records.schema.metadata[b"fishersft"])
    assert meta == {"model": "toy", "dim": features.dim}
    assert from_records.equals(features.to_table())
    round_trip = FeatureSet.from_table(from_records)
    np.testing.assert_array_equal(round_trip.factors, features.factors)
    np.testing.assert_array_equal(round_trip.embeddings, features.embeddings)
    for X, embedding in zip(examples, round_trip.embeddings):  # the mean target row, zeros if none
        np.testing.assert_allclose(embedding, X.mean(axis=0) if len(X) else 0.0, rtol=1e-6, atol=1e-7)


def test_shard_table_rejects_factor_spectrum_mismatch():
    record = dict(row_index=0, id="a", num_tokens=3, num_targets=2, truncated=False,
                  factor=np.ones((2, 4)), spectrum=np.ones(1), embedding=np.ones(4))
    with pytest.raises(ValueError, match="record 0"):
        shard_table([record], 4)


def test_parquet_round_trip_sorted_by_row_index(tmp_path):
    examples, features = random_feature_set()
    order = np.random.default_rng(1).permutation(features.n)
    # Two shards with shuffled rows, as parallel featurizer tasks would write them.
    for k, half in enumerate(np.array_split(order, 2)):
        pq.write_table(features.subset(half).to_table(), tmp_path / f"shard-{k}.parquet")
    loaded = FeatureSet.load(str(tmp_path))
    np.testing.assert_array_equal(loaded.row_index, features.row_index)
    np.testing.assert_array_equal(loaded.offsets, features.offsets)
    np.testing.assert_array_equal(loaded.factors, features.factors)
    np.testing.assert_array_equal(loaded.spectrum, features.spectrum)
    np.testing.assert_array_equal(loaded.num_targets, features.num_targets)
    np.testing.assert_array_equal(loaded.embeddings, features.embeddings)
    assert loaded.ids == features.ids
    assert loaded.meta["model"] == "toy" and loaded.dim == features.dim
    for i in [0, 5, features.n - 1]:
        np.testing.assert_array_equal(loaded.factor(i), examples[i].astype(np.float32)
                                      if len(examples[i]) <= features.dim else features.factor(i))
    saved = tmp_path / "saved"
    features.save(str(saved))
    again = FeatureSet.load(f"file://{saved}")
    np.testing.assert_array_equal(again.factors, features.factors)
    np.testing.assert_array_equal(select(again, 5).indices, select(features, 5).indices)


def test_initial_gains_handles_empty_examples():
    examples, features = random_feature_set(seed=3)
    lam = 0.7
    expected = [np.linalg.slogdet(lam * np.eye(features.dim) + X.T @ X)[1]
                - features.dim * np.log(lam) for X in examples]
    np.testing.assert_allclose(features.initial_gains(lam), expected, rtol=1e-5, atol=1e-6)
    assert np.all(features.initial_gains(lam, rel_tol=1e-5) >= features.initial_gains(lam))
    assert any(len(X) == 0 for X in examples)


def test_subset_keeps_the_examples():
    examples, features = random_feature_set(seed=4)
    positions = [7, 2, 2, 19]
    part = features.subset(positions)
    for k, p in enumerate(positions):
        np.testing.assert_array_equal(part.factor(k), features.factor(p))
        np.testing.assert_array_equal(part.embeddings[k], features.embeddings[p])
    assert part.ids == [features.ids[p] for p in positions]


def test_from_examples_validation_names_the_example():
    with pytest.raises(ValueError, match="example 1.*ragged"):
        FeatureSet.from_examples([np.ones((2, 3)), np.ones((2, 4))])
    with pytest.raises(ValueError, match="example 2.*non-finite"):
        FeatureSet.from_examples([np.ones((2, 3)), np.ones((2, 3)), np.array([[1, np.inf, 0]])])


def test_load_rejects_bad_shards(tmp_path):
    _, features = random_feature_set(seed=5)
    table = features.to_table()
    wrong = table.drop_columns(["truncated"])
    pq.write_table(wrong, tmp_path / "wrong.parquet")
    with pytest.raises(ValueError, match=r"wrong\.parquet has no column\(s\) \['truncated'\]"):
        FeatureSet.load(str(tmp_path))
    pq.write_table(table.set_column(4, "truncated", pa.array([1] * table.num_rows, pa.int8())),
                   tmp_path / "wrong.parquet")
    with pytest.raises(ValueError, match="schema mismatch"):
        FeatureSet.load(str(tmp_path))
    (tmp_path / "wrong.parquet").unlink()
    values = features.factors.copy()
    bad_example = 4
    values[features.offsets[bad_example]] = np.nan
    poisoned = FeatureSet(values, features.spectrum, features.offsets, features.num_targets,
                          features.row_index, features.ids).to_table()
    pq.write_table(poisoned, tmp_path / "nan.parquet")
    with pytest.raises(ValueError, match=f"row_index {features.row_index[bad_example]}"):
        FeatureSet.load(str(tmp_path))
    with pytest.raises(ValueError, match="no \\*.parquet"):
        FeatureSet.load(str(tmp_path / "missing"))
    no_meta = pa.Table.from_arrays(table.columns, schema=SHARD_SCHEMA)
    with pytest.raises(ValueError, match="metadata"):
        FeatureSet.from_table(no_meta)


def test_load_keeps_one_copy_of_rows_written_twice(tmp_path):
    _, features = random_feature_set(seed=6)
    first, second = np.array_split(np.arange(features.n), 2)
    pq.write_table(features.subset(first).to_table(), tmp_path / "part-0.parquet")
    pq.write_table(features.subset(second).to_table(), tmp_path / "part-1.parquet")
    # A retried task rewrote part of the first shard under another name.
    pq.write_table(features.subset(first[:5]).to_table(), tmp_path / "part-0-retry.parquet")
    loaded = FeatureSet.load(str(tmp_path))
    assert loaded.meta["duplicate_rows_dropped"] == 5
    np.testing.assert_array_equal(loaded.row_index, features.row_index)
    np.testing.assert_array_equal(loaded.offsets, features.offsets)
    np.testing.assert_array_equal(loaded.factors, features.factors)
    assert "duplicate_rows_dropped" not in FeatureSet.load(str(tmp_path / "part-1.parquet")).meta


def test_count_near_twins_matches_brute_force():
    rng = np.random.default_rng(7)
    base = rng.normal(size=(40, 6))
    near = base[:5] * 3.0 + 0.01 * rng.normal(size=(5, 6))  # scaled near-copies: cosine ≈ 1
    embeddings = np.concatenate([base, near, np.zeros((2, 6))])  # zero rows: never twins
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-30)
    cosine = unit @ unit.T
    np.fill_diagonal(cosine, -1.0)
    expected = int(np.sum((cosine.max(axis=1) >= 0.98) & (np.linalg.norm(embeddings, axis=1) > 0)))
    assert expected >= 10
    assert count_near_twins(embeddings) == expected
    assert count_near_twins(embeddings, block_rows=3) == expected
    assert count_near_twins(embeddings[:40]) == int(np.sum(cosine[:40, :40].max(axis=1) >= 0.98))
    assert count_near_twins(embeddings[:1]) == 0 and count_near_twins(np.zeros((0, 6))) == 0


def test_mean_token_energy_is_the_mean_squared_token_norm():
    examples, features = random_feature_set(seed=8)
    tokens = np.concatenate([X for X in examples if len(X)])
    assert features.mean_token_energy() == pytest.approx(np.mean(np.sum(tokens ** 2, axis=1)), rel=1e-5)


def test_length_cap_tokens_reads_counts_and_percentiles():
    lengths = np.array([0, 1, 2, 3, 10])  # examples without targets do not count
    assert length_cap_tokens("256", lengths) == 256
    assert length_cap_tokens("p50", lengths) == 2  # median of 1, 2, 3, 10 is 2.5
    assert length_cap_tokens("p100", lengths) == 10
    for bad in ("0", "-3", "1.5", "inf", "p0", "p101", "pabc", "median", ""):
        with pytest.raises(ValueError, match="--length-cap must be"):
            length_cap_tokens(bad, lengths)
    with pytest.raises(ValueError, match="no examples with target tokens"):
        length_cap_tokens("p50", np.zeros(3, int))
