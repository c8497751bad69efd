"""The evaluation harness on synthetic pre-logit states (fast) — no model, no Ray."""

import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from fishersft_ray import baselines, evaluate
from fishersft_ray.evaluate import EvalSettings, TokenStates
from fishersft_ray.features import FeatureSet


def synthetic_corpus(num_examples, *, dim=12, vocab=40, seed=0, teacher=None):
    """Examples of 1-30 target tokens whose targets follow a softmax teacher on the states."""
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((vocab, dim)) if teacher is None else teacher
    lengths = rng.integers(1, 31, size=num_examples)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    centres = rng.standard_normal((num_examples, dim))
    states = (np.repeat(centres, lengths, axis=0) + 0.7 * rng.standard_normal((offsets[-1], dim)))
    logits = states @ teacher.T
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    targets = np.array([rng.choice(vocab, p=p) for p in probabilities]) + 100  # ids beyond the vocab start
    return TokenStates(states.astype(np.float32), targets.astype(np.int64), offsets,
                       np.arange(num_examples, dtype=np.int64)), teacher


def full_vocab_weight(teacher, offset=100, total=200):
    weight = np.zeros((total, teacher.shape[1]), np.float32)
    weight[offset:offset + len(teacher)] = teacher
    return weight


def test_split_is_deterministic_disjoint_and_capped():
    first = evaluate.split_examples(1000, test_fraction=0.2, validation_size=50, seed=3, max_pool=400)
    again = evaluate.split_examples(1000, test_fraction=0.2, validation_size=50, seed=3, max_pool=400)
    other = evaluate.split_examples(1000, test_fraction=0.2, validation_size=50, seed=4, max_pool=400)
    for a, b in zip((first.pool, first.validation, first.test), (again.pool, again.validation, again.test)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first.test, other.test)
    assert (len(first.test), len(first.validation), len(first.pool)) == (200, 50, 400)
    assert not set(first.test) & set(first.validation)
    assert not set(first.test) & set(first.pool)
    assert not set(first.validation) & set(first.pool)


def test_token_states_subset_and_from_featurized():
    part, _ = synthetic_corpus(5, dim=3)
    picked = part.subset([3, 1])
    np.testing.assert_array_equal(picked.num_targets, part.num_targets[[3, 1]])
    np.testing.assert_array_equal(picked.states[: part.num_targets[3]], part.states[part.offsets[3]:part.offsets[4]])
    empty = np.zeros(0, np.float32)  # an example without target tokens is dropped
    table = pa.table({
        "row_index": pa.array(list(part.row_index) + [99], pa.int64()),
        "states": pa.array([x.ravel() for x in part.per_example()] + [empty], pa.list_(pa.float32())),
        "target_ids": pa.array([part.targets[a:b] for a, b in zip(part.offsets[:-1], part.offsets[1:])]
                               + [empty.astype(np.int32)], pa.list_(pa.int32())),
    })
    back = TokenStates.from_featurized(table, 3)
    np.testing.assert_array_equal(back.row_index, part.row_index)
    np.testing.assert_array_equal(back.offsets, part.offsets)
    np.testing.assert_allclose(back.states, part.states)
    np.testing.assert_array_equal(back.targets, part.targets)


@pytest.mark.parametrize("method", ["uniform", "longest", "density"])
def test_baselines_respect_budgets(method):
    rng = np.random.default_rng(0)
    costs = rng.integers(1, 60, size=300)
    pool = SimpleNamespace(num_targets=costs)
    embeddings = rng.standard_normal((300, 8))
    pickers = {
        "uniform": lambda budget, unit: baselines.uniform_random(pool, budget, budget_unit=unit, seed=1),
        "longest": lambda budget, unit: baselines.longest_first(pool, budget, budget_unit=unit),
        "density": lambda budget, unit: baselines.density_sampling(pool, embeddings, budget, budget_unit=unit,
                                                                  seed=1),
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
    picked = baselines.density_sampling(SimpleNamespace(num_targets=np.ones(300)), embeddings, 50, seed=0)
    assert np.sum(picked >= 200) > 40  # uniform would give ~17 of 50 from the spread part


def test_redundant_pool_and_copy_counts():
    pool, _ = synthetic_corpus(100)
    redundant, groups = evaluate.make_redundant(pool, share=0.5, num_sources=5, near_copy_noise=0.0, seed=0)
    assert redundant.num_examples == 100 and len(np.unique(groups)) == 50
    embeddings = baselines.mean_embeddings(redundant.states, redundant.offsets)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    everything = np.arange(100)
    exact, twins = evaluate.redundancy_counts(everything, groups, unit)
    assert exact == 50 and twins >= 55  # 5 sources + 50 copies all have an identical twin
    near, near_groups = evaluate.make_redundant(pool, share=0.5, num_sources=5, near_copy_noise=0.01, seed=0)
    assert len(np.unique(near_groups)) == 100
    assert not np.allclose(near.states, redundant.states)


def test_head_finetuning_beats_a_wrong_head_and_chunked_nll_matches():
    data, teacher = synthetic_corpus(150, vocab=20)
    vocabulary = evaluate.restricted_vocabulary(data)
    targets = np.searchsorted(vocabulary, data.targets)
    head = evaluate.Head.restricted(0.3 * full_vocab_weight(teacher), None, vocabulary)
    whole = evaluate.head_nll(head, data.states, targets, chunk_tokens=10 ** 9)
    assert evaluate.head_nll(head, data.states, targets, chunk_tokens=7) == pytest.approx(whole, rel=1e-5)
    tuned = evaluate.finetune_head(head, data.states, targets, evaluate.HeadRecipe(lr=3e-2, epochs=3,
                                                                                  batch_tokens=128))
    assert evaluate.head_nll(tuned, data.states, targets) < whole - 0.1
    again = evaluate.finetune_head(head, data.states, targets, evaluate.HeadRecipe(lr=3e-2, epochs=3,
                                                                                  batch_tokens=128))
    torch_equal = (tuned.weight == again.weight).all()
    assert bool(torch_equal)


def small_settings(**overrides):
    values = dict(budgets=[10, 30], seeds=2, recipe_lrs=[1e-2, 3e-2], recipe_epochs=[1, 2], batch_tokens=128)
    return EvalSettings(**(values | overrides))


def test_end_to_end_protocol_writes_tables_and_uses_one_recipe(tmp_path, monkeypatch):
    corpus, teacher = synthetic_corpus(260, vocab=25)
    pool, validation, test = corpus.subset(range(200)), corpus.subset(range(200, 230)), corpus.subset(range(230, 260))
    recipes_used = []
    real_finetune = evaluate.finetune_head

    def recording_finetune(head, states, targets, recipe, seed=0):
        recipes_used.append((recipe, seed))
        return real_finetune(head, states, targets, recipe, seed)

    monkeypatch.setattr(evaluate, "finetune_head", recording_finetune)
    settings = small_settings()
    result = evaluate.run_protocol(pool, validation, test, 0.3 * full_vocab_weight(teacher), None, settings)
    info = result["info"]
    searched = len(settings.recipe_lrs) * len(settings.recipe_epochs) * len(settings.budgets)
    method_runs = recipes_used[searched:]
    assert len(method_runs) == len(result["rows"])
    assert {recipe for recipe, _ in method_runs} == {evaluate.HeadRecipe(**info["recipe"])}
    assert {seed for _, seed in method_runs} == {settings.train_seed}
    assert not info["void"] and info["vocabulary_size"] <= 25
    summary = {(row["method"], row["budget"]): row for row in result["summary"]}
    assert set(summary) == {(m, n) for m in evaluate.METHODS for n in settings.budgets}
    for method in evaluate.RANDOM_METHODS:
        assert summary[method, 30]["runs"] == 2
    for n in settings.budgets:
        assert summary["tokenod", n]["examples_mean"] == n
        # the length-matched control spends at most TokenOD's tokens
        assert summary["length_matched", n]["tokens_mean"] <= summary["tokenod", n]["tokens_mean"]
        assert summary["tokenod_tokens", n]["tokens_mean"] <= summary["uniform", n]["tokens_mean"] + 1e-9
        assert summary["tokenod_loss_tokens", n]["tokens_mean"] <= summary["uniform", n]["tokens_mean"] + 1e-9
        assert summary["tokenod_loss", n]["examples_mean"] == n
        assert summary["vopt", n]["examples_mean"] == n
        assert summary["vopt_tokens", n]["tokens_mean"] <= summary["uniform", n]["tokens_mean"] + 1e-9
    paths = evaluate.write_outputs(result, str(tmp_path), "synthetic")
    assert "| 30 |" in open(paths["summary.md"]).read()
    assert json.load(open(paths["settings.json"]))["recipe"] == info["recipe"]
    assert (tmp_path / "nll_vs_budget.png").stat().st_size > 0


def test_void_when_finetuning_does_not_beat_the_pretrained_head():
    corpus, teacher = synthetic_corpus(260, vocab=25)
    pool, validation, test = corpus.subset(range(200)), corpus.subset(range(200, 230)), corpus.subset(range(230, 260))
    # The pretrained head is the true model and the recipe overshoots: fine-tuning can only hurt.
    settings = small_settings(recipe_lrs=[1.0], recipe_epochs=[3], methods=["uniform"])
    result = evaluate.run_protocol(pool, validation, test, full_vocab_weight(teacher), None, settings)
    assert result["info"]["void"]
    assert "VOID" in evaluate.markdown_table(result["summary"], result["info"])


@pytest.mark.slow
def test_main_on_real_model_and_featurized_cache(shared_data, tmp_path):
    corpus = tmp_path / "speeches.txt"
    speeches = (shared_data / "tinyshakespeare.txt").read_text().split("\n\n")[:60]
    corpus.write_text("\n\n".join(speeches))
    argv = ["--input", str(corpus), "--output", str(tmp_path / "out"), "--budgets", "5,10", "--seeds", "2",
            "--validation-size", "10", "--test-fraction", "0.2", "--recipe-lrs", "3e-4", "--recipe-epochs", "1"]
    assert evaluate.main(argv) == 0
    cached = sorted((tmp_path / "out" / "cache").glob("*.parquet"))
    assert sorted(path.name.split("-")[1] for path in cached) == ["pool.parquet", "test.parquet",
                                                                   "validation.parquet"]
    mtimes = [path.stat().st_mtime for path in cached]
    assert evaluate.main(argv) == 0  # the rerun reuses the featurized parts
    assert [path.stat().st_mtime for path in cached] == mtimes
    settings = json.load(open(tmp_path / "out" / "settings.json"))
    assert settings["pretrained_test_nll"] > 0 and "void" in settings


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
    np.testing.assert_array_equal(baselines.v_optimal(features, 6, batch=4), greedy)
    picked = baselines.v_optimal(features, 30, budget_unit="tokens", batch=4)
    assert 0 < features.num_targets[picked].sum() <= 30 and len(set(picked.tolist())) == len(picked)


def test_length_capped_tokenod_picks_only_short_examples_and_maps_positions_back():
    pool, _ = synthetic_corpus(80, seed=3)
    lengths = pool.num_targets
    cap = int(np.floor(np.median(lengths)))
    picks = evaluate.pick_subsets(pool, [5, 12], [0, 1], ["tokenod_capped", "tokenod_capped_tokens", "uniform",
                                                         "uniform_capped_tokens"], lam=1.0, length_cap="p50")
    by_method = {(p.method, p.budget, p.seed): p.positions for p in picks}
    eligible = np.flatnonzero(lengths <= cap)
    # The capped ranking is plain TokenOD run on the eligible examples alone, in pool positions.
    from fishersft_ray.tokenod import select

    alone = evaluate.pool_features(pool.subset(eligible))
    expected = eligible[select(alone, 12, lam=1.0).indices]
    np.testing.assert_array_equal(by_method["tokenod_capped", 12, None], expected)
    np.testing.assert_array_equal(by_method["tokenod_capped", 5, None], expected[:5])
    for n in (5, 12):
        uniform_tokens = np.mean([lengths[by_method["uniform", n, s]].sum() for s in (0, 1)])
        for capped_tokens in (by_method["tokenod_capped_tokens", n, None],
                              by_method["uniform_capped_tokens", n, 0], by_method["uniform_capped_tokens", n, 1]):
            assert lengths[capped_tokens].max() <= cap
            assert uniform_tokens - lengths.max() < lengths[capped_tokens].sum() <= uniform_tokens
        assert set(by_method["uniform_capped_tokens", n, 0]) != set(by_method["uniform_capped_tokens", n, 1])


def test_an_interrupted_protocol_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    corpus, teacher = synthetic_corpus(260, vocab=25)
    pool, validation, test = corpus.subset(range(200)), corpus.subset(range(200, 230)), corpus.subset(range(230, 260))
    settings = small_settings(methods=["tokenod_tokens", "uniform"])
    weight = 0.3 * full_vocab_weight(teacher)
    path = str(tmp_path / "evaluate.json")
    complete = evaluate.run_protocol(pool, validation, test, weight, None, settings)

    real_finetune, calls, killed = evaluate.finetune_head, [], []

    def dying_finetune(*args, **kwargs):
        calls.append(1)
        if len(calls) == 11 and not killed:
            killed.append(True)  # after the recipe search (8 fine-tunes) and two method runs
            raise RuntimeError("killed mid-run")
        return real_finetune(*args, **kwargs)

    monkeypatch.setattr(evaluate, "finetune_head", dying_finetune)
    with pytest.raises(RuntimeError, match="killed mid-run"):
        evaluate.run_protocol(pool, validation, test, weight, None, settings,
                              checkpoint=evaluate.ProtocolCheckpoint(path, "k"))
    saved = json.load(open(path))
    assert saved["recipe"] is not None and len(saved["runs"]) == 2
    calls.clear()
    resumed = evaluate.run_protocol(pool, validation, test, weight, None, settings,
                                    checkpoint=evaluate.ProtocolCheckpoint(path, "k"))
    assert len(calls) == len(complete["rows"]) - 2  # no recipe search, no finished run again
    assert resumed["rows"] == complete["rows"] and resumed["info"]["recipe"] == complete["info"]["recipe"]
    # A checkpoint of another run is ignored.
    calls.clear()
    evaluate.run_protocol(pool, validation, test, weight, None, settings,
                          checkpoint=evaluate.ProtocolCheckpoint(path, "other"))
    assert len(calls) == 8 + len(complete["rows"])
