"""GPU figures: the featurizer and the selection on one GPU, measured against the hardware.

Models are real architectures' configs with random bf16 weights (throughput does not depend
on the weights; no pretrained weights of these sizes can be brought to a lent GPU here):
SmolLM2-135M, a Llama-3.2-1B-shaped and a Llama-3.1-8B-shaped model, fed real GSM8K rows
tokenised with SmolLM2's tokenizer.

    python benchmarks/bench_gpu.py --tokenizer .bench/smollm2-tokenizer                 # on a GPU
    python benchmarks/bench_gpu.py --tokenizer .bench/smollm2-tokenizer --device cpu \\
        --sizes tiny --rows 48 --sweep-rows 24 --select-sizes 64:400:20                 # CPU toy

Sections (each prints a table; the last lines summarise):
  peak       a large bf16 matrix product: the card's measured matrix ceiling
  featurize  per model: the whole Featurizer call vs the bare base-model forward vs the naive
             `output_hidden_states` path of the causal LM, over the same length-sorted
             micro-batches; real target tokens/s, padding, the Featurizer's own seconds per
             phase (tokenize, pad, forward, gather+host copy, factor rule, table)
  mfu        per model: bare-forward throughput per micro-batch token budget, model FLOP
             utilisation 2·N·tokens/s against the measured and the datasheet bf16 peak
  storage    the storage rule (features.factor_from_rows: spectra of X Xᵀ, eigen factors
             past d) on GSM8K-like lengths at d = 576, 2048, 4096: numpy per example, numpy
             on a thread pool, and batched float64 / float32 eigvalsh on the GPU
  select     select(device="cuda") vs CPU on the same synthetic instances (d = 64, 576, 2048;
             examples and token budgets): picks equal, wall ratio, evaluations/s, the share of
             GPU wall time in kernels (torch profiler) and lazy batch sizes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from bench_select import synthetic_feature_set  # noqa: E402

from fishersft_ray.config import CorpusOptions, FeaturizeConfig  # noqa: E402
from fishersft_ray.featurize.backends import BACKENDS  # noqa: E402
from fishersft_ray.featurize.featurizer import Featurizer  # noqa: E402
from fishersft_ray.featurize.model_ref import ModelRef  # noqa: E402
from fishersft_ray.io.corpus import read_corpus  # noqa: E402
from fishersft_ray.run.feature_cache import plan_forward_units  # noqa: E402
from fishersft_ray.select import select  # noqa: E402

DEFAULT_CORPUS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_train_alpaca.json"
DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4}  # dense, SXM
GPU_ROWS_PER_UNIT = 128

# Real architectures' shapes (from their published config.json files).
ARCHITECTURES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True,
                         max_position_embeddings=8192),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0,
                     tie_word_embeddings=True, max_position_embeddings=131072),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False,
                     max_position_embeddings=131072),
}


class RandomWeights:
    """A model backend (``backend="random"`` in featurize/backends.BACKENDS) that builds the
    architecture the reference names with random weights directly on the device; the
    reference's source is the tokenizer's directory, one tokenizer for every size. Keeps the
    causal LM (``causal``) for the naive hidden-states path."""

    def __init__(self):
        self.causal = None

    def load(self, model_ref, *, device, dtype, with_head):
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

        config = LlamaConfig(**ARCHITECTURES[model_ref.name], rms_norm_eps=1e-5)
        torch.manual_seed(0)
        with torch.device(device):
            self.causal = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
        head = self.causal.get_output_embeddings() if with_head else None
        return AutoTokenizer.from_pretrained(model_ref.source), self.causal.model, head, config


BACKENDS["random"] = RandomWeights


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def matmul_peak(device: str) -> float:
    """Measured bf16 (CPU: fp32) matrix-product TFLOP/s, median of 10 after warm-up."""
    n = 8192 if device == "cuda" else 1024
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = [timed(lambda: a @ b, device) for _ in range(10)]
    return 2 * n ** 3 / float(np.median(times)) / 1e12


def micro_batch_tensors(featurizer: Featurizer, planned: pa.Table) -> list[tuple]:
    """The featurizer's own micro-batches of ``planned`` (per forward unit), padded, on device."""
    return [tuple(torch.from_numpy(a).to(featurizer.device) for a in (batch.input_ids, batch.attention_mask,
                                                                       batch.position_ids))
            for batch in featurizer.padded_batches(featurizer.encoded(planned)[0])]


def forward_seconds(model, batches, device: str, hidden_states: bool = False) -> float:
    def run():
        with torch.inference_mode():
            for input_ids, attention_mask, position_ids in batches:
                if hidden_states:
                    model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False, output_hidden_states=True).hidden_states[-1]
                else:
                    model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
    run()  # warm-up: kernels, allocator
    return timed(run, device)


def non_embedding_parameters(model) -> int:
    embedding = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - embedding


def bench_featurize(name: str, args, examples: pa.Table, peak: float, datasheet: float | None) -> dict:
    # RandomWeights reads the architecture's name and the tokenizer's directory from the
    # reference: it never calls local_path().
    ref = ModelRef(source=args.tokenizer, kind="local", fingerprint=f"random-{name}", name=name)
    config = FeaturizeConfig(model=ref, backend="random", device=args.device,
                             micro_batch_tokens=args.micro_batch_tokens, rows_per_unit=GPU_ROWS_PER_UNIT)
    featurizer = Featurizer(config)
    planned = plan_forward_units(examples, GPU_ROWS_PER_UNIT)
    featurizer(planned.slice(0, GPU_ROWS_PER_UNIT))  # warm-up
    featurizer.real_tokens = featurizer.padded_tokens = 0
    table = None

    def run():
        nonlocal table
        table = featurizer(planned)
    featurize_s = timed(run, args.device)  # as an actor runs it: device work overlaps host work
    input_tokens, padding = featurizer.real_tokens, featurizer.padding_fraction
    # Again with the device synchronised at every phase boundary: each phase's own cost.
    featurizer.profile, featurizer.seconds = True, dict.fromkeys(featurizer.seconds, 0.0)
    profiled_s = timed(run, args.device)
    featurizer.profile = False
    targets = int(np.sum(table.column("num_targets").to_numpy()))
    batches = micro_batch_tensors(featurizer, planned)
    bare_s = forward_seconds(featurizer.model, batches, args.device)
    naive_s = forward_seconds(featurizer.backend.causal, batches, args.device, hidden_states=True)
    params = non_embedding_parameters(featurizer.model)
    row = {"model": name, "d": featurizer.dim, "params_non_embedding": params, "rows": planned.num_rows,
           "input_tokens": input_tokens, "target_tokens": targets,
           "padding": round(padding, 4), "micro_batches": len(batches),
           "featurize_s": featurize_s, "bare_forward_s": bare_s, "naive_hidden_states_s": naive_s,
           "featurize_target_tok_s": targets / featurize_s, "bare_target_tok_s": targets / bare_s,
           "naive_target_tok_s": targets / naive_s, "featurize_over_bare": bare_s / featurize_s,
           "profiled_s": profiled_s, "phase_seconds": {k: round(v, 4) for k, v in featurizer.seconds.items()},
           "outside_forward_share": 1 - featurizer.seconds["forward"] / profiled_s}
    # Micro-batch token budgets: the bare forward on a slice of the rows, re-cut per budget.
    sweep = []
    sample = planned.slice(0, args.sweep_rows)
    for budget in args.sweep:
        featurizer.tokenize.config = dataclasses.replace(featurizer.config, micro_batch_tokens=budget)
        batches = micro_batch_tensors(featurizer, sample)
        real = int(sum(int(mask.sum()) for _, mask, _ in batches))
        padded = int(sum(mask.numel() for _, mask, _ in batches))
        seconds = forward_seconds(featurizer.model, batches, args.device)
        achieved = 2 * params * padded / seconds / 1e12
        sweep.append({"micro_batch_tokens": budget, "real_tok_s": real / seconds, "padded_tok_s": padded / seconds,
                      "model_tflops": achieved, "mfu_measured_peak": achieved / peak,
                      "mfu_datasheet": achieved / datasheet if datasheet else None})
    row["sweep"] = sweep
    del featurizer
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return row


def kernel_share(features, budget, budget_unit, batch_size) -> tuple[float, float]:
    """(wall seconds, share of it in CUDA kernels) of one GPU selection, by the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        select(features, budget, budget_unit=budget_unit, device="cuda", batch_size=batch_size)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernel_us = sum(event.self_device_time_total for event in prof.key_averages()
                    if event.device_type == torch.autograd.DeviceType.CUDA)
    return wall, kernel_us / 1e6 / wall


def storage_rule_batched(rows: list[torch.Tensor], dtype) -> list[np.ndarray]:
    """Spectra of X Xᵀ for many examples (all m ≤ d) at once: zero-padded to a common
    length (padding adds zero eigenvalues only), eigvalsh batched on the device."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    spectra = [None] * len(rows)
    d = rows[0].shape[1]
    start = 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and (stop - start + 1) * len(rows[order[stop]]) * d <= 1 << 25:
            stop += 1
        chunk = order[start:stop]
        width = len(rows[chunk[-1]])
        padded = torch.zeros(len(chunk), width, d, dtype=dtype, device=rows[0].device)
        for b, i in enumerate(chunk):
            padded[b, :len(rows[i])] = rows[i]
        values = torch.linalg.eigvalsh(padded @ padded.mT).flip(-1).clamp_min(0).cpu().numpy()
        for b, i in enumerate(chunk):
            spectra[i] = values[b, :len(rows[i])].astype(np.float32)
        start = stop
    return spectra


def bench_storage(args) -> list[dict]:
    from concurrent.futures import ThreadPoolExecutor

    from fishersft_ray.features import factor_from_rows

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(110), 0.5, size=args.storage_examples).astype(int), 2, 500)
    rows_out = []
    for d in (576, 2048, 4096):
        host = [rng.standard_normal((m, d), dtype=np.float32) for m in lengths]
        row = {"d": d, "examples": len(host), "mean_m": float(lengths.mean())}
        start = time.perf_counter()
        reference = [factor_from_rows(X)[1] for X in host]
        row["numpy_s"] = time.perf_counter() - start
        with ThreadPoolExecutor(args.storage_threads) as pool:
            start = time.perf_counter()
            list(pool.map(lambda X: factor_from_rows(X)[1], host))
            row[f"numpy_{args.storage_threads}threads_s"] = time.perf_counter() - start
        if args.device == "cuda":
            device_rows = [torch.from_numpy(X).to("cuda") for X in host]
            for name, dtype in (("fp64", torch.float64), ("fp32", torch.float32)):
                storage_rule_batched(device_rows[:8], dtype)  # warm-up
                torch.cuda.synchronize()
                start = time.perf_counter()
                spectra = storage_rule_batched(device_rows, dtype)
                row[f"gpu_{name}_s"] = time.perf_counter() - start
                row[f"gpu_{name}_max_rel_err"] = max(float(np.max(np.abs(a - b)) / max(np.max(b), 1e-30))
                                                    for a, b in zip(spectra, reference))
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    return rows_out


def bench_select(args) -> list[dict]:
    rows = []
    for spec in args.select_sizes.split(","):
        d, n, budget = (int(v) for v in spec.split(":"))
        features = synthetic_feature_set(n, d, seed=d)
        for unit in ("examples", "tokens"):
            picks = budget if unit == "examples" else int(budget * features.num_targets.mean())
            start = time.perf_counter()
            cpu = select(features, picks, budget_unit=unit, device="cpu")
            cpu_s = time.perf_counter() - start
            row = {"d": d, "N": n, "budget": picks, "unit": unit, "cpu_s": cpu_s,
                   "cpu_evals_s": cpu.evaluations / cpu_s, "evaluations": cpu.evaluations}
            if args.device == "cuda":
                for batch_size in (None, 512):
                    select(features, picks, budget_unit=unit, device="cuda", batch_size=batch_size)  # warm
                    start = time.perf_counter()
                    gpu = select(features, picks, budget_unit=unit, device="cuda", batch_size=batch_size)
                    torch.cuda.synchronize()
                    gpu_s = time.perf_counter() - start
                    key = "adaptive" if batch_size is None else str(batch_size)
                    row[f"gpu_s[{key}]"] = gpu_s
                    row[f"gpu_evals[{key}]"] = gpu.evaluations
                    row[f"picks_equal[{key}]"] = bool(np.array_equal(gpu.indices, cpu.indices))
                row["cpu_over_gpu"] = cpu_s / row["gpu_s[adaptive]"]
                _, row["gpu_kernel_share"] = kernel_share(features, picks, unit, None)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def save(results: dict, path: str | None) -> None:
    """Write what is measured so far (a run cut short keeps its finished sections)."""
    if path:
        pathlib.Path(path).write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="a tokenizer directory (SmolLM2's: see RESULTS.md)")
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="smollm2-135m,llama-1b,llama-8b")
    parser.add_argument("--rows", type=int, default=2048, help="GSM8K rows featurized per model")
    parser.add_argument("--micro-batch-tokens", type=int, default=8192)
    parser.add_argument("--sweep", default="2048,4096,8192,16384,32768,65536")
    parser.add_argument("--sweep-rows", type=int, default=1024)
    parser.add_argument("--select-sizes", default="64:4000:100,576:1500:50,2048:600:30",
                        help="selection instances d:N:budget (examples; the token budget is budget × mean length)")
    parser.add_argument("--storage-examples", type=int, default=256)
    parser.add_argument("--storage-threads", type=int, default=16)
    parser.add_argument("--sections", default="featurize,storage,select")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    args.sweep = [int(v) for v in args.sweep.split(",") if v]
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    peak = matmul_peak(args.device)
    datasheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in results["device"]), None)
    results["peak_tflops_measured"] = peak
    print(f"peak: {results['device']} matrix product {peak:.1f} TFLOP/s measured"
          + (f", datasheet {datasheet}" if datasheet else ""), flush=True)
    sections = args.sections.split(",")
    if "featurize" in sections:
        corpus = read_corpus(args.corpus, CorpusOptions(format="alpaca"))
        examples = corpus.examples.slice(0, args.rows)
        results["featurize"] = []
        for name in args.sizes.split(","):
            row = bench_featurize(name, args, examples, peak, datasheet)
            results["featurize"].append(row)
            print(json.dumps(row), flush=True)
            save(results, args.out)
    if "storage" in sections:
        results["storage"] = bench_storage(args)
        save(results, args.out)
    if "select" in sections:
        results["select"] = bench_select(args)
        save(results, args.out)
    for row in results.get("featurize", []):
        best = max(row["sweep"], key=lambda r: r["padded_tok_s"]) if row["sweep"] else None
        print(f"featurize model={row['model']} d={row['d']} target_tok_s={row['featurize_target_tok_s']:.0f} "
              f"bare_target_tok_s={row['bare_target_tok_s']:.0f} naive_target_tok_s={row['naive_target_tok_s']:.0f} "
              f"featurize_over_bare={row['featurize_over_bare']:.3f} padding={row['padding']:.3f} "
              f"outside_forward={row['outside_forward_share']:.3f}"
              + (f" best_micro_batch_tokens={best['micro_batch_tokens']} mfu_measured_peak={best['mfu_measured_peak']:.3f}"
                 if best else ""))
    for row in results.get("storage", []):
        print("storage " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    for row in results.get("select", []):
        print("select " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
