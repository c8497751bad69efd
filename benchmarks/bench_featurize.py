"""Featurizer throughput on tinyshakespeare with the offline SmolLM2-135M (or --model).

Three timings over the SAME length-sorted micro-batches:
  featurize  the whole Featurizer call (tokenise + masks + forward + gather + factors)
  bare       the base model's forward alone on the pre-padded micro-batches
  naive      AutoModelForCausalLM(..., output_hidden_states=True): the full LM head too
Tokens/s counts real (unpadded) tokens. Ends with
`featurize_vs_bare: <ratio> featurize_vs_naive: <ratio> padding: <fraction>`.
"""

import argparse
import pathlib
import time

import torch
from transformers import AutoModelForCausalLM

from fishersft_ray.config import FeaturizeConfig
from fishersft_ray.featurize.featurizer import Featurizer
from fishersft_ray.io.corpus import read_corpus

DEFAULT_CORPUS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def best_times(runs: dict, repeats: int) -> dict:
    """Best of `repeats` wall times per path; paths are interleaved so load drift hits all alike."""
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    parser.add_argument("--model", default=None, help="model dir / .gguf / hub id (default: offline SmolLM2)")
    parser.add_argument("--limit", type=int, default=1000, help="examples (speeches) to featurize")
    parser.add_argument("--micro-batch-tokens", type=int, default=8192)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=2, help="best of N timings per path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    examples = read_corpus(args.corpus).examples.slice(0, args.limit)
    featurizer = Featurizer(FeaturizeConfig(model=args.model, device=args.device,
                                            micro_batch_tokens=args.micro_batch_tokens))
    device = featurizer.device
    micro_batches = featurizer.micro_batches(featurizer.pieces(featurizer.encode(examples)))
    padded = [tuple(t.to(device) for t in featurizer.pad(batch)) for batch in micro_batches]
    real_tokens = sum(int(mask.sum()) for _, mask, _ in padded)
    naive_model = AutoModelForCausalLM.from_pretrained(
        featurizer.model_ref.local_path(), dtype=featurizer.model.dtype, attn_implementation="sdpa").to(device).eval()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run_featurizer():
        featurizer(examples)
        sync()

    @torch.inference_mode()
    def run_bare():
        for input_ids, attention_mask, position_ids in padded:
            featurizer.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, use_cache=False)
        sync()

    @torch.inference_mode()
    def run_naive():
        for input_ids, attention_mask, position_ids in padded:
            naive_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False, output_hidden_states=True)
        sync()

    featurizer(examples.slice(0, 16))  # warm-up (allocator, kernels)
    featurizer.real_tokens = featurizer.padded_tokens = 0
    seconds = best_times({"featurize": run_featurizer, "bare": run_bare, "naive": run_naive}, args.repeats)
    tokens_per_second = {name: real_tokens / s for name, s in seconds.items()}
    print(f"model {featurizer.model_ref.name} ({featurizer.model_ref.fingerprint}) d={featurizer.dim} "
          f"device={device} threads={args.threads} examples={examples.num_rows} tokens={real_tokens} "
          f"micro_batches={len(micro_batches)} micro_batch_tokens={args.micro_batch_tokens}")
    for name in seconds:
        print(f"{name:>10}: {seconds[name]:8.2f} s  {tokens_per_second[name]:10.0f} tokens/s")
    print(f"featurize_vs_bare: {tokens_per_second['featurize'] / tokens_per_second['bare']:.3f} "
          f"featurize_vs_naive: {tokens_per_second['featurize'] / tokens_per_second['naive']:.3f} "
          f"padding: {featurizer.padding_fraction:.4f}")


if __name__ == "__main__":
    main()
