"""CUDA paths, marked `gpu` (skipped cleanly without a GPU): the featurizer's bf16 forward,
the selection engine on the GPU, and whole-model fine-tuning under bf16 autocast.

They need neither Ray nor the offline model wheel, so they also run on a bare GPU machine:
`python -m pytest -m gpu tests/test_gpu.py`.
"""

import numpy as np
import pyarrow as pa
import pytest
import torch

from fishersft_ray.config import FeaturizeConfig
from fishersft_ray.features import FeatureSet
from fishersft_ray.featurize.featurizer import Featurizer
from fishersft_ray.io.corpus import MESSAGES_TYPE
from fishersft_ray.select import SelectionRequest, run_method, select

pytestmark = pytest.mark.gpu

TEXTS = ["First Citizen:\nBefore we proceed any further, hear me speak.",
         "All:\nSpeak, speak. You are all resolved rather to die than to famish?",
         "Natalia sold clips to 48 of her friends in April, and then half as many in May.",
         "hello", "How many clips did Natalia sell altogether? The answer is 72. " * 4]


def _examples(texts):
    messages = [[{"role": "document", "content": text, "train": True}] for text in texts]
    return pa.table({"row_index": pa.array(range(len(texts)), pa.int64()), "id": [str(i) for i in range(len(texts))],
                     "messages": pa.array(messages, MESSAGES_TYPE)})


def test_featurizer_bf16_on_cuda_matches_fp32_on_cpu(tiny_models):
    examples = _examples(TEXTS * 3)
    cpu = Featurizer(FeaturizeConfig(model=tiny_models["llama"], device="cpu"))
    cuda = Featurizer(FeaturizeConfig(model=tiny_models["llama"], device="cuda"))
    assert next(cuda.model.parameters()).dtype == torch.bfloat16 and cuda.device.type == "cuda"
    reference, on_gpu = FeatureSet.from_table(cpu(examples)), FeatureSet.from_table(cuda(examples))
    np.testing.assert_array_equal(on_gpu.num_targets, reference.num_targets)
    for i in range(reference.n):
        expected = reference.factor(i).T @ reference.factor(i)
        got = on_gpu.factor(i).T @ on_gpu.factor(i)
        # bf16 activations: a few parts in a thousand of the matrix's scale
        assert np.linalg.norm(got - expected) <= 2e-2 * np.linalg.norm(expected)
    assert cuda.seconds["forward"] > 0 and cuda.padding_fraction >= 0


@pytest.mark.parametrize("max_rank", [None, 3])
def test_storage_rule_on_the_gpu_matches_numpy(max_rank):
    from fishersft_ray.features import factor_from_rows, store_examples

    rng = np.random.default_rng(0)
    d = 12
    rows = [rng.standard_normal((m, d)).astype(np.float32) for m in (0, 1, 5, 5, 11, 12, 13, 40)]
    rows.append(np.outer(rng.standard_normal(20), rng.standard_normal(d)).astype(np.float32))  # rank one, m > d
    stored = store_examples(torch.from_numpy(np.concatenate(rows)).cuda(), [len(X) for X in rows], max_rank)
    for i, X in enumerate(rows):
        F_ref, w_ref = factor_from_rows(X, max_rank)
        rank = slice(stored.offsets[i], stored.offsets[i + 1])
        F, w = stored.factors[rank].cpu().numpy().astype(np.float64), stored.spectrum[rank].cpu().numpy()
        assert F.shape == F_ref.shape and w.shape == w_ref.shape
        np.testing.assert_allclose(w, w_ref, rtol=1e-4, atol=1e-4 * max(1.0, float(w_ref.max(initial=0))))
        np.testing.assert_allclose(F.T @ F, F_ref.T.astype(np.float64) @ F_ref, rtol=1e-4, atol=1e-3)


def _instance(seed, n, d):
    rng = np.random.default_rng(seed)
    return FeatureSet.from_examples([rng.normal(scale=rng.lognormal(0, 0.5), size=(m, d))
                                     for m in rng.integers(1, 3 * d, size=n)])


@pytest.mark.parametrize("budget_unit", ["examples", "tokens"])
@pytest.mark.parametrize("d", [16, 96])
def test_select_on_cuda_picks_what_the_cpu_picks(budget_unit, d):
    features = _instance(d, 300, d)
    budget = 20 if budget_unit == "examples" else int(20 * features.num_targets.mean())
    cpu = select(features, budget, budget_unit=budget_unit, device="cpu")
    cuda = select(features, budget, budget_unit=budget_unit, device="cuda")
    np.testing.assert_array_equal(cuda.indices, cpu.indices)
    np.testing.assert_allclose(cuda.objective, cpu.objective, rtol=1e-9)
    assert cuda.upper_bound == pytest.approx(cpu.upper_bound, rel=1e-6)
    vopt_cpu = run_method("vopt", features, SelectionRequest(10, budget_unit="examples", device="cpu"))
    vopt_cuda = run_method("vopt", features, SelectionRequest(10, budget_unit="examples", device="cuda"))
    np.testing.assert_array_equal(vopt_cuda.indices, vopt_cpu.indices)


def test_whole_model_finetuning_under_bf16_autocast(tiny_llama_dir):
    from fishersft_ray.evaluate.model_tuning import ModelRecipe, ModelTuner

    tuner = ModelTuner(str(tiny_llama_dir), "lora", device="cuda")
    examples = [[{"role": "user", "content": f"What is {a} plus {a}?", "train": False},
                 {"role": "assistant", "content": f"{a} plus {a} is {2 * a}.", "train": True}] for a in range(12)]
    encoded = tuner.encode(examples)
    before = tuner.nll(encoded)
    # On the CPU in float32 this recipe takes the NLL from 5.738 to 5.367 (lr 3e-2 overshoots
    # on this data there too: 5.764, and under bf16 autocast on an H100: 5.744).
    tuner.finetune(encoded, ModelRecipe(lr=1e-2, epochs=3, batch_tokens=256))
    assert tuner.nll(encoded) < before - 0.1
