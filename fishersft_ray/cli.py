"""`fishersft-ray` command line: `select` runs the curation job, `evaluate` measures it.

Flags are generated from the settings dataclasses (config.py); this module only parses,
builds the typed settings once and dispatches.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys

from fishersft_ray.config import EvaluateSettings, SelectSettings, add_options, from_args
from fishersft_ray.config_file import ConfigFileError, use_config_file
from fishersft_ray.io.storage import StorageError

COMMANDS = {  # name → (settings class, help, flags it does not take)
    "select": (SelectSettings, "select the most informative examples", ()),
    "evaluate": (EvaluateSettings, "fine-tune on subsets picked by several methods and compare "
                                   "held-out NLL", EvaluateSettings.FIXED_FEATURIZE),
}


def build_parser(config: argparse.Namespace | None = None) -> argparse.ArgumentParser:
    """The parser of both commands; with ``config`` (a command and its ``--config`` file),
    that file's settings are that command's defaults."""
    parser = argparse.ArgumentParser(prog="fishersft-ray", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (settings_class, help_text, skip) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=settings_class.__doc__)
        flags = add_options(command, settings_class, skip)
        if config is not None and config.command == name and config.config_file is not None:
            try:
                use_config_file(flags, config.config_file)
            except ConfigFileError as exc:
                command.error(str(exc))
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, over the settings of its ``--config`` file if it names one."""
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("command", nargs="?")
    config.add_argument("--config", dest="config_file")
    return build_parser(config.parse_known_args(argv)[0]).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from fishersft_ray.featurize.model_ref import ModelUnavailable
    from fishersft_ray.run.executors import ActorsUnavailable

    try:
        settings = from_args(COMMANDS[args.command][0], args)
        if args.command == "select":
            return _select(settings)
        return _evaluate(settings)
    except (ValueError, StorageError, FileNotFoundError, ModelUnavailable, ActorsUnavailable) as exc:
        print(f"fishersft-ray: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nfishersft-ray: interrupted; rerun the same command to resume (features and the selection "
              "checkpoint are kept)", file=sys.stderr)
        return 130
    finally:
        # Free what a failed stage's frames still hold (Arrow readers and their threads) now, while
        # Arrow is whole, not in the interpreter's teardown, where it can abort (apache/arrow#34314).
        gc.collect()


def _select(settings: SelectSettings) -> int:
    from fishersft_ray.report import summary_table
    from fishersft_ray.run.job import run_select

    result = run_select(settings)
    print(f"\nfishersft-ray: selected {len(result.selection.indices)} examples → {result.output}")
    print(summary_table(result.manifest))
    subset = result.manifest["files"][0]["name"]
    peek = (f"head -n 3 {result.output}/{subset}" if subset.endswith(".jsonl") else
            f"python -c \"import pyarrow.parquet as pq; [print(r) for r in "
            f"pq.read_table('{result.output}/{subset}').slice(0, 3).to_pylist()]\"")
    print(OUTPUT_GUIDE.format(output=result.output, subset=subset, peek=peek))
    return 0


OUTPUT_GUIDE = """
What is in {output}:
  {subset:<16} the picked rows with all their original columns, plus fishersft_rank (pick
                   order: the first k rows are the answer for k examples) and fishersft_gain
  ranking.parquet  id, row_index, rank, gain, the objective after each pick, target tokens
  report.png       objective and gain per pick, target lengths picked vs the corpus, and the
                   spectrum of the design matrix against a random subset's
  manifest.json    every setting, count, timing and the certificate; written last, so its
                   presence means the output is complete
  features/        the feature cache: rerun with another --budget or --method to reuse it
Look at the first picks:
  {peek}
"""


def _evaluate(settings: EvaluateSettings) -> int:
    from fishersft_ray.evaluate.run import run_evaluate

    outputs = run_evaluate(settings)
    print(outputs["table"])
    print("wrote " + ", ".join(outputs["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
