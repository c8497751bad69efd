"""Whole-model fine-tuning (`evaluate --mode full|lora`) on the tiny random Llama."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fishersft_ray.cli import main
from fishersft_ray.config import EvaluateRules, Protocol
from fishersft_ray.evaluate import model_tuning
from fishersft_ray.evaluate.methods import EVAL_METHODS
from fishersft_ray.evaluate.model_tuning import IGNORE_INDEX, ModelRecipe, ModelTuner, tokenise
from fishersft_ray.evaluate.protocol import run_protocol
from fishersft_ray.features import TokenStates
from fishersft_ray.featurize.masks import encode_with_targets

# The tiny model's ops are too small to share: on a loaded 2-core box two threads made this
# file ~4x slower than one (measured 115 s vs 30 s).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sums(count, start=0):
    """Prompt/response pairs in the normalised messages form."""
    return [[{"role": "user", "content": f"What is {a} plus {a + 3}?", "train": False},
             {"role": "assistant", "content": f"{a} plus {a + 3} is {2 * a + 3}.", "train": True}]
            for a in range(start, start + count)]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_labels_are_the_featurizer_targets_and_prompts_are_masked(tokenizer):
    example = sums(1)[0]
    ids, targets = encode_with_targets(tokenizer, example)
    input_ids, labels = tokenise(tokenizer, example, max_length=512)
    np.testing.assert_array_equal(input_ids, ids)
    np.testing.assert_array_equal(labels != IGNORE_INDEX, targets)
    np.testing.assert_array_equal(labels[targets], ids[targets])
    assert 0 < targets.sum() < len(ids)
    prompt, response = example[0]["content"], example[1]["content"]
    assert prompt not in tokenizer.decode(ids[targets])
    assert response in tokenizer.decode(ids[targets])
    assert prompt in tokenizer.decode(ids[:np.argmax(targets)])  # the prompt is all -100
    cut_ids, cut_labels = tokenise(tokenizer, example, max_length=len(ids) - 3)
    np.testing.assert_array_equal(cut_labels, labels[:len(ids) - 3])
    document = [{"role": "document", "content": "To be, or not to be", "train": True}]
    _, text_labels = tokenise(tokenizer, document, max_length=512)
    assert text_labels[0] == IGNORE_INDEX and (text_labels[1:] != IGNORE_INDEX).all()


def test_nll_matches_a_hand_computation_across_padded_micro_batches(tiny_llama_dir):
    tuner = ModelTuner(str(tiny_llama_dir), "full", micro_batch_tokens=64)  # several padded micro-batches
    why = [{"role": "user", "content": "Why?", "train": False},
           {"role": "assistant", "content": "Because the sum of two odd numbers is always even, as shown above.",
            "train": True}]
    encoded = tuner.encode(sums(3) + [why])
    assert len({len(ids) for ids, _ in encoded}) > 1
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in encoded:
            logits = model(torch.from_numpy(ids)[None]).logits[0]
            predicted = np.flatnonzero(labels[1:] != IGNORE_INDEX)  # position t predicts token t+1
            total += float(torch.nn.functional.cross_entropy(
                logits[predicted], torch.from_numpy(ids[predicted + 1]), reduction="sum"))
            count += len(predicted)
    assert tuner.nll(encoded) == pytest.approx(total / count, rel=1e-5)


def test_full_finetuning_lowers_nll_and_restarts_from_the_pretrained_model(tiny_llama_dir):
    tuner = ModelTuner(str(tiny_llama_dir), "full")
    encoded = tuner.encode(sums(4) * 3)
    pretrained = tuner.nll(encoded)
    recipe = ModelRecipe(lr=1e-2, epochs=3, batch_tokens=256)
    tuner.finetune(encoded, recipe)
    tuned = tuner.nll(encoded)
    assert tuned < pretrained - 1.0
    tuner.finetune(encoded, recipe)  # a fresh start with the same seed: the same model again
    assert tuner.nll(encoded) == tuned
    tuner.reset()
    assert tuner.nll(encoded) == pretrained
    with pytest.raises(ValueError, match="no target tokens"):
        tuner.finetune([(ids, np.full_like(ids, IGNORE_INDEX)) for ids, _ in encoded], recipe)


def test_lora_trains_only_the_adapters_and_lowers_nll(tiny_llama_dir):
    tuner = ModelTuner(str(tiny_llama_dir), "lora")
    names = {name for name, p in tuner.model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in name for name in names)
    for projection in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(projection in name for name in names), projection
    before = {name: p.detach().clone() for name, p in tuner.model.named_parameters()}
    encoded = tuner.encode(sums(4) * 3)
    pretrained = tuner.nll(encoded)
    tuner.finetune(encoded, ModelRecipe(lr=3e-2, epochs=3, batch_tokens=256))
    assert tuner.nll(encoded) < pretrained - 0.1
    after = dict(tuner.model.named_parameters())
    for name, value in before.items():
        if name in names:
            continue
        assert torch.equal(after[name], value), f"base weight {name} changed"
    assert any(not torch.equal(after[name], before[name]) for name in names if "lora_B" in name)


def test_clear_errors_for_missing_peft_and_an_empty_pool(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "peft" else real_find_spec(name))
    with pytest.raises(RuntimeError, match="pip install"):
        model_tuning.require_peft()
    # A usage error before any work (exit 2, one line), not a traceback.
    assert main(["evaluate", "--input", "x.json", "--output", "out", "--mode", "lora"]) == 2
    empty = TokenStates(np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(1, np.int64),
                        np.zeros(0, np.int64))
    some = TokenStates(np.ones((2, 4), np.float32), np.array([5, 6]), np.array([0, 2]), np.array([7]))
    with pytest.raises(ValueError, match="pool split has no example"):
        run_protocol(empty, some, some, np.ones((10, 4), np.float32), None,
                     Protocol(budgets=[1], recipe_lrs=[1e-3], recipe_epochs=[1]), EvaluateRules())


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_evaluate_in_whole_model_mode_end_to_end(mode, tiny_llama_dir, tmp_path, monkeypatch):
    corpus = tmp_path / "sums.json"
    corpus.write_text(json.dumps([{"instruction": r[0]["content"], "input": "", "output": r[1]["content"]}
                                  for r in sums(40)]))
    recipes = []
    real_finetune = ModelTuner.finetune

    def recording_finetune(self, encoded, recipe):
        recipes.append(recipe)
        return real_finetune(self, encoded, recipe)

    monkeypatch.setattr(ModelTuner, "finetune", recording_finetune)
    output = tmp_path / "out"
    assert main(["evaluate", "--input", str(corpus), "--output", str(output), "--model", str(tiny_llama_dir),
                          "--mode", mode, "--train-device", "cpu", "--budgets", "4,8", "--seeds", "2",
                          "--methods", "tokenod,uniform", "--validation-size", "6", "--test-fraction", "0.2",
                          "--recipe-lrs", "3e-3,3e-2", "--batch-tokens", "256"]) == 0
    info = json.loads((output / "settings.json").read_text())
    assert info["mode"] == mode and info["tuned"] == "model" and "full vocabulary" in info["softmax"]
    assert info["train_device"] == "cpu" and info["settings"]["recipe_epochs"] == [1.0]
    assert (info["trainable_parameters"] < info["total_parameters"]) == (mode == "lora")
    method_runs = recipes[len(info["recipe_search"]) * 2:]  # two budgets per recipe candidate
    assert len(method_runs) == 2 + 2 * 2  # tokenod at 4 and 8, uniform at 4 and 8 with 2 seeds
    assert set(method_runs) == {ModelRecipe(**info["recipe"])}
    summary = (output / "summary.md").read_text()
    assert f"pretrained model NLL {info['pretrained_test_nll']:.4f}" in summary
    for method in ("tokenod", "uniform"):
        for n in (4, 8):
            assert f"| {n} | {EVAL_METHODS[method].label} |" in summary
    assert not info["void"] and info["pretrained_test_nll"] > 5  # a random model, then trained
