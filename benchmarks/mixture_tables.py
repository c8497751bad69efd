"""Markdown tables of per-group evaluate runs: macro and worst-group test NLL per method and
budget, the distance to uniform in uniform's seed std, and how the picks spread over the
groups (issue 26); for a run with `--target-group G` (issue 27), the target group's test NLL
instead.

    python benchmarks/mixture_tables.py benchmarks/eval_results/mixture_math_majority ...
    python benchmarks/mixture_tables.py RUN_WITH_TARGET --also OTHER_RUN --also-methods tokenod_tokens

Reads each directory's summary.csv and settings.json (written by `fishersft-ray evaluate
--group-field …`); prints one table per directory. ``--also`` adds the named methods' rows of
another run on the same split (same pool, test rows and recipe): its uniform rows must match
this run's to the last digit, else it stops.
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib


def _float(row: dict, key: str) -> float:
    value = row.get(key, "")
    return float(value) if value not in ("", None) else float("nan")


def table(directory: pathlib.Path) -> str:
    settings = json.loads((directory / "settings.json").read_text())
    rows = list(csv.DictReader((directory / "summary.csv").open()))
    groups = sorted(settings["groups"]["sizes"])
    pool = {g: settings["groups"]["sizes"][g]["pool"] for g in groups}
    majority = max(pool, key=pool.get)
    pretrained = settings["pretrained_test_groups"]
    lines = [f"pool: " + ", ".join(f"{g} {pool[g]}" for g in groups)
             + f"; pretrained head: macro {pretrained['nll_macro']:.4f}, worst {pretrained['nll_worst']:.4f}", "",
             "| n | method | macro NLL | Δ vs uniform (uniform std) | worst-group NLL | pooled NLL | tokens | "
             f"examples | {majority} share of picks |",
             "|---|---|---|---|---|---|---|---|---|"]
    uniform = {row["budget"]: row for row in rows if row["method"] == "uniform"}
    for row in sorted(rows, key=lambda r: (int(r["budget"]), r["method"])):
        base = uniform.get(row["budget"])
        macro, std = _float(row, "nll_macro_mean"), _float(row, "nll_macro_std")
        delta = ""
        if base is not None and row is not base:
            spread = _float(base, "nll_macro_std")
            gap = macro - _float(base, "nll_macro_mean")
            delta = f"{gap:+.4f} ({gap / spread:+.1f})" if spread > 0 else f"{gap:+.4f}"
        picks = {g: _float(row, f"picks_{g}_mean") for g in groups}
        share = picks[majority] / sum(picks.values()) if sum(picks.values()) else float("nan")
        spread = f" ± {std:.4f}" if std == std and int(row["runs"]) > 1 else ""
        lines.append(f"| {row['budget']} | {row['method']} | {macro:.4f}{spread} | {delta} | "
                     f"{_float(row, 'nll_worst_mean'):.4f} | {_float(row, 'test_nll_mean'):.4f} | "
                     f"{_float(row, 'tokens_mean'):,.0f} | {_float(row, 'examples_mean'):.0f} | {share:.0%} |")
    return "\n".join(lines)


def target_table(directory: pathlib.Path, also: pathlib.Path | None, also_methods: list[str]) -> str:
    """The target group's test NLL per method and budget, against uniform's seed std."""
    settings = json.loads((directory / "settings.json").read_text())
    rows = list(csv.DictReader((directory / "summary.csv").open()))
    group = settings["target"]["group"]
    column = f"nll_{group}"
    if also is not None:
        other = list(csv.DictReader((also / "summary.csv").open()))
        mine = {(r["budget"], r[f"{column}_mean"]) for r in rows if r["method"] == "uniform"}
        theirs = {(r["budget"], r[f"{column}_mean"]) for r in other if r["method"] == "uniform"}
        if mine != theirs:
            raise SystemExit(f"{also}: its uniform rows differ from {directory}'s: not the same split and recipe")
        rows += [r for r in other if r["method"] in also_methods]
    pretrained = settings["pretrained_test_groups"][column]
    lines = [f"target: {group}'s {settings['target']['examples']} validation rows "
             f"({settings['target']['target_tokens']:,} target tokens); pretrained head: {column} {pretrained:.4f}"
             + (f"; {', '.join(also_methods)} from {also.name} (same split, uniform identical)" if also else ""), "",
             f"| n | method | {column} | Δ vs uniform (uniform std) | macro NLL | tokens | {group} picks |",
             "|---|---|---|---|---|---|---|"]
    uniform = {row["budget"]: row for row in rows if row["method"] == "uniform"}
    for row in sorted(rows, key=lambda r: (int(r["budget"]), r["method"])):
        base = uniform.get(row["budget"])
        value, std = _float(row, f"{column}_mean"), _float(row, f"{column}_std")
        delta = ""
        if base is not None and row is not base:
            spread = _float(base, f"{column}_std")
            gap = value - _float(base, f"{column}_mean")
            delta = f"{gap:+.4f} ({gap / spread:+.1f})" if spread > 0 else f"{gap:+.4f}"
        spread = f" ± {std:.4f}" if std == std and int(row["runs"]) > 1 else ""
        lines.append(f"| {row['budget']} | {row['method']} | {value:.4f}{spread} | {delta} | "
                     f"{_float(row, 'nll_macro_mean'):.4f} | {_float(row, 'tokens_mean'):,.0f} | "
                     f"{_float(row, f'picks_{group}_mean'):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directories", nargs="+", type=pathlib.Path)
    parser.add_argument("--also", type=pathlib.Path, default=None, help="another run on the same split")
    parser.add_argument("--also-methods", default="tokenod_tokens", help="its methods to add (comma-separated)")
    args = parser.parse_args()
    for directory in args.directories:
        targeted = "target" in json.loads((directory / "settings.json").read_text())
        body = (target_table(directory, args.also, args.also_methods.split(",")) if targeted
                else table(directory))
        print(f"### {directory.name}\n\n{body}\n")


if __name__ == "__main__":
    main()
