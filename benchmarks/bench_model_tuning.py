"""Cost of one whole-model fine-tune and one NLL pass (`evaluate --mode lora|full`).

Fine-tunes the offline SmolLM2-135M (or --model) once on the first --examples rows of
GSM8K (alpaca format) with one ModelRecipe, then scores NLL on the next --examples rows,
and prints seconds per fine-tune, per NLL pass and per 1K input tokens of each.
Loading the model and tokenising are timed apart.
"""

import argparse
import pathlib
import resource
import time

import torch

from fishersft_ray.config import CorpusOptions
from fishersft_ray.evaluate.model_tuning import ModelRecipe, ModelTuner
from fishersft_ray.featurize.model_ref import resolve_model
from fishersft_ray.io.corpus import read_corpus

DEFAULT_CORPUS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_train_alpaca.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    parser.add_argument("--model", default=None, help="model dir / .gguf / hub id (default: offline SmolLM2)")
    parser.add_argument("--mode", default="lora", choices=["lora", "full"])
    parser.add_argument("--examples", type=int, default=100, help="rows fine-tuned on, and rows scored")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = read_corpus(args.corpus, CorpusOptions(format="alpaca")).examples
    rows = rows.column("messages").slice(0, 2 * args.examples).to_pylist()
    started = time.perf_counter()
    tuner = ModelTuner(resolve_model(args.model).local_path(), args.mode, device=args.device)
    load_seconds = time.perf_counter() - started
    train = tuner.encode(rows[:args.examples])
    held_out = tuner.encode(rows[args.examples:])
    train_tokens = sum(len(ids) for ids, _ in train)
    held_out_tokens = sum(len(ids) for ids, _ in held_out)

    pretrained = tuner.nll(held_out)
    started = time.perf_counter()
    tuner.finetune(train, ModelRecipe(lr=args.lr, epochs=1, batch_tokens=args.batch_tokens))
    finetune_seconds = time.perf_counter() - started
    started = time.perf_counter()
    tuned = tuner.nll(held_out)
    nll_seconds = time.perf_counter() - started

    print(f"mode {args.mode}, device {args.device}, {args.threads} thread(s), "
          f"{tuner.describe()['trainable_parameters']:,} trainable parameters, model load {load_seconds:.1f} s")
    print(f"fine-tune: {len(train)} examples, {train_tokens} input tokens, 1 epoch, batch {args.batch_tokens} "
          f"tokens, lr {args.lr:g}: {finetune_seconds:.1f} s ({1000 * finetune_seconds / train_tokens:.2f} s "
          f"per 1K tokens)")
    print(f"NLL pass: {len(held_out)} examples, {held_out_tokens} input tokens: {nll_seconds:.1f} s "
          f"({1000 * nll_seconds / held_out_tokens:.2f} s per 1K tokens)")
    print(f"held-out NLL per target token: pretrained {pretrained:.4f}, fine-tuned {tuned:.4f}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GB")


if __name__ == "__main__":
    main()
