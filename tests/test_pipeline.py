"""End-to-end runs of the curation job on a real local Ray instance with a tiny random model."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fishersft_ray.cli import main
from fishersft_ray.config import SelectSettings
from fishersft_ray.run.job import run_select
from fishersft_ray.select.device import selection_device
from fishersft_ray.io.storage import StorageError

WORDS = ("love war king crown night sword heart blood honour grace fortune sorrow "
         "death life dream tongue gentle noble foul fair").split()


def _alpaca_rows(n, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(3, 40))
        rows.append({
            "instruction": f"Question {i}: say something about {rng.choice(WORDS)}.",
            "input": "" if i % 3 else f"context {i}",
            "output": " ".join(rng.choice(WORDS, size=length)),
            "source": f"synthetic-{i % 4}",
        })
    return rows


@pytest.fixture()
def alpaca_corpus(tmp_path):
    rows = _alpaca_rows(40)
    rows.append(dict(rows[5]))                      # an exact duplicate
    rows.append({**rows[7], "output": "   "})       # an empty response
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def test_end_to_end_subset_ranking_manifest(ray_local, tiny_llama_dir, alpaca_corpus, tmp_path):
    path, rows = alpaca_corpus
    out = tmp_path / "out"
    result = run_select(SelectSettings.build(input=str(path), output=str(out), budget=8,
                                       model=str(tiny_llama_dir), num_actors=2, batch_size=8))

    manifest = json.loads((out / "manifest.json").read_text())
    subset = pq.read_table(out / "subset.parquet")
    ranking = pq.read_table(out / "ranking.parquet")

    # The budgeted rows, original columns intact, ranks 0..n-1 in greedy order.
    assert subset.num_rows == 8
    assert {"instruction", "input", "output", "source", "fishersft_rank", "fishersft_gain"} <= set(subset.column_names)
    assert subset.column("fishersft_rank").to_pylist() == list(range(8))
    originals = {json.dumps(r, sort_keys=True) for r in rows}
    for row in subset.select(["instruction", "input", "output", "source"]).to_pylist():
        assert json.dumps(row, sort_keys=True) in originals
    # Never two rows with identical content.
    assert len({(r["instruction"], r["input"], r["output"]) for r in subset.to_pylist()}) == 8
    gains = subset.column("fishersft_gain").to_numpy()
    assert np.all(gains > 0)
    np.testing.assert_allclose(np.cumsum(gains), ranking.column("objective").to_numpy(), rtol=1e-9)

    # The manifest is written last and agrees with the files.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    assert mtimes["manifest.json"] >= max(mtimes.values())
    assert manifest["corpus"]["rows_read"] == len(rows)
    assert manifest["corpus"]["skipped"]["duplicate"] == 1
    assert manifest["corpus"]["skipped"]["empty"] == 1
    assert manifest["corpus"]["kept"] == len(rows) - 2
    assert manifest["selection"]["selected"] == 8
    assert manifest["selection"]["objective"] == pytest.approx(float(np.sum(gains)))
    assert 0 < manifest["selection"]["certificate_ratio"] <= 1
    assert manifest["features"]["reused"] is False
    near = manifest["selection"]["near_duplicates"]
    assert near["cosine_threshold"] == 0.98 and 0 <= near["picks_with_twin"] <= 8
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.manifest == manifest


def test_rerun_reuses_feature_shards_and_prefix_property(ray_local, tiny_llama_dir, alpaca_corpus,
                                                         tmp_path, monkeypatch):
    path, _ = alpaca_corpus
    features = tmp_path / "features"
    first = run_select(SelectSettings.build(input=str(path), output=str(tmp_path / "a"), budget=12,
                                      model=str(tiny_llama_dir), features=str(features)))
    # A second run with another budget must not embed anything again.
    from fishersft_ray.run.executors import RayExecutor

    def no_featurizing(*args, **kwargs):
        raise AssertionError("featurized again despite cached shards")

    monkeypatch.setattr(RayExecutor, "featurize", no_featurizing)
    second = run_select(SelectSettings.build(input=str(path), output=str(tmp_path / "b"), budget=5,
                                       model=str(tiny_llama_dir), features=str(features)))
    assert second.manifest["features"]["reused"] is True
    # Nested ranking: the smaller budget's answer is the prefix of the larger one's.
    np.testing.assert_array_equal(second.selection.indices, first.selection.indices[:5])


def test_budget_larger_than_corpus_selects_all_with_warning(ray_local, tiny_llama_dir, alpaca_corpus,
                                                            tmp_path):
    path, rows = alpaca_corpus
    with pytest.warns(UserWarning, match="exceeds"):
        result = run_select(SelectSettings.build(input=str(path), output=str(tmp_path / "all"), budget=10_000,
                                           model=str(tiny_llama_dir)))
    assert result.manifest["selection"]["selected"] == len(rows) - 2


def test_length_cap_keeps_longer_examples_out(ray_local, tiny_llama_dir, alpaca_corpus, tmp_path):
    path, rows = alpaca_corpus
    out = tmp_path / "capped"
    with pytest.warns(UserWarning, match="exceeds"):
        result = run_select(SelectSettings.build(input=str(path), output=str(out), budget=10_000,
                                           model=str(tiny_llama_dir), length_cap="p50"))
    manifest = result.manifest
    cap, selection = manifest["selection"]["length_cap"], manifest["selection"]
    lengths = pq.read_table(out / "ranking.parquet").column("num_targets").to_numpy()
    assert cap["rule"] == "p50" and lengths.max() <= cap["tokens"]
    # Every eligible example is picked, so picks and exclusions partition the corpus.
    assert 0 < cap["excluded_examples"] < manifest["corpus"]["kept"]
    assert selection["selected"] + cap["excluded_examples"] == manifest["corpus"]["kept"]
    assert (selection["selected_target_tokens"] + cap["excluded_target_tokens"]
            == manifest["corpus"]["target_tokens"])
    subset = pq.read_table(out / "subset.parquet").to_pylist()
    assert len({(r["instruction"], r["input"], r["output"]) for r in subset}) == selection["selected"]


def test_near_duplicate_guard_keeps_close_pairs_out_of_the_subset(ray_local, tiny_llama_dir, alpaca_corpus,
                                                                   tmp_path):
    from fishersft_ray.features import FeatureSet
    from fishersft_ray.select import SelectionRequest, run_method

    path, _ = alpaca_corpus
    features = tmp_path / "features"
    plain = run_select(SelectSettings.build(input=str(path), output=str(tmp_path / "plain"), budget=10,
                                            model=str(tiny_llama_dir), features=str(features)))
    stored = FeatureSet.load(plain.manifest["features"]["location"])
    unit = stored.embeddings / np.linalg.norm(stored.embeddings, axis=1, keepdims=True)
    picked = unit[plain.selection.indices]
    cosines = picked @ picked.T
    np.fill_diagonal(cosines, -1.0)
    threshold = float(np.sort(cosines.max(axis=1))[len(cosines) // 2])  # half the picks have a pair at or above it
    guarded = run_select(SelectSettings.build(input=str(path), output=str(tmp_path / "guarded"), budget=10,
                                              model=str(tiny_llama_dir), features=str(features),
                                              near_dup_cosine=threshold))
    chosen = unit[guarded.selection.indices]
    cosines = chosen @ chosen.T
    np.fill_diagonal(cosines, -1.0)
    assert cosines.max() < threshold
    guard = guarded.manifest["selection"]["near_duplicates"]["guard"]
    assert guard["cosine"] == threshold and guard["excluded"] > 0
    assert "near-duplicate guard" in guarded.manifest["selection"]["certificate"]
    assert plain.manifest["selection"]["near_duplicates"]["guard"] is None
    # The job's picks are the engine's with the same rule on the same features.
    again = run_method("tokenod", stored,
                       SelectionRequest(10, lam=guarded.manifest["selection"]["lam"], near_dup_cosine=threshold))
    np.testing.assert_array_equal(guarded.selection.indices, again.indices)


def test_float16_factor_storage_halves_the_factors_and_selects_on_what_it_stored(ray_local, tiny_llama_dir,
                                                                                  alpaca_corpus, tmp_path):
    import pyarrow.parquet as pq

    from fishersft_ray.features import FeatureSet
    from fishersft_ray.select import SelectionRequest, run_method

    path, _ = alpaca_corpus
    common = dict(input=str(path), budget=10, model=str(tiny_llama_dir), features=str(tmp_path / "features"))
    single = run_select(SelectSettings.build(output=str(tmp_path / "float32"), **common))
    half = run_select(SelectSettings.build(output=str(tmp_path / "float16"), factor_dtype="float16", **common))
    location = half.manifest["features"]["location"]
    assert location != single.manifest["features"]["location"]  # its own cache key
    assert half.manifest["features"]["estimate"]["factor_dtype"] == "float16"
    shard = next(p for p in sorted((tmp_path / "features").rglob("*.parquet")) if str(p).startswith(location))
    assert str(pq.read_schema(shard).field("factor").type) == "list<element: halffloat>"
    stored, full = FeatureSet.load(location), FeatureSet.load(single.manifest["features"]["location"])
    assert stored.factors.dtype == np.float16
    np.testing.assert_allclose(stored.factors, full.factors, rtol=2 ** -10, atol=1e-3)
    assert stored.factors.nbytes * 2 == full.factors.nbytes
    assert half.manifest["features"]["driver"]["shard_bytes"] < 0.7 * single.manifest["features"]["driver"]["shard_bytes"]
    # The job selects on exactly what it stored, and that stays close to the float32 picks.
    again = run_method("tokenod", stored, SelectionRequest(10, lam=half.manifest["selection"]["lam"]))
    np.testing.assert_array_equal(half.selection.indices, again.indices)
    assert len(set(half.selection.indices) & set(single.selection.indices)) >= 8
    # Two stages ship float16 candidates back to the driver: the same picks as the engine's two stages.
    from fishersft_ray.select.two_stage import select_two_stage

    two = run_select(SelectSettings.build(output=str(tmp_path / "two"), factor_dtype="float16", partitions=2,
                                          part_oversample=2, seed=1, **common))
    engine, _ = select_two_stage(stored, 10, parts=2, oversample=2, seed=1, lam=half.manifest["selection"]["lam"])
    ranking = pq.read_table(tmp_path / "two" / "ranking.parquet")
    assert ranking.column("row_index").to_pylist() == stored.row_index[engine.indices].tolist()


def test_features_past_the_memory_budget_are_memory_mapped_with_the_same_picks(ray_local, tiny_llama_dir,
                                                                               alpaca_corpus, tmp_path):
    path, _ = alpaca_corpus
    common = dict(input=str(path), budget=9, model=str(tiny_llama_dir), features=str(tmp_path / "features"))
    in_ram = run_select(SelectSettings.build(output=str(tmp_path / "ram"), **common))
    spill = tmp_path / "spill"
    mapped = run_select(SelectSettings.build(output=str(tmp_path / "mapped"), driver_memory_gb=0,
                                             spill_dir=str(spill), **common))
    assert in_ram.manifest["features"]["driver"]["held"] == "RAM"
    assert mapped.manifest["features"]["driver"]["held"] == "memory-mapped"
    for name in ("subset.parquet", "ranking.parquet"):
        assert (tmp_path / "ram" / name).read_bytes() == (tmp_path / "mapped" / name).read_bytes()
    assert not list(spill.iterdir())  # the memory-mapped files are gone with the job
    # The estimate made before featurizing is an over-estimate of the real shards, by design.
    estimate = in_ram.manifest["features"]["estimate"]
    assert estimate["dim"] == in_ram.manifest["model"]["dim"]
    assert estimate["bytes"] >= in_ram.manifest["features"]["driver"]["shard_bytes"] * 0.5


def test_features_too_large_for_the_disk_fail_early_naming_flags_that_fit(tmp_path):
    from types import SimpleNamespace

    from fishersft_ray.config import FeaturizeConfig
    from fishersft_ray.io.storage import Location
    from fishersft_ray.run import driver_store

    # A million rows of 100K characters through a 4096-wide model: tens of TB unprojected.
    corpus = SimpleNamespace(length=np.full(1_000_000, 100_000), num_rows=1_000_000)
    config = FeaturizeConfig(max_length=2048, project_dim=None)
    guess = driver_store.estimate(corpus, config, 4096)
    assert guess["bytes"] > 1e13
    # The default (--project-dim auto) stores a 4096-wide model at 512 dims: 8x fewer bytes or more.
    assert driver_store.estimate(corpus, FeaturizeConfig(max_length=2048), 4096)["bytes"] < guess["bytes"] / 8
    with pytest.raises(driver_store.FeaturesTooLarge) as error:
        driver_store.check_fits(guess, corpus, config, Location.of(str(tmp_path / "features")),
                                memory_budget=10**9, spill=tmp_path / "spill")
    message = str(error.value)
    assert "1000000 rows" in message and "feature store" in message and "GB free" in message
    assert "--project-dim" in message or "no --project-dim fits" in message


def _select_one_line_corpus(tmp_path, *options) -> int:
    """`fishersft-ray select` on a one-row text corpus with extra ``options``; its exit code."""
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "a line"}\n')
    return main(["select", "--input", str(path), "--output", str(tmp_path / "o"), "--budget", "1", *options])


def test_cli_rejects_a_bad_length_cap_before_any_work(tmp_path, capsys):
    assert _select_one_line_corpus(tmp_path, "--length-cap", "p0") == 2
    assert "--length-cap must be a positive number of target tokens" in capsys.readouterr().err


def test_token_budget_is_respected_and_jsonl_output(ray_local, tiny_llama_dir, alpaca_corpus, tmp_path):
    """Also: loss-weighted features are their own cache entry and are recorded in the manifest."""
    path, _ = alpaca_corpus
    out = tmp_path / "tok"
    result = run_select(SelectSettings.build(input=str(path), output=str(out), budget=120,
                                       budget_unit="tokens", model=str(tiny_llama_dir),
                                       output_format="jsonl", token_weights="loss",
                                       features=str(tmp_path / "features")))
    assert 0 < result.manifest["selection"]["selected_target_tokens"] <= 120
    assert result.manifest["settings"]["token_weights"] == "loss"
    plain = run_select(SelectSettings.build(input=str(path), output=str(tmp_path / "plain"), budget=120,
                                      budget_unit="tokens", model=str(tiny_llama_dir),
                                      features=str(tmp_path / "features")))
    assert plain.manifest["features"]["key"] != result.manifest["features"]["key"]
    assert plain.manifest["features"]["reused"] is False
    lines = (out / "subset.jsonl").read_text().splitlines()
    assert len(lines) == result.manifest["selection"]["selected"]
    assert all("fishersft_rank" in json.loads(line) for line in lines)


def test_cli_reports_missing_field_with_fields_present(tiny_llama_dir, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "answer": "b"}\n')
    code = main(["select", "--input", str(path), "--output", str(tmp_path / "o"), "--budget", "1",
                 "--model", str(tiny_llama_dir), "--format", "text"])
    err = capsys.readouterr().err
    assert code == 2
    assert "text" in err and "prompt" in err and "answer" in err


def test_cli_names_malformed_json_line(tiny_llama_dir, tmp_path, capsys):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n')
    code = main(["select", "--input", str(path), "--output", str(tmp_path / "o"), "--budget", "1",
                 "--model", str(tiny_llama_dir)])
    assert code == 2
    assert ":3" in capsys.readouterr().err


def test_unreachable_input_fails_before_model_load(tmp_path, monkeypatch):
    import fishersft_ray.featurize.model_ref as featurize

    def model_must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(featurize, "resolve_model", model_must_not_load)
    with pytest.raises(StorageError, match="does not exist"):
        run_select(SelectSettings.build(input=str(tmp_path / "nope.jsonl"), output=str(tmp_path / "o"), budget=1))
    with pytest.raises(StorageError, match="cannot reach input"):
        run_select(SelectSettings.build(input="s3://bucket/corpus.jsonl", output=str(tmp_path / "o"), budget=1,
                                  storage_options={"key": "k", "secret": "s", "endpoint_url": "http://127.0.0.1:9",
                                                   "config_kwargs": {"retries": {"max_attempts": 1},
                                                                     "connect_timeout": 1}}))


def test_checkpoint_from_other_settings_is_ignored(ray_local, tiny_llama_dir, alpaca_corpus, tmp_path):
    path, _ = alpaca_corpus
    out = tmp_path / "out"
    stale = out / "_checkpoint" / "select.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"key": "a run with another budget", "state": {"variants": {}}}))
    result = run_select(SelectSettings.build(input=str(path), output=str(out), budget=4, model=str(tiny_llama_dir)))
    assert result.manifest["selection"]["selected"] == 4
    assert not stale.exists()


def test_cli_explains_a_model_it_cannot_fetch(tmp_path, capsys):
    assert _select_one_line_corpus(tmp_path, "--model", "no-such-org/no-such-model-fishersft") == 2
    assert "cannot resolve model 'no-such-org/no-such-model-fishersft'" in capsys.readouterr().err


def test_relative_lam_scales_with_the_corpus():
    from fishersft_ray.config import Rules
    from fishersft_ray.features import FeatureSet
    from fishersft_ray.select.rules import resolve_lam

    rng = np.random.default_rng(0)
    examples = [rng.normal(size=(5, 4)) for _ in range(6)]
    features, louder = FeatureSet.from_examples(examples), FeatureSet.from_examples([10 * X for X in examples])
    assert resolve_lam(3.0, None, features) == 3.0
    assert resolve_lam(3.0, 0.5, louder) == pytest.approx(100 * resolve_lam(3.0, 0.5, features), rel=1e-5)
    assert resolve_lam(3.0, 0.5, features) == pytest.approx(0.5 * features.mean_token_energy())
    with pytest.raises(ValueError, match="--lam-relative"):
        Rules(lam_relative=-1.0)


def test_cli_rejects_a_lam_too_small_for_float64_in_one_line(tiny_llama_dir, alpaca_corpus, tmp_path, capsys):
    path, _ = alpaca_corpus
    code = main(["select", "--input", str(path), "--output", str(tmp_path / "o"), "--budget", "3",
                 "--model", str(tiny_llama_dir), "--executor", "local", "--lam", "1e-15"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "rror" in line]
    assert code == 2 and len(errors) == 1  # one line, no traceback
    assert errors[0].startswith("fishersft-ray: error:") and "--lam" in errors[0]


def test_a_baseline_method_writes_the_same_outputs_for_an_ab_run(ray_local, tiny_llama_dir, alpaca_corpus, tmp_path):
    path, _ = alpaca_corpus
    features = str(tmp_path / "features")
    runs = {method: run_select(SelectSettings.build(input=str(path), output=str(tmp_path / method), budget=6,
                                                    model=str(tiny_llama_dir), features=features, method=method))
            for method in ("tokenod", "uniform", "density")}
    for method, result in runs.items():
        selection = result.manifest["selection"]
        assert selection["method"] == method and selection["selected"] == 6
        assert sorted(p.name for p in (tmp_path / method).iterdir() if p.is_file()) == [
            "manifest.json", "ranking.parquet", "report.png", "subset.parquet"]
        # The same unit for every method: TokenOD's f(S) of the picks; a certificate only for log det.
        gains = pq.read_table(tmp_path / method / "ranking.parquet").column("gain").to_numpy()
        assert selection["objective"] == pytest.approx(float(np.sum(gains)), rel=1e-9)
        assert (selection["certificate_ratio"] is None) == (method != "tokenod")
    assert runs["tokenod"].manifest["selection"]["objective"] >= runs["uniform"].manifest["selection"]["objective"]
    assert runs["uniform"].manifest["features"]["reused"] is True  # one cache serves every method


def test_two_stage_job_picks_what_the_engine_picks_and_says_what_it_certifies(ray_local, tiny_llama_dir,
                                                                              alpaca_corpus, tmp_path):
    from fishersft_ray.features import FeatureSet
    from fishersft_ray.select.two_stage import select_two_stage

    path, _ = alpaca_corpus
    common = dict(input=str(path), budget=6, model=str(tiny_llama_dir), features=str(tmp_path / "features"),
                  seed=3)
    one = run_select(SelectSettings.build(output=str(tmp_path / "one"), **common))
    two = run_select(SelectSettings.build(output=str(tmp_path / "two"), partitions=3, part_oversample=2, **common))
    account = two.manifest["selection"]["two_stage"]
    assert one.manifest["selection"]["two_stage"] is None
    assert account["parts"] == 3 and sum(account["part_sizes"]) == one.manifest["corpus"]["kept"]
    assert account["candidates"] <= 3 * 12 and two.manifest["features"]["driver"]["held"] == "shards (3 parts)"
    # The corpus totals still cover every example, not just the candidates.
    assert two.manifest["corpus"]["target_tokens"] == one.manifest["corpus"]["target_tokens"]
    # The same two stages on the stored features, in memory, pick the same rows.
    stored = FeatureSet.load(str(tmp_path / "features" / one.manifest["features"]["key"]))
    lam = one.manifest["selection"]["lam"]
    engine, engine_account = select_two_stage(stored, 6, parts=3, oversample=2, seed=3, lam=lam)
    ranking = pq.read_table(tmp_path / "two" / "ranking.parquet")
    assert ranking.column("row_index").to_pylist() == stored.row_index[engine.indices].tolist()
    assert account["kept"] == engine_account["kept"]
    # Its certificate (the sum of the parts' bounds) is a true bound: at least the one-stage greedy's value.
    assert two.manifest["selection"]["upper_bound"] >= one.manifest["selection"]["objective"]
    assert two.manifest["selection"]["objective"] <= one.manifest["selection"]["upper_bound"] + 1e-9
    assert "two-stage" in two.manifest["selection"]["certificate"]
    # In one process (local executor, pieces spilled to Arrow files) the same two stages give the same bytes.
    spill = tmp_path / "spill"
    local = run_select(SelectSettings.build(output=str(tmp_path / "local"), partitions=3, part_oversample=2,
                                            executor="local", spill_dir=str(spill), **common))
    assert local.manifest["features"]["reused"] is True
    for name in ("subset.parquet", "ranking.parquet"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    assert not list(spill.iterdir())  # the spilled pieces are gone with the job


def test_shuffle_hands_each_reduce_its_output_of_every_split_on_ray_and_locally(ray_local, tmp_path):
    from fishersft_ray.config import Resources
    from fishersft_ray.run.executors import LocalExecutor, RayExecutor

    calls = []

    def split(shard: int, outputs: int) -> list[pa.Table]:
        calls.append(shard)
        return [pa.table({"value": [100 * shard + output] * (output + 1)}) for output in range(outputs)]

    def reduce(pieces: list[pa.Table], label: str) -> tuple[str, list[int]]:
        return label, pa.concat_tables(pieces).column("value").to_pylist()

    items = [{"shard": shard, "outputs": 3} for shard in range(4)]
    wanted = [("a", [2, 2, 2, 102, 102, 102, 202, 202, 202, 302, 302, 302]), ("b", [0, 100, 200, 300])]
    local = LocalExecutor(Resources()).shuffle(split, items, 3, reduce, [{"label": "a"}, {"label": "b"}], [2, 0],
                                               spill_dir=tmp_path / "spill")
    assert local == wanted and calls == [0, 1, 2, 3]  # each split ran once
    assert not list((tmp_path / "spill").iterdir())
    assert RayExecutor(Resources()).shuffle(split, items, 3, reduce, [{"label": "a"}, {"label": "b"}],
                                            [2, 0]) == wanted
    one = RayExecutor(Resources()).shuffle(lambda shard, outputs: [pa.table({"value": [shard]})], items, 1,
                                           reduce, [{"label": "c"}], [0])
    assert one == [("c", [0, 1, 2, 3])]


def test_partitions_auto_splits_only_when_the_features_fit_neither_memory_nor_spill_disk(tmp_path):
    from fishersft_ray.run import driver_store

    spill = tmp_path / "spill"
    assert driver_store.partitions_for("auto", None, 10**9, spill) == 1
    assert driver_store.partitions_for("auto", {"bytes": 5 * 10**9}, 10**9, spill) == 1  # fits the spill disk
    assert driver_store.partitions_for("auto", {"bytes": 10**18}, 10**12, spill) == 10**6 * driver_store.RAM_LOAD_PEAK
    assert driver_store.partitions_for(4, {"bytes": 1}, 10**9, spill) == 4


def test_cli_rejects_bad_partitions_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:  # argparse's usage error
        _select_one_line_corpus(tmp_path, "--partitions", "0")
    assert exited.value.code == 2 and "--partitions: expected auto or an integer >= 1" in capsys.readouterr().err
    assert _select_one_line_corpus(tmp_path, "--partitions", "2", "--method", "uniform") == 2
    assert "runs a certified method (sentence_od, targeted, tokenod) only" in capsys.readouterr().err


def test_selection_runs_on_the_driver_cpu_when_gpu_actors_featurize_for_a_cpu_head(monkeypatch, caplog):
    """--device cuda sends the featurizer to GPU actors; a driver without a GPU (a CPU head)
    must still select, on its CPU, instead of failing after the featurize stage."""
    import logging

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="fishersft_ray"):
        assert selection_device("cuda") == "cpu"
    assert "no GPU" in caplog.text
    assert selection_device("auto") == "cpu" and selection_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert selection_device("cuda") == "cuda" and selection_device("auto") == "cuda"
    assert selection_device("cpu") == "cpu"


def test_cli_rejects_device_cuda_without_a_gpu_on_the_local_executor(tiny_llama_dir, alpaca_corpus, tmp_path,
                                                                     capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path, _ = alpaca_corpus
    code = main(["select", "--input", str(path), "--output", str(tmp_path / "o"), "--budget", "3",
                 "--model", str(tiny_llama_dir), "--executor", "local", "--device", "cuda"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "rror" in line]
    assert code == 2 and len(errors) == 1  # one line, no traceback
    assert "--device cuda" in errors[0] and "no CUDA GPU" in errors[0]
    assert not (tmp_path / "o" / "features").exists()  # before any featurizing
