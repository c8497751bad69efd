"""`fishersft-ray` command line: `select` runs the curation job, `evaluate` measures it."""

from __future__ import annotations

import argparse
import logging
import sys

from .features import TOKEN_WEIGHTS
from .pipeline import JobSettings, run_selection
from .storage import StorageError, parse_storage_options


def add_select_arguments(parser: argparse.ArgumentParser) -> None:
    """The `select` options (shared with jobs/select_subset.py, the `ray job submit` entrypoint)."""
    parser.add_argument("--input", required=True, help="corpus: file, directory or glob; local or s3://")
    parser.add_argument("--output", required=True, help="output directory; local or s3://")
    parser.add_argument("--budget", required=True, type=int, help="examples (or target tokens) to select")
    parser.add_argument("--budget-unit", choices=["examples", "tokens"], default="examples")
    parser.add_argument("--model", default=None,
                        help="Hugging Face id, local directory or .gguf file "
                             "(default: the offline SmolLM2-135M-Instruct when installed)")
    parser.add_argument("--format", choices=["auto", "text", "alpaca", "chat"], default="auto")
    parser.add_argument("--text-field", default="text", help="text column for the text format")
    parser.add_argument("--id-field", default=None, help="column holding a stable row id")
    parser.add_argument("--lam", type=float, default=1.0, help="ridge λ in Σ_0 = λI")
    parser.add_argument("--lam-relative", type=float, default=None,
                        help="instead of --lam: λ = this × the corpus's mean ‖x‖² per target token")
    parser.add_argument("--token-weights", choices=TOKEN_WEIGHTS, default="none",
                        help="loss: weight each target token by ‖p − e_y‖² under the model "
                             "(empirical Fisher; tokens the model already predicts count less)")
    parser.add_argument("--length-cap", default=None,
                        help="never select examples with more target tokens than this: a number "
                             "(e.g. 256) or a percentile of the corpus's target lengths (p50 = median)")
    parser.add_argument("--project-dim", type=int, default=None,
                        help="project embeddings to K dims on the actors (seeded orthonormal)")
    parser.add_argument("--prior", default=None,
                        help="corpus already trained on: its information conditions the selection")
    parser.add_argument("--ray-address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    parser.add_argument("--num-actors", type=int, default=None, help="featurizer actors (default: one per GPU, else CPUs/2)")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per map_batches call")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--storage-options", default=None,
                        help='fsspec/s3fs options as JSON, e.g. \'{"client_kwargs": {"endpoint_url": "…"}}\'')
    parser.add_argument("--output-format", choices=["parquet", "jsonl"], default="parquet")
    parser.add_argument("--features", default=None,
                        help="feature-shard cache location (default: <output>/features)")
    parser.add_argument("--on-bad-row", choices=["error", "skip"], default="error",
                        help="malformed rows: stop with an error naming the row, or skip and count them")
    parser.add_argument("--max-length", type=int, default=None, help="truncate examples to this many tokens")
    parser.add_argument("--checkpoint-seconds", type=float, default=30.0,
                        help="save the selection state at most this often (a rerun resumes from it)")


def settings_from_args(args: argparse.Namespace) -> JobSettings:
    return JobSettings(
        input=args.input, output=args.output, budget=args.budget, budget_unit=args.budget_unit,
        model=args.model, format=args.format, text_field=args.text_field, id_field=args.id_field,
        lam=args.lam, lam_relative=args.lam_relative, token_weights=args.token_weights,
        length_cap=args.length_cap,
        project_dim=args.project_dim, prior=args.prior, ray_address=args.ray_address,
        num_actors=args.num_actors, batch_size=args.batch_size, device=args.device,
        storage_options=parse_storage_options(args.storage_options),
        output_format=args.output_format, features=args.features, on_bad_row=args.on_bad_row,
        max_length=args.max_length, checkpoint_seconds=args.checkpoint_seconds,
    )


def run_select(args: argparse.Namespace) -> int:
    from .report import summary_table

    result = run_selection(settings_from_args(args))
    print(f"\nfishersft-ray: selected {len(result.selection.indices)} examples → {result.output}")
    print(summary_table(result.manifest))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fishersft-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_select_arguments(sub.add_parser("select", help="select the most informative examples"))
    sub.add_parser("evaluate", help="fine-tune on subsets picked by several methods and compare",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.command == "evaluate":
        from .evaluate import main as evaluate_main

        return evaluate_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from .featurize import ModelUnavailable

    try:
        return run_select(args)
    except (ValueError, StorageError, FileNotFoundError, ModelUnavailable) as exc:
        print(f"fishersft-ray: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
