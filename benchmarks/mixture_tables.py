"""Markdown tables of per-group evaluate runs (issue 26): macro and worst-group test NLL per
method and budget, the distance to uniform in uniform's seed std, and how the picks spread
over the groups.

    python benchmarks/mixture_tables.py benchmarks/eval_results/mixture_math_majority ...

Reads each directory's summary.csv and settings.json (written by `fishersft-ray evaluate
--group-field …`); prints one table per directory.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directories", nargs="+", type=pathlib.Path)
    for directory in parser.parse_args().directories:
        print(f"### {directory.name}\n\n{table(directory)}\n")


if __name__ == "__main__":
    main()
