"""Groups of a mixture (io/groups.py): the per-group split and scores of `evaluate`, the group
shares in `select`'s manifest, and the CLI flags — synthetic states or the tiny model, fast."""

import csv
import json

import numpy as np
import pytest

from fishersft_ray.config import EvaluateSettings, SelectSettings
from fishersft_ray.evaluate import data, protocol
from fishersft_ray.io.corpus import index_corpus
from fishersft_ray.io.groups import column_name, corpus_groups, group_account, groups_from_labels

from test_evaluate import RULES, full_vocab_weight, small_settings, synthetic_corpus

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_mixture(path, sizes: dict[str, int], seed=0):
    """An alpaca mixture with a `domain` column: distinct rows, each domain its own words."""
    rng = np.random.default_rng(seed)
    rows = []
    for domain, count in sizes.items():
        words = [f"{domain[:3]}{k}" for k in range(30)]
        for i in range(count):
            response = " ".join(rng.choice(words, size=int(rng.integers(3, 12))))
            rows.append({"instruction": f"{domain} task {i}", "input": "", "output": response, "domain": domain})
    order = rng.permutation(len(rows))
    path.write_text("".join(json.dumps(rows[k]) + "\n" for k in order))
    return str(path)


# --- labels → groups --------------------------------------------------------------------------


def test_group_names_are_safe_columns_and_collisions_are_errors():
    groups = groups_from_labels(np.arange(4), np.array(["q&a", "web", "q&a", "code-py"]), "field domain")
    assert groups.names == ("code_py", "q_a", "web") and groups.mapping()["q_a"] == "q&a"
    np.testing.assert_array_equal(groups.codes_of([2, 0]), [1, 1])
    assert groups.code("q&a", "--pool-shares") == groups.code("q_a", "--pool-shares") == 1
    with pytest.raises(ValueError, match="--pool-shares: no group 'x'"):
        groups.code("x", "--pool-shares")
    with pytest.raises(ValueError, match="'a b' and 'a-b' both become the column name 'a_b'"):
        groups_from_labels(np.arange(2), np.array(["a b", "a-b"]), "field domain")
    with pytest.raises(ValueError, match="group 'macro' cannot name a column"):
        groups_from_labels(np.arange(2), np.array(["macro", "web"]), "field domain")
    assert column_name("日本 x") == "___x"


def test_group_field_is_read_per_file_and_a_missing_column_names_the_flag(tmp_path):
    from fishersft_ray.config import CorpusOptions, GroupOptions

    path = write_mixture(tmp_path / "mix.jsonl", {"web": 6, "code": 3})
    corpus = index_corpus(path, CorpusOptions(format="alpaca"))
    groups = corpus_groups(corpus, GroupOptions(group_field="domain"), lambda f, items: [f(**i) for i in items])
    assert groups.labels == ("code", "web") and groups.sizes(groups.codes) == {"code": 3, "web": 6}
    with pytest.raises(ValueError, match="--group-field topic: .*has no column 'topic'"):
        corpus_groups(corpus, GroupOptions(group_field="topic"), lambda f, items: [f(**i) for i in items])
    with pytest.raises(ValueError, match="--group-by-file: the input is one file"):
        corpus_groups(corpus, GroupOptions(group_by_file=True), None)


# --- the per-group split ----------------------------------------------------------------------


def test_split_by_group_draws_exact_quotas_without_leakage_and_respects_pool_shares():
    codes = np.repeat([0, 1, 2], [300, 40, 25])
    names = ("web", "code", "math")
    split = data.split_by_group(codes, names, test_per_group=10, validation_per_group=5, seed=1)
    assert np.bincount(codes[split.test]).tolist() == [10, 10, 10]
    assert np.bincount(codes[split.validation]).tolist() == [5, 5, 5]
    assert np.bincount(codes[split.pool]).tolist() == [285, 25, 10]  # the rest: the corpus's own proportions
    parts = [set(split.pool), set(split.validation), set(split.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert len(parts[0] | parts[1] | parts[2]) == len(codes)
    again = data.split_by_group(codes, names, test_per_group=10, validation_per_group=5, seed=1)
    np.testing.assert_array_equal(split.test, again.test)

    shares = np.array([0.5, 0.3, 0.2])
    shaped = data.split_by_group(codes, names, test_per_group=10, validation_per_group=5, seed=1,
                                 pool_shares=shares)
    counts = np.bincount(codes[shaped.pool], minlength=3)
    assert counts.tolist() == [25, 15, 10]  # math's 10 rows at 0.2 allow a pool of 50, no larger
    assert set(shaped.pool) <= set(split.pool) and set(shaped.test) == set(split.test)
    capped = data.split_by_group(codes, names, test_per_group=10, validation_per_group=5, seed=1, max_pool=40)
    assert np.bincount(codes[capped.pool]).tolist() == [36, 3, 1]  # 285:25:10 kept at 40 rows
    with pytest.raises(ValueError, match="group 'math' has 25 rows, fewer than --test-per-group 20"):
        data.split_by_group(codes, names, test_per_group=20, validation_per_group=6, seed=1)


def test_pool_shares_name_unknown_and_missing_groups():
    groups = groups_from_labels(np.arange(3), np.array(["web", "code", "math"]), "field domain")
    np.testing.assert_allclose(data.pool_share_vector(groups, {"web": 0.9, "code": 0.1}), [0.1, 0.0, 0.9])
    with pytest.raises(ValueError, match="--pool-shares: no group 'wiki'"):
        data.pool_share_vector(groups, {"wiki": 1.0})
    with pytest.raises(ValueError, match="sum to 0.95, not 1; groups without a share: math"):
        data.pool_share_vector(groups, {"web": 0.9, "code": 0.05})


def test_settings_check_the_group_flags():
    with pytest.raises(ValueError, match="pass --test-per-group K and --validation-per-group K"):
        EvaluateSettings.build(input="x", output="y", group_field="domain")
    with pytest.raises(ValueError, match="--test-per-group, --pool-shares need groups"):
        EvaluateSettings.build(input="x", output="y", test_per_group=3, pool_shares={"a": 1.0})
    with pytest.raises(ValueError, match="--methods balanced_tokens need groups"):
        EvaluateSettings.build(input="x", output="y", methods=["uniform", "balanced_tokens"])
    with pytest.raises(ValueError, match="--group-field and --group-by-file"):
        EvaluateSettings.build(input="x", output="y", group_field="d", group_by_file=True)
    with pytest.raises(ValueError, match="--method balanced .*--group-field NAME or --group-by-file"):
        SelectSettings.build(input="x", output="y", budget=3, method="balanced")


# --- per-group scores -------------------------------------------------------------------------


def test_protocol_scores_every_group_and_chooses_the_recipe_on_validation_macro_nll():
    corpus, teacher = synthetic_corpus(290, vocab=25)
    pool, validation, test = corpus.subset(range(200)), corpus.subset(range(200, 245)), corpus.subset(range(245, 290))
    codes = data.GroupCodes(("big", "small", "tiny"), np.repeat([0, 1, 2], [160, 30, 10]),
                            np.arange(45) % 3, np.arange(45) % 3)
    settings = small_settings(methods=["tokenod_tokens", "uniform", "balanced_tokens"], recipe_epochs=[1])
    weight = 0.3 * full_vocab_weight(teacher)
    result = protocol.run_protocol(pool, validation, test, weight, None, settings, RULES, group_codes=codes)
    group_columns = ["nll_macro", "nll_worst", "nll_big", "nll_small", "nll_tiny", "picks_big", "picks_small",
                     "picks_tiny"]
    for row in result["rows"]:
        assert list(row)[-len(group_columns):] == group_columns
        per_group = [row["nll_big"], row["nll_small"], row["nll_tiny"]]
        assert row["nll_macro"] == pytest.approx(np.mean(per_group)) and row["nll_worst"] == max(per_group)
        assert row["picks_big"] + row["picks_small"] + row["picks_tiny"] == row["examples"]
    # The pooled NLL is the per-token mean, as without groups.
    plain = protocol.run_protocol(pool, validation, test, weight, None, small_settings(
        methods=["uniform"], recipe_epochs=[1]), RULES)
    grouped = {(r["method"], r["budget"], r["seed"]): r["test_nll"] for r in result["rows"]}
    for row in plain["rows"]:
        assert grouped["uniform", row["budget"], row["seed"]] == pytest.approx(row["test_nll"], rel=1e-5)
    for entry in result["summary"]:
        for column in group_columns:
            assert f"{column}_mean" in entry and f"{column}_std" in entry
    tiny_picks = {method: np.mean([r["picks_tiny"] for r in result["rows"] if r["method"] == method and
                                   r["budget"] == 30]) for method in ("uniform", "balanced_tokens")}
    assert tiny_picks["balanced_tokens"] > 2 * tiny_picks["uniform"]  # the label-aware sample lifts the minority
    search = result["info"]["recipe_search"]
    best = min(search, key=lambda r: r["validation_nll_macro"])
    assert result["info"]["recipe"]["lr"] == best["lr"] and result["info"]["recipe_rule"] == "validation macro NLL"
    assert set(result["info"]["pretrained_test_groups"]) == {"nll_macro", "nll_worst", "nll_big", "nll_small",
                                                             "nll_tiny"}


# --- the commands -----------------------------------------------------------------------------


def test_evaluate_with_a_group_field_writes_per_group_columns(tmp_path, tiny_llama_dir):
    from fishersft_ray.cli import main

    mix = write_mixture(tmp_path / "mix.jsonl", {"web": 40, "code": 12, "q&a": 12})
    out = tmp_path / "out"
    argv = ["evaluate", "--input", mix, "--format", "alpaca", "--group-field", "domain", "--test-per-group", "4",
            "--validation-per-group", "3", "--budgets", "5,10", "--methods", "tokenod_tokens,uniform,balanced_tokens",
            "--seeds", "2", "--output", str(out), "--model", str(tiny_llama_dir), "--recipe-lrs", "1e-3",
            "--recipe-epochs", "1"]
    assert main(argv) == 0
    with open(out / "summary.csv") as handle:
        summary = list(csv.DictReader(handle))
    for column in ("nll_macro_mean", "nll_macro_std", "nll_worst_mean", "nll_web_mean", "nll_q_a_mean",
                   "picks_code_mean", "test_nll_mean"):
        assert column in summary[0], column
    with open(out / "results.csv") as handle:
        results = list(csv.DictReader(handle))
    assert len(results) == 2 * (1 + 2 + 2)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["groups"]["names"]["q_a"] == "q&a"
    assert settings["groups"]["sizes"]["code"] == {"corpus": 12, "pool": 5, "validation": 3, "test": 4}
    assert settings["groups"]["sizes"]["web"]["pool"] == 33
    assert "macro NLL | worst-group NLL" in (out / "summary.md").read_text()


def test_evaluate_group_by_file_and_pool_shares(tmp_path, tiny_llama_dir):
    from fishersft_ray.cli import main

    folder = tmp_path / "mix"
    folder.mkdir()
    write_mixture(folder / "web.jsonl", {"web": 30})
    write_mixture(folder / "code.jsonl", {"code": 15}, seed=1)
    out = tmp_path / "out"
    argv = ["evaluate", "--input", str(folder), "--format", "alpaca", "--group-by-file", "--test-per-group", "3",
            "--validation-per-group", "2", "--pool-shares", "web=0.8,code=0.2", "--budgets", "4", "--seeds", "1",
            "--methods", "uniform", "--output", str(out), "--model", str(tiny_llama_dir), "--recipe-lrs", "1e-3",
            "--recipe-epochs", "1"]
    assert main(argv) == 0
    sizes = json.loads((out / "settings.json").read_text())["groups"]["sizes"]
    assert {name: sizes[name]["pool"] for name in sizes} == {"web": 25, "code": 6}  # 25 web rows allow 31
    assert sizes["code"]["test"] == sizes["web"]["test"] == 3


def test_select_reports_group_shares_in_its_manifest(tmp_path, tiny_llama_dir):
    from fishersft_ray.cli import main
    from fishersft_ray.report import summary_table

    mix = write_mixture(tmp_path / "mix.jsonl", {"web": 30, "code": 6, "math": 6})
    for method, budget in (("tokenod", "8"), ("balanced", "120")):
        out = tmp_path / method
        assert main(["select", "--input", mix, "--format", "alpaca", "--output", str(out), "--budget", budget,
                     "--method", method, "--group-field", "domain", "--model", str(tiny_llama_dir),
                     "--executor", "local", "--features", str(tmp_path / "features")]
                    + (["--budget-unit", "tokens"] if method == "balanced" else [])) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        account = manifest["selection"]["groups"]
        assert account["source"] == "field domain" and set(account["per_group"]) == {"web", "code", "math"}
        groups = account["per_group"].values()
        assert sum(g["corpus_examples"] for g in groups) == 42
        assert sum(g["picked_examples"] for g in groups) == manifest["selection"]["selected"]
        assert sum(g["picked_tokens"] for g in groups) == manifest["selection"]["selected_target_tokens"]
        assert sum(g["corpus_tokens"] for g in groups) == manifest["corpus"]["target_tokens"]
        assert account["per_group"]["web"]["corpus_example_share"] == pytest.approx(30 / 42)
        assert sum(g["picked_token_share"] for g in groups) == pytest.approx(1)
        assert "group code" in summary_table(manifest)
    tokens = [g["picked_tokens"] for g in account["per_group"].values()]  # balanced: equal tokens per group
    assert max(tokens) - min(tokens) <= 2 * max(g["corpus_tokens"] for g in account["per_group"].values())


def test_group_account_counts_examples_and_tokens():
    from types import SimpleNamespace

    groups = groups_from_labels(np.array([3, 5, 8, 9]), np.array(["a", "b", "a", "a"]), "file")
    pool = SimpleNamespace(row_index=np.array([3, 5, 8, 9]), num_targets=np.array([10, 30, 20, 40]))
    account = group_account(groups, pool, np.array([9, 5]))["per_group"]
    assert account["a"] == {"label": "a", "corpus_examples": 3, "corpus_tokens": 70, "picked_examples": 1,
                            "picked_tokens": 40, "corpus_example_share": 0.75, "corpus_token_share": 0.7,
                            "picked_example_share": 0.5, "picked_token_share": 40 / 70}


def test_whole_model_example_losses_add_up_to_its_nll(tiny_llama_dir):
    from fishersft_ray.evaluate.model_tuning import ModelTuner, num_targets

    from test_model_tuning import sums

    tuner = ModelTuner(str(tiny_llama_dir), "full", micro_batch_tokens=64)  # several padded micro-batches
    encoded = tuner.encode(sums(5))
    losses = tuner.example_losses(encoded)
    assert losses.sum() / num_targets(encoded).sum() == pytest.approx(tuner.nll(encoded), rel=1e-5)
    alone = [tuner.nll([example]) * num_targets([example])[0] for example in encoded]
    np.testing.assert_allclose(losses, alone, rtol=1e-5)
