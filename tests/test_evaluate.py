"""The evaluation harness on synthetic pre-logit states (fast) — no model, no Ray."""

import json

import numpy as np
import pyarrow as pa
import pytest

from fishersft_ray.config import EvaluateRules, Protocol
from fishersft_ray.evaluate import data, head, outputs, protocol
from fishersft_ray.evaluate.methods import RANDOM_METHODS, default_methods, pick_subsets
from fishersft_ray.features import FeatureSet, TokenStates, with_token_states
from fishersft_ray.io.storage import Location


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
    first = data.split_examples(1000, test_fraction=0.2, validation_size=50, seed=3, max_pool=400)
    again = data.split_examples(1000, test_fraction=0.2, validation_size=50, seed=3, max_pool=400)
    other = data.split_examples(1000, test_fraction=0.2, validation_size=50, seed=4, max_pool=400)
    for a, b in zip((first.pool, first.validation, first.test), (again.pool, again.validation, again.test)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first.test, other.test)
    assert (len(first.test), len(first.validation), len(first.pool)) == (200, 50, 400)
    assert not set(first.test) & set(first.validation)
    assert not set(first.test) & set(first.pool)
    assert not set(first.validation) & set(first.pool)


def test_token_states_subset_and_stored_round_trip(tmp_path):
    part, _ = synthetic_corpus(5, dim=3)
    picked = part.subset([3, 1])
    np.testing.assert_array_equal(picked.num_targets, part.num_targets[[3, 1]])
    np.testing.assert_array_equal(picked.states[: part.num_targets[3]], part.states[part.offsets[3]:part.offsets[4]])
    # Stored next to the factors (select --keep-states), read back by row key in any order.
    shard = with_token_states(part.features().to_table(), part.per_example(),
                              [part.targets[a:b] for a, b in zip(part.offsets[:-1], part.offsets[1:])])
    import pyarrow.parquet as pq

    pq.write_table(shard, tmp_path / "part-0.parquet")
    back = TokenStates.load(str(tmp_path), np.array([4, 0, 2]))
    expected = part.subset([4, 0, 2])
    np.testing.assert_array_equal(back.row_index, [4, 0, 2])
    np.testing.assert_array_equal(back.offsets, expected.offsets)
    np.testing.assert_allclose(back.states, expected.states)
    np.testing.assert_array_equal(back.targets, expected.targets)
    assert FeatureSet.load(str(tmp_path)).n == 5  # the factors read as usual, states left out
    with pytest.raises(ValueError, match="lack token states"):
        TokenStates.load(str(tmp_path), np.array([7]))


def test_redundant_pool_and_copy_counts():
    pool, _ = synthetic_corpus(100)
    redundant, groups = data.make_redundant(pool, share=0.5, num_sources=5, near_copy_noise=0.0, seed=0)
    assert redundant.num_examples == 100 and len(np.unique(groups)) == 50
    everything = np.arange(100)
    exact, twins = protocol.redundancy_counts(everything, groups, redundant.features().embeddings)
    assert exact == 50 and twins >= 55  # 5 sources + 50 copies all have an identical twin
    near, near_groups = data.make_redundant(pool, share=0.5, num_sources=5, near_copy_noise=0.01, seed=0)
    assert len(np.unique(near_groups)) == 100
    assert not np.allclose(near.states, redundant.states)


def test_head_finetuning_beats_a_wrong_head_and_chunked_nll_matches():
    data, teacher = synthetic_corpus(150, vocab=20)
    vocabulary = head.restricted_vocabulary(data)
    targets = np.searchsorted(vocabulary, data.targets)
    wrong = head.Head.restricted(0.3 * full_vocab_weight(teacher), None, vocabulary)
    whole = head.head_nll(wrong, data.states, targets, chunk_tokens=10 ** 9)
    assert head.head_nll(wrong, data.states, targets, chunk_tokens=7) == pytest.approx(whole, rel=1e-5)
    recipe = head.HeadRecipe(lr=3e-2, epochs=3, batch_tokens=128)
    tuned = head.finetune_head(wrong, data.states, targets, recipe)
    assert head.head_nll(tuned, data.states, targets) < whole - 0.1
    again = head.finetune_head(wrong, data.states, targets, recipe)
    assert bool((tuned.weight == again.weight).all())


def small_settings(**overrides):
    values = dict(budgets=[10, 30], seeds=2, recipe_lrs=[1e-2, 3e-2], recipe_epochs=[1, 2], batch_tokens=128)
    return Protocol(**(values | overrides))


RULES = EvaluateRules()


def test_end_to_end_protocol_writes_tables_and_uses_one_recipe(tmp_path, monkeypatch):
    corpus, teacher = synthetic_corpus(260, vocab=25)
    pool, validation, test = corpus.subset(range(200)), corpus.subset(range(200, 230)), corpus.subset(range(230, 260))
    recipes_used = []
    real_finetune = head.finetune_head

    def recording_finetune(head, states, targets, recipe, seed=0):
        recipes_used.append((recipe, seed))
        return real_finetune(head, states, targets, recipe, seed)

    monkeypatch.setattr(head, "finetune_head", recording_finetune)
    settings = small_settings()
    result = protocol.run_protocol(pool, validation, test, 0.3 * full_vocab_weight(teacher), None, settings, RULES)
    info = result["info"]
    searched = len(settings.recipe_lrs) * len(settings.recipe_epochs) * len(settings.budgets)
    method_runs = recipes_used[searched:]
    assert len(method_runs) == len(result["rows"])
    assert {recipe for recipe, _ in method_runs} == {head.HeadRecipe(**info["recipe"])}
    assert {seed for _, seed in method_runs} == {settings.train_seed}
    assert not info["void"] and info["vocabulary_size"] <= 25
    summary = {(row["method"], row["budget"]): row for row in result["summary"]}
    assert set(summary) == {(m, n) for m in default_methods(grouped=False) for n in settings.budgets}
    for method in RANDOM_METHODS - {"balanced_tokens"}:
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
    files = outputs.write_outputs(result, Location.of(str(tmp_path)), "synthetic")
    assert [f.rsplit("/", 1)[1] for f in files] == list(outputs.FILES)
    assert "| 30 |" in (tmp_path / "summary.md").read_text()
    assert json.loads((tmp_path / "settings.json").read_text())["recipe"] == info["recipe"]
    assert (tmp_path / "nll_vs_budget.png").read_bytes()[:4] == b"\x89PNG"


def test_void_when_finetuning_does_not_beat_the_pretrained_head():
    corpus, teacher = synthetic_corpus(260, vocab=25)
    pool, validation, test = corpus.subset(range(200)), corpus.subset(range(200, 230)), corpus.subset(range(230, 260))
    # The pretrained head is the true model and the recipe overshoots: fine-tuning can only hurt.
    settings = small_settings(recipe_lrs=[1.0], recipe_epochs=[3], methods=["uniform"])
    result = protocol.run_protocol(pool, validation, test, full_vocab_weight(teacher), None, settings, RULES)
    assert result["info"]["void"]
    assert "VOID" in outputs.markdown_table(result["summary"], result["info"])


def _speeches(shared_data, path, n):
    path.write_text("\n\n".join((shared_data / "tinyshakespeare.txt").read_text().split("\n\n")[:n]))
    return str(path)


def test_evaluate_reads_the_features_select_stored_and_embeds_nothing(shared_data, tiny_llama_dir, tmp_path,
                                                                      ray_local):
    from fishersft_ray.cli import main

    corpus, features = _speeches(shared_data, tmp_path / "speeches.txt", 80), str(tmp_path / "features")
    assert main(["select", "--input", corpus, "--output", str(tmp_path / "subset"), "--budget", "5",
                 "--model", str(tiny_llama_dir), "--features", features, "--keep-states"]) == 0
    keys = sorted(p.name for p in (tmp_path / "features").iterdir())
    out = tmp_path / "eval"
    argv = ["evaluate", "--input", corpus, "--output", str(out), "--model", str(tiny_llama_dir),
            "--features", features, "--budgets", "5,10", "--seeds", "2", "--validation-size", "10",
            "--test-fraction", "0.2", "--recipe-lrs", "3e-4", "--recipe-epochs", "1",
            "--methods", "tokenod,tokenod_tokens,uniform,density"]
    assert main(argv) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["features"]["reused"] is True and settings["features"]["embedded_rows"] == 0
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == keys  # no new cache key
    assert settings["pretrained_test_nll"] > 0 and "void" in settings
    assert not (out / "_checkpoint" / "evaluate.json").exists()  # a finished run leaves no checkpoint


def test_evaluate_without_a_select_cache_embeds_only_its_split(shared_data, tiny_llama_dir, tmp_path):
    from fishersft_ray.cli import main

    corpus = _speeches(shared_data, tmp_path / "speeches.txt", 80)
    argv = ["evaluate", "--input", corpus, "--output", str(tmp_path / "eval"), "--model", str(tiny_llama_dir),
            "--budgets", "4", "--seeds", "1", "--validation-size", "8", "--max-pool", "20", "--max-test", "10",
            "--recipe-lrs", "3e-4", "--recipe-epochs", "1", "--methods", "tokenod,uniform"]
    assert main(argv) == 0
    settings = json.loads((tmp_path / "eval" / "settings.json").read_text())
    assert settings["features"]["embedded_rows"] == 20 + 8 + 10 and settings["features"]["reused"] is False
    assert main(argv) == 0  # a rerun reuses them
    settings = json.loads((tmp_path / "eval" / "settings.json").read_text())
    assert settings["features"]["reused"] is True and settings["features"]["embedded_rows"] == 0


@pytest.mark.slow
def test_evaluate_on_the_real_model(shared_data, tmp_path):
    from fishersft_ray.cli import main

    corpus = _speeches(shared_data, tmp_path / "speeches.txt", 60)
    argv = ["evaluate", "--input", corpus, "--output", str(tmp_path / "out"), "--budgets", "5,10", "--seeds", "2",
            "--validation-size", "10", "--test-fraction", "0.2", "--recipe-lrs", "3e-4", "--recipe-epochs", "1"]
    assert main(argv) == 0
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert settings["model"] == "SmolLM2-135M-Instruct.Q4_1" and settings["pretrained_test_nll"] > 0


def test_length_capped_tokenod_picks_only_short_examples_and_maps_positions_back():
    pool, _ = synthetic_corpus(80, seed=3)
    lengths = pool.num_targets
    cap = int(np.floor(np.median(lengths)))
    picks = pick_subsets(pool.features(), [5, 12], [0, 1], ["tokenod_capped", "tokenod_capped_tokens", "uniform",
                                                             "uniform_capped_tokens"], rules=RULES)
    by_method = {(p.method, p.budget, p.seed): p.positions for p in picks}
    eligible = np.flatnonzero(lengths <= cap)
    # The capped ranking is plain TokenOD run on the eligible examples alone, in pool positions.
    from fishersft_ray.select import select

    alone = pool.subset(eligible).features()
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
    output = Location.of(str(tmp_path))
    complete = protocol.run_protocol(pool, validation, test, weight, None, settings, RULES)

    real_finetune, calls, killed = head.finetune_head, [], []

    def dying_finetune(*args, **kwargs):
        calls.append(1)
        if len(calls) == 11 and not killed:
            killed.append(True)  # after the recipe search (8 fine-tunes) and two method runs
            raise RuntimeError("killed mid-run")
        return real_finetune(*args, **kwargs)

    monkeypatch.setattr(head, "finetune_head", dying_finetune)
    with pytest.raises(RuntimeError, match="killed mid-run"):
        protocol.run_protocol(pool, validation, test, weight, None, settings, RULES,
                              checkpoint=protocol.ProtocolCheckpoint(output, "k"))
    saved = output.read_json(protocol.ProtocolCheckpoint.NAME)
    assert saved["recipe"] is not None and len(saved["runs"]) == 2
    calls.clear()
    resumed = protocol.run_protocol(pool, validation, test, weight, None, settings, RULES,
                                    checkpoint=protocol.ProtocolCheckpoint(output, "k"))
    assert len(calls) == len(complete["rows"]) - 2  # no recipe search, no finished run again
    assert resumed["rows"] == complete["rows"] and resumed["info"]["recipe"] == complete["info"]["recipe"]
    # A checkpoint of another run is ignored.
    calls.clear()
    protocol.run_protocol(pool, validation, test, weight, None, settings, RULES,
                          checkpoint=protocol.ProtocolCheckpoint(output, "other"))
    assert len(calls) == 8 + len(complete["rows"])
