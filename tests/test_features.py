"""Feature shards: the storage rule, the shard schema and the FeatureSet round trip."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fishersft_ray.features import (ROW_OVERHEAD_BYTES, SHARD_SCHEMA, SHARD_WRITE_OPTIONS, FeatureSet, count_near_twins,
                                    estimate_feature_bytes, factor_from_rows, fitting_options, mean_rows,
                                    read_shards, shard_table, store_examples, stored_factor)
from fishersft_ray.features.schema import FlatRows
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


def block_of_examples(d: int, seed: int = 0):
    """Rows of many examples back to back: every length 0..3d, several examples per length, and
    rank-two examples of every length (their Grams' numerically-zero eigenvalues are rounding
    noise: bit-exact only where each Gram is formed as the reference forms it)."""
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([np.arange(3 * d + 1), rng.integers(0, 3 * d, size=60), np.arange(3, 3 * d + 1)])
    rows = [(rng.standard_normal((m, d)) * rng.lognormal()).astype(np.float32) for m in lengths]
    for i in range(len(lengths) - 3 * d + 2, len(lengths)):
        rows[i] = (rng.standard_normal((lengths[i], 2)) @ rng.standard_normal((2, d))).astype(np.float32)
    return rows, lengths


@pytest.mark.parametrize("max_rank", [None, 0, 1, 3, 9])
@pytest.mark.parametrize("projected,weighted", [(False, False), (True, False), (False, True), (True, True)])
def test_store_examples_gives_every_example_the_bits_it_gets_alone(max_rank, projected, weighted):
    """The batched rule (one solve per length, flat in and out) against the per-example
    reference: the featurizer's old loop, projection → mean → √w scaling → factor_from_rows."""
    d = 24
    rows, lengths = block_of_examples(d)
    rng = np.random.default_rng(1)
    projection = np.linalg.qr(rng.standard_normal((d, 20)))[0].astype(np.float32) if projected else None
    root_weights = np.sqrt(rng.uniform(0, 2, int(lengths.sum())).astype(np.float32)) if weighted else None
    stored = store_examples(np.concatenate(rows), lengths, max_rank, projection, root_weights)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    width = 20 if projected else d
    assert stored.factors.dtype == stored.spectrum.dtype == stored.embeddings.dtype == np.float32
    for i, X in enumerate(rows):
        X = X if projection is None else X @ projection
        np.testing.assert_array_equal(stored.embeddings[i], mean_rows(X, width))
        if root_weights is not None:
            X = X * root_weights[starts[i]:starts[i + 1], None]
        factor, spectrum = factor_from_rows(X, max_rank)
        mine = slice(stored.offsets[i], stored.offsets[i + 1])
        np.testing.assert_array_equal(stored.factors[mine], factor)
        np.testing.assert_array_equal(stored.spectrum[mine], spectrum)


@pytest.mark.parametrize("max_rank", [None, 3])
def test_store_examples_in_torch_matches_the_numpy_rule(max_rank):
    """The torch path (a GPU actor's, here on the CPU): the same Grams, spectra and embeddings
    to float64 solver rounding; the rank-one and rank-two examples keep only their pairs."""
    import torch

    d = 8
    rows, lengths = block_of_examples(d, seed=2)
    flat = np.concatenate(rows)
    projection = np.linalg.qr(np.random.default_rng(3).standard_normal((d, 6)))[0].astype(np.float32)
    numpy_rule = store_examples(flat, lengths, max_rank, projection)
    torch_rule = store_examples(torch.from_numpy(flat), lengths, max_rank, torch.from_numpy(projection))
    np.testing.assert_array_equal(torch_rule.offsets, numpy_rule.offsets)
    np.testing.assert_allclose(torch_rule.embeddings.numpy(), numpy_rule.embeddings, rtol=1e-6, atol=1e-6)
    for i in range(len(rows)):
        mine = slice(numpy_rule.offsets[i], numpy_rule.offsets[i + 1])
        F, G = torch_rule.factors[mine].numpy().astype(np.float64), numpy_rule.factors[mine].astype(np.float64)
        scale = max(1.0, float(np.abs(G.T @ G).max(initial=0)))
        np.testing.assert_allclose(F.T @ F, G.T @ G, rtol=1e-5, atol=1e-5 * scale)
        np.testing.assert_allclose(torch_rule.spectrum[mine].numpy(), numpy_rule.spectrum[mine], rtol=1e-5,
                                   atol=1e-5 * scale)


def test_shard_table_from_flat_rows_equals_the_per_row_arrays():
    examples, features = random_feature_set()
    columns = dict(row_index=features.row_index, id=features.ids, num_tokens=features.num_targets + 1,
                   num_targets=features.num_targets, truncated=np.zeros(features.n, bool))
    per_row = shard_table({**columns, "factor": [features.factor(i) for i in range(features.n)],
                           "spectrum": [features.spectrum[a:b] for a, b in zip(features.offsets[:-1],
                                                                                features.offsets[1:])],
                           "embedding": list(features.embeddings)}, features.dim)
    flat = shard_table({**columns, "factor": FlatRows(features.factors, features.offsets),
                        "spectrum": FlatRows(features.spectrum, features.offsets),
                        "embedding": features.embeddings}, features.dim)
    assert flat.equals(per_row) and flat.schema.equals(per_row.schema, check_metadata=True)
    factor_values = flat.column("factor").chunk(0).values
    assert factor_values.buffers()[1].address == features.factors.ctypes.data  # no copy
    with pytest.raises(ValueError, match="record 1: factor has"):
        shard_table({**columns, "factor": FlatRows(features.factors, features.offsets),
                     "spectrum": FlatRows(features.spectrum, features.offsets + (np.arange(features.n + 1) > 1)),
                     "embedding": features.embeddings}, features.dim)


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


@pytest.mark.parametrize("memmap", [False, True])
def test_load_rejects_bad_shards(tmp_path, memmap):
    _, features = random_feature_set(seed=5)
    load = (lambda path: FeatureSet.load(path, memmap_dir=str(tmp_path / "mm"))) if memmap else FeatureSet.load
    table = features.to_table()
    wrong = table.drop_columns(["truncated"])
    pq.write_table(wrong, tmp_path / "wrong.parquet")
    with pytest.raises(ValueError, match=r"wrong\.parquet has no column\(s\) \['truncated'\]"):
        load(str(tmp_path))
    pq.write_table(table.set_column(4, "truncated", pa.array([1] * table.num_rows, pa.int8())),
                   tmp_path / "wrong.parquet")
    with pytest.raises(ValueError, match="schema mismatch"):
        load(str(tmp_path))
    (tmp_path / "wrong.parquet").unlink()
    values = features.factors.copy()
    bad_example = 4
    values[features.offsets[bad_example]] = np.nan
    poisoned = FeatureSet(values, features.spectrum, features.offsets, features.num_targets,
                          features.row_index, features.ids).to_table()
    pq.write_table(poisoned, tmp_path / "nan.parquet")
    with pytest.raises(ValueError, match=f"row_index {features.row_index[bad_example]}"):
        load(str(tmp_path))
    with pytest.raises(ValueError, match="no \\*.parquet"):
        load(str(tmp_path / "missing"))
    no_meta = pa.Table.from_arrays(table.columns, schema=SHARD_SCHEMA)
    with pytest.raises(ValueError, match="metadata"):
        FeatureSet.from_table(no_meta)
    (tmp_path / "nan.parquet").unlink()
    pq.write_table(no_meta, tmp_path / "no-meta.parquet")
    with pytest.raises(ValueError, match="metadata"):
        load(str(tmp_path))


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


# ---------------------------------------------------------------- storage model and guard

def shard_bytes(table, path, **kwargs):
    pq.write_table(table, path, **kwargs)
    return path.stat().st_size


@pytest.mark.parametrize("d,max_rank,lengths,factor_dtype", [
    (64, None, (1, 200), "float32"),     # short and long examples (m > d: eigen factors)
    (128, None, (20, 60), "float32"),    # all m <= d: F = X
    (64, 16, (1, 200), "float32"),       # the rank cap
    (64, None, (1, 200), "float16"),     # half the factor bytes
])
def test_estimate_feature_bytes_matches_real_shards(tmp_path, d, max_rank, lengths, factor_dtype):
    rng = np.random.default_rng(d)
    num_targets = rng.integers(*lengths, size=400)
    examples = [rng.normal(size=(int(m), d)).astype(np.float32) for m in num_targets]
    features = FeatureSet.from_examples(examples, max_rank=max_rank, meta={"model": "toy"}).stored_as(factor_dtype)
    estimate = estimate_feature_bytes(num_targets, d, max_rank=max_rank, factor_dtype=factor_dtype)
    table = features.to_table()
    written = shard_bytes(table, tmp_path / "shard.parquet", **SHARD_WRITE_OPTIONS)  # snappy
    plain = shard_bytes(table, tmp_path / "plain.parquet", compression="none", use_dictionary=False)
    default = shard_bytes(table, tmp_path / "default.parquet")  # snappy + dictionary attempts
    in_memory = features.factors.nbytes + features.spectrum.nbytes + features.embeddings.nbytes
    assert estimate == pytest.approx(written, rel=0.005) and estimate == pytest.approx(plain, rel=0.005)
    assert in_memory <= estimate <= in_memory * 1.02  # what the driver's RAM / memmap holds
    if factor_dtype == "float32":  # why shards should be written with SHARD_WRITE_OPTIONS (float16: ±1 %)
        assert default > written * 1.05
    with_states = estimate_feature_bytes(num_targets, d, max_rank=max_rank, keep_states=True,
                                         factor_dtype=factor_dtype)
    assert with_states - estimate == int(num_targets.sum()) * (d + 1) * 4


def test_estimate_feature_bytes_follows_the_storage_rule():
    # d = 576, m = 100 and 1000 targets: factor min(m, k)·k·4 + spectrum + embedding + overhead
    per_row = ROW_OVERHEAD_BYTES
    assert estimate_feature_bytes([100], 576) == 100 * 577 * 4 + 576 * 4 + per_row
    assert estimate_feature_bytes([1000], 576) == 576 * 577 * 4 + 576 * 4 + per_row
    assert estimate_feature_bytes([1000], 576, project_dim=128) == 128 * 129 * 4 + 128 * 4 + per_row
    assert estimate_feature_bytes([1000], 576, max_rank=32) == 32 * 577 * 4 + 576 * 4 + per_row
    assert estimate_feature_bytes([0, 0], 8) == 2 * (8 * 4 + per_row)
    with pytest.raises(ValueError, match="num_targets"):
        estimate_feature_bytes([-1], 8)


def test_fitting_options_lists_the_widths_that_fit():
    num_targets = np.full(1000, 300)
    full = estimate_feature_bytes(num_targets, 4096)
    need = {k: estimate_feature_bytes(num_targets, 4096, k) for k in (512, 384, 256, 192, 128, 96, 64)}
    budget = need[256]
    options = fitting_options(budget, num_targets, 4096)
    assert list(options) == [256, 192, 128, 96, 64] and options[256] == need[256] < full
    assert fitting_options(1, num_targets, 4096) == {}
    assert list(fitting_options(full, num_targets, 576)) == [512, 384, 256, 192, 128, 96, 64]
    assert 512 not in fitting_options(10**15, num_targets, 512)  # never "project" to >= d


# ---------------------------------------------------------------- selection from disk

def write_messy_shards(features, directory, row_group_size=None):
    """Three files out of row order, a retried write holding altered copies of some rows
    (it sorts first, so ITS copies are the ones kept), and an empty shard."""
    directory.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(11).permutation(features.n)
    parts = np.array_split(order, 3)
    for k, part in enumerate(parts):
        pq.write_table(features.subset(part).to_table(), directory / f"part-{k}.parquet",
                       row_group_size=row_group_size)
    retried = features.subset(parts[0][:6])
    altered = FeatureSet(np.asarray(retried.factors) * 2.0, retried.spectrum * 4.0, retried.offsets,
                         retried.num_targets, retried.row_index, [f"retry-{i}" for i in retried.ids],
                         retried.meta, retried.num_tokens, retried.truncated, retried.embeddings + 1.0)
    pq.write_table(altered.to_table(), directory / "part-0-retry.parquet", row_group_size=row_group_size)
    pq.write_table(features.subset([]).to_table(), directory / "part-9-empty.parquet")
    return 6


def assert_same_feature_sets(a, b):
    for name in ("factors", "spectrum", "offsets", "num_targets", "num_tokens", "truncated",
                 "row_index", "embeddings"):
        np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)), err_msg=name)
        assert np.asarray(getattr(a, name)).dtype == np.asarray(getattr(b, name)).dtype, name
    assert a.ids == b.ids and a.meta == b.meta


def from_whole_tables(path):
    """The reference load: every shard read whole, then ``from_table``."""
    return FeatureSet.from_table(read_shards(path, SHARD_SCHEMA.names))


@pytest.mark.parametrize("batch_bytes", [1 << 25, 1])  # whole files; one row per batch
def test_streaming_loads_equal_the_whole_table_load(tmp_path, monkeypatch, batch_bytes):
    import mmap

    from fishersft_ray.features import load as load_module
    from fishersft_ray.features.load import FactorRows

    monkeypatch.setattr(load_module, "LOAD_BATCH_BYTES", batch_bytes)
    _, features = random_feature_set(seed=12, n=60, d=9)
    dropped = write_messy_shards(features, tmp_path / "shards", row_group_size=7)
    whole = from_whole_tables(str(tmp_path / "shards"))
    in_ram = FeatureSet.load(str(tmp_path / "shards"))
    on_disk = FeatureSet.load(str(tmp_path / "shards"), memmap_dir=str(tmp_path / "mm"))
    assert whole.meta["duplicate_rows_dropped"] == dropped
    assert_same_feature_sets(in_ram, whole)
    assert_same_feature_sets(on_disk, whole)
    assert type(in_ram.factors) is np.ndarray and in_ram.factors.flags.c_contiguous
    assert in_ram.ids[:1] != features.ids[:1] or "retry-" in "".join(in_ram.ids)  # retried copies kept
    assert isinstance(on_disk.factors, np.memmap) and isinstance(on_disk.factors.base, mmap.mmap)
    assert on_disk.factors.flags.c_contiguous and not on_disk.factors.flags.writeable
    pool = FactorRows(on_disk.factors, on_disk.offsets, on_disk.num_targets, on_disk)
    assert pool.file == on_disk.factors.filename  # the engine's positioned reads
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "mm").iterdir()) == ["embeddings", "factors"]
    for unit in ("examples", "tokens"):
        budget = 8 if unit == "examples" else 60
        np.testing.assert_array_equal(select(on_disk, budget, budget_unit=unit, threads=1).indices,
                                      select(whole, budget, budget_unit=unit, threads=1).indices)
    single = FeatureSet.load(str(tmp_path / "shards" / "part-1.parquet"), memmap_dir=str(tmp_path / "mm"))
    assert_same_feature_sets(single, from_whole_tables(str(tmp_path / "shards" / "part-1.parquet")))
    assert "duplicate_rows_dropped" not in single.meta


@pytest.mark.parametrize("memmap", [False, True])
def test_streaming_load_of_empty_shards(tmp_path, memmap):
    _, features = random_feature_set(seed=13)
    mm = str(tmp_path / "mm") if memmap else None
    pq.write_table(features.subset([]).to_table(), tmp_path / "empty.parquet")
    loaded = FeatureSet.load(str(tmp_path), memmap_dir=mm)
    assert loaded.n == 0 and loaded.dim == features.dim and loaded.meta["model"] == "toy"
    only_empty_examples = features.subset(np.flatnonzero(features.num_targets == 0)[:2])
    pq.write_table(only_empty_examples.to_table(), tmp_path / "empty.parquet")
    assert_same_feature_sets(FeatureSet.load(str(tmp_path), memmap_dir=mm), from_whole_tables(str(tmp_path)))


@pytest.mark.parametrize("how", ["whole tables", "streaming", "memmap"])
def test_load_rejects_malformed_rows(tmp_path, how):
    _, features = random_feature_set(seed=14)
    table = features.to_table()
    memmap = how == "memmap"
    mm = str(tmp_path / "mm") if memmap else None

    def load(path, memmap_dir):
        return from_whole_tables(path) if how == "whole tables" else FeatureSet.load(path, memmap_dir=memmap_dir)

    i = int(np.flatnonzero(features.num_targets > 0)[2])
    short_factor = table.column("factor").to_pylist()
    short_factor[i] = short_factor[i][:-1]
    pq.write_table(table.set_column(5, SHARD_SCHEMA.field("factor"),
                                    pa.array(short_factor, SHARD_SCHEMA.field("factor").type)),
                   tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=rf"row_index {features.row_index[i]}: factor length"):
        load(str(tmp_path / "bad.parquet"), mm)
    embedding = table.column("embedding").to_pylist()
    embedding[i] = embedding[i] + [0.0]
    pq.write_table(table.set_column(7, SHARD_SCHEMA.field("embedding"),
                                    pa.array(embedding, SHARD_SCHEMA.field("embedding").type)),
                   tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=rf"row_index {features.row_index[i]}: embedding has"):
        load(str(tmp_path / "bad.parquet"), mm)
    pq.write_table(table.replace_schema_metadata({b"fishersft": b'{"dim": 3}'}), tmp_path / "other.parquet")
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="disagree on dim"):
        load(str(tmp_path), mm)
    if memmap:  # nothing is left behind by a failed load
        assert not any((tmp_path / "mm").glob("*.f32"))


RSS_CHILD = """
import sys
from fishersft_ray.features import FeatureSet

def peak_mb():  # VmHWM: ru_maxrss would carry the parent's peak over fork + exec
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) // 1024

cold = peak_mb()
FeatureSet.load(sys.argv[1], memmap_dir=sys.argv[3] or None)  # one-time costs (pandas import, reader)
before = peak_mb()
features = FeatureSet.load(sys.argv[2], memmap_dir=sys.argv[3] or None)
print(peak_mb() - before, peak_mb() - cold, features.factors.nbytes // 2**20, type(features.factors).__name__)
"""


@pytest.mark.slow  # ~20 s on an idle 2-core box (~75 s under load): writes and reads 400 MB twice
def test_loads_keep_peak_memory_small(tmp_path):
    """~400 MB of factors in 16 shards: the in-RAM load grows the peak RSS by about that (one
    copy, not several), the memmap load by under 100 MB (the small columns and one shard batch)."""
    import subprocess
    import sys

    d, rank, rows_per_file, files = 256, 200, 125, 16  # 400K factor rows × 1 KB
    block = np.random.default_rng(15).standard_normal((rows_per_file * rank, d), dtype=np.float32)
    directory, warm_up = tmp_path / "shards", tmp_path / "warm-up"
    directory.mkdir()
    warm_up.mkdir()
    for k in range(files):
        rows = np.arange(rows_per_file) * files + k  # interleaved: every file scatters
        part = FeatureSet(block, np.ones(len(block), np.float32), np.arange(rows_per_file + 1) * rank,
                          row_index=rows, embeddings=np.ones((rows_per_file, d), np.float32))
        pq.write_table(part.to_table(), directory / f"part-{k:02d}.parquet", **SHARD_WRITE_OPTIONS)
        if k == 0:
            pq.write_table(part.subset([0, 1]).to_table(), warm_up / "part.parquet")
    del block, part

    def growth_mb(memmap_dir):
        result = subprocess.run([sys.executable, "-c", RSS_CHILD, str(warm_up), str(directory), memmap_dir],
                                capture_output=True, text=True, check=True)
        grown, from_cold, factor_mb, kind = result.stdout.split()
        return int(grown), int(from_cold), int(factor_mb), kind

    in_ram, _, factor_mb, kind = growth_mb("")
    assert kind == "ndarray" and factor_mb >= 390 and 400 <= in_ram < factor_mb + 120
    on_disk, from_cold, factor_mb, kind = growth_mb(str(tmp_path / "mm"))
    assert kind == "memmap" and factor_mb >= 390 and on_disk < 100, (in_ram, on_disk, from_cold)


def test_project_dim_auto_projects_only_wide_models():
    from fishersft_ray.config import AUTO_PROJECT_ABOVE, AUTO_PROJECT_DIM, EvaluateSettings, FeaturizeConfig, count_or

    auto = FeaturizeConfig()
    assert auto.project_dim == "auto"
    assert auto.for_width(576).project_dim is None and auto.for_width(None).project_dim is None
    assert auto.for_width(AUTO_PROJECT_ABOVE).project_dim is None
    assert auto.for_width(4096).project_dim == AUTO_PROJECT_DIM
    assert FeaturizeConfig(project_dim=64).for_width(4096).project_dim == 64
    assert FeaturizeConfig(project_dim=None).for_width(4096).project_dim is None
    project_dim = count_or("auto", "none")
    assert project_dim("none") is None and project_dim("auto") == "auto" and project_dim("128") == 128
    with pytest.raises(Exception, match="auto, none or an integer"):
        project_dim("0")
    # evaluate fine-tunes on unprojected states: auto means none there.
    assert EvaluateSettings.build(input="x", output="y").featurize.project_dim is None


def test_float16_factors_keep_exact_spectra_and_select_as_their_float32_copy(tmp_path):
    _, features = random_feature_set(seed=21, n=80, d=12)
    half = features.stored_as("float16")
    assert half.factors.dtype == np.float16 and half.factors.nbytes * 2 == np.asarray(features.factors).nbytes
    for i in range(half.n):  # the spectrum describes the rounded factor, not the float32 one
        F = half.factor(i).astype(np.float64)
        expected = np.sort(np.linalg.eigvalsh(F @ F.T))[::-1] if len(F) else np.zeros(0)
        np.testing.assert_allclose(half.spectrum[half.offsets[i]:half.offsets[i + 1]], np.clip(expected, 0, None),
                                   rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(half.factors, features.factors, rtol=2 ** -10, atol=1e-4)
    pq.write_table(half.to_table(), tmp_path / "part-0.parquet", **SHARD_WRITE_OPTIONS)
    assert pq.read_schema(tmp_path / "part-0.parquet").field("factor").type == pa.list_(pa.float16())
    in_ram = FeatureSet.load(str(tmp_path))
    on_disk = FeatureSet.load(str(tmp_path), memmap_dir=str(tmp_path / "mm"))
    assert_same_feature_sets(in_ram, half)
    assert_same_feature_sets(on_disk, half)
    upcast = FeatureSet(half.factors.astype(np.float32), half.spectrum, half.offsets, half.num_targets)
    for unit, budget in (("examples", 10), ("tokens", 90)):
        picks = select(upcast, budget, budget_unit=unit, threads=1)
        for stored in (in_ram, on_disk):
            chosen = select(stored, budget, budget_unit=unit, threads=1)
            np.testing.assert_array_equal(chosen.indices, picks.indices)
            np.testing.assert_array_equal(chosen.gains, picks.gains)
    pq.write_table(features.to_table(), tmp_path / "part-1.parquet")
    for load in (FeatureSet.load, lambda path: FeatureSet.load(path, memmap_dir=str(tmp_path / "mm2"))):
        with pytest.raises(ValueError, match="mix factor dtypes"):
            load(str(tmp_path))


def test_float16_storage_refuses_values_past_its_range():
    with pytest.raises(ValueError, match="exceed float16's range.*--factor-dtype float32"):
        stored_factor(np.full((2, 3), 7e4, np.float32), np.ones(2, np.float32), "float16")
