"""Rows that featurize to nothing or to too much (issue 28): prompts longer than --max-length,
chat templates that reject a row, huge rows, and the feature-size estimate on CJK text. Real
tiny models and tokenizers (conftest.py), real files, no mocks."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer, LlamaConfig

from conftest import build_tokenizer, save_tiny_model
from fishersft_ray.config import FeaturizeConfig, SelectSettings
from fishersft_ray.features import FeatureSet, estimate_feature_bytes
from fishersft_ray.featurize.featurizer import Featurizer
from fishersft_ray.featurize.masks import encode_with_targets
from fishersft_ray.io.corpus import read_corpus
from fishersft_ray.run import driver_store
from fishersft_ray.run.job import run_select

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Mistral/Gemma-style: roles must alternate user/assistant, else the template raises.
ALTERNATING = ("{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
               "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def select(tmp_path, corpus, model, name, **options):
    return run_select(SelectSettings.build(input=corpus, output=str(tmp_path / name), model=str(model),
                                           features=str(tmp_path / "features"), executor="local", **options))


def test_a_prompt_longer_than_max_length_is_counted_and_never_picked(tiny_llama_dir, tmp_path):
    rows = [{"instruction": f"question {k}: hear me speak", "output": f"answer {k}: speak, speak"} for k in range(6)]
    rows[2]["instruction"] = "Before we proceed any further, hear me speak. " * 20  # far past 48 tokens
    corpus = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    for method, partitions in (("tokenod", 1), ("uniform", 1), ("density", 1), ("longest_first", 1),
                               ("tokenod", 2)):
        result = select(tmp_path, corpus, tiny_llama_dir, f"{method}-{partitions}", budget=len(rows),
                        max_length=48, method=method, partitions=partitions)
        picked = pq.read_table(tmp_path / f"{method}-{partitions}" / "subset.parquet").column("row_index")
        assert sorted(picked.to_pylist()) == [0, 1, 3, 4, 5], (method, partitions)
        counts = result.manifest["corpus"]
        assert counts["skipped"]["no_target_tokens"] == 1 and counts["kept"] == 5
        assert counts["rows_read"] == counts["kept"] + sum(counts["skipped"].values())


@pytest.fixture(scope="module")
def alternating_model(tmp_path_factory):
    tokenizer = build_tokenizer(ALTERNATING)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    return save_tiny_model(tmp_path_factory.mktemp("alternating"), config, tokenizer)


def chat_corpus(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"what is {k} plus {k}"},
                          {"role": "assistant", "content": f"it is {2 * k}"}], "id": f"q{k}"} for k in range(4)]
    rows[2]["messages"].insert(1, {"role": "user", "content": "and again?"})  # user, user, assistant
    return write_jsonl(tmp_path / "chat.jsonl", rows)


def test_a_chat_template_that_rejects_a_row_names_it_or_skips_it(alternating_model, tmp_path):
    corpus = chat_corpus(tmp_path)
    with pytest.raises(ValueError) as error:
        select(tmp_path, corpus, alternating_model, "strict", budget=4, id_field="id")
    message = str(error.value)
    assert "\n" not in message and "row_index 2" in message and "'q2'" in message
    assert "Conversation roles must alternate" in message and "--on-bad-row skip" in message
    result = select(tmp_path, corpus, alternating_model, "lenient", budget=4, id_field="id", on_bad_row="skip")
    assert result.manifest["features"]["reused"]  # the failed run's shards serve the rerun
    assert sorted(pq.read_table(tmp_path / "lenient" / "subset.parquet").column("id").to_pylist()) == ["q0", "q1", "q3"]
    counts = result.manifest["corpus"]
    assert counts["skipped"]["chat_template"] == 1 and counts["skipped"]["no_target_tokens"] == 0
    assert counts["rows_read"] == counts["kept"] + sum(counts["skipped"].values())


def test_shards_say_why_a_row_has_no_features_and_old_shards_still_load(alternating_model, tmp_path):
    corpus = read_corpus(chat_corpus(tmp_path))
    table = Featurizer(FeaturizeConfig(model=alternating_model, device="cpu"))(corpus.examples)
    reasons = table.column("skip_reason").to_pylist()
    assert reasons[2].startswith("chat_template: Conversation roles must alternate")
    assert reasons[:2] + reasons[3:] == [None] * 3
    assert table.column("num_targets").to_pylist()[2] == 0
    pq.write_table(table, tmp_path / "new.parquet")
    pq.write_table(table.drop_columns(["skip_reason"]), tmp_path / "old.parquet")
    new, old = FeatureSet.load(str(tmp_path / "new.parquet")), FeatureSet.load(str(tmp_path / "old.parquet"))
    np.testing.assert_array_equal(new.factors, old.factors)
    np.testing.assert_array_equal(FeatureSet.from_table(table).num_targets, new.num_targets)


@pytest.mark.parametrize("kind", ["document", "alpaca", "chat"])
def test_a_huge_row_is_cut_before_tokenising_to_the_same_window(tiny_models, kind):
    model = tiny_models["llama_no_template" if kind == "alpaca" else "llama"]
    featurizer = Featurizer(FeaturizeConfig(model=model, device="cpu", max_length=40))
    tokenizer = featurizer.tokenizer
    long_text = "Natalia sold clips to 48 of her friends in April. " * 400
    messages = {"document": [{"role": "document", "content": "  \n" + long_text, "train": True}],
                "alpaca": [{"role": "user", "content": "say it", "train": False},
                           {"role": "assistant", "content": long_text, "train": True}],
                "chat": [{"role": "user", "content": "hello " * 3, "train": False},
                         {"role": "assistant", "content": "four", "train": True},
                         {"role": "user", "content": long_text, "train": False},
                         {"role": "assistant", "content": long_text, "train": True}]}[kind]
    ids, targets = encode_with_targets(tokenizer, messages)
    cut_ids, cut_targets = featurizer.tokenize.encode_row(messages)[0]
    assert len(cut_ids) < len(ids) / 4  # the text was cut
    np.testing.assert_array_equal(cut_ids[:40], ids[:40])
    np.testing.assert_array_equal(cut_targets[:40], targets[:40])


def test_the_feature_estimate_covers_cjk_text(tiny_llama_dir, tmp_path):
    rng = np.random.default_rng(0)
    hanzi = [chr(c) for c in range(0x4E00, 0x4E00 + 500)]
    rows = [{"text": "".join(rng.choice(hanzi, size=int(rng.integers(5, 60))))} for _ in range(80)]
    result = select(tmp_path, write_jsonl(tmp_path / "cjk.jsonl", rows), tiny_llama_dir, "cjk", budget=3)
    features = result.manifest["features"]
    assert features["estimate"]["bytes"] >= features["driver"]["shard_bytes"]
    assert "tokenizer" in features["estimate"]["rule"]
