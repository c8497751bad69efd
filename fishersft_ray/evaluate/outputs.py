"""evaluate's outputs, written through the storage layer (local or s3://): results.csv (one
line per run), summary.csv, summary.md, nll_vs_budget.png and settings.json (last).

results.csv, one line per fine-tune: method, budget (the example budget n it is compared at),
seed (random methods), examples and tokens (target tokens) it was fine-tuned on, test_nll
(mean NLL per target token over the whole test set), exact_copies and near_twins (picks that
copy an earlier pick exactly / have a cosine ≥ 0.98 twin among the picks). With groups
(--group-field / --group-by-file) also: nll_macro (the mean over groups of each group's test
NLL: every group counts the same, whatever its size), nll_worst (the highest group's test
NLL), nll_<group> (that group's test NLL per target token) and picks_<group> (picked
examples from that group). summary.csv has per (method, budget) the number of runs and
<column>_mean and <column>_std (sample std, 0 for one run) of each of those columns.
settings.json records every setting and fact of the run; with groups, "groups" holds each
group's column name → label and its rows in the corpus, pool, validation and test.
"""

from __future__ import annotations

import csv
import io
import json

from fishersft_ray.evaluate.methods import EVAL_METHODS
from fishersft_ray.io.storage import Location

FILES = ("results.csv", "summary.csv", "summary.md", "nll_vs_budget.png", "settings.json")


def markdown_table(summary: list[dict], info: dict) -> str:
    """Budget x method table: NLL mean ± std (with groups also macro and worst-group NLL),
    tokens, exact copies / near twins."""
    vocabulary = (f"vocabulary {info['vocabulary_size']}" if "vocabulary_size" in info
                  else "full vocabulary")
    grouped = "pretrained_test_groups" in info
    scores = ["test_nll", *(["nll_macro", "nll_worst"] if grouped else [])]
    pretrained = (f"; macro {info['pretrained_test_groups']['nll_macro']:.4f}, worst group "
                  f"{info['pretrained_test_groups']['nll_worst']:.4f}" if grouped else "")
    lines = [f"pretrained {info['tuned']} NLL {info['pretrained_test_nll']:.4f}{pretrained} (test, "
             f"{info['test_tokens']} target tokens, {vocabulary}); recipe {info['optimizer']} lr="
             f"{info['recipe']['lr']:g}, {info['recipe']['epochs']:g} epochs"
             + (f" — **VOID: uniform at the largest budget does not beat the pretrained {info['tuned']}**"
                if info["void"] else ""),
             "",
             "| n | method | test NLL (mean ± std) | "
             + ("macro NLL | worst-group NLL | " if grouped else "")
             + "target tokens | examples | exact copies | near twins | runs |",
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if grouped else "")]
    for row in summary:
        nlls = " | ".join(f"{row[f'{score}_mean']:.4f}" + (f" ± {row[f'{score}_std']:.4f}" if row["runs"] > 1 else "")
                          for score in scores)
        lines.append(f"| {row['budget']} | {EVAL_METHODS[row['method']].label} | {nlls} "
                     f"| {row['tokens_mean']:.0f} | {row['examples_mean']:.0f} "
                     f"| {row['exact_copies_mean']:.1f} | {row['near_twins_mean']:.1f} | {row['runs']} |")
    return "\n".join(lines) + "\n"


def plot_results(summary: list[dict], info: dict, title: str) -> bytes:
    """As PNG bytes: NLL vs example budget, NLL vs target tokens actually used; with groups a
    second row, macro and worst-group NLL vs target tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = "pretrained_test_groups" in info
    panels = [("budget", "test_nll", info["pretrained_test_nll"], "example budget n", "held-out NLL per target token"),
              ("tokens_mean", "test_nll", info["pretrained_test_nll"], "target tokens fine-tuned on",
               "held-out NLL per target token")]
    if grouped:
        panels += [("tokens_mean", score, info["pretrained_test_groups"][score], "target tokens fine-tuned on", ylabel)
                   for score, ylabel in (("nll_macro", "macro NLL (mean over groups)"),
                                         ("nll_worst", "worst-group NLL"))]
    figure, axes = plt.subplots(len(panels) // 2, 2, figsize=(12, 4.5 * len(panels) // 2), squeeze=False)
    for axis, (x, score, pretrained, xlabel, ylabel) in zip(axes.ravel(), panels):
        for method in EVAL_METHODS:
            entries = [row for row in summary if row["method"] == method]
            if entries:
                axis.errorbar([row[x] for row in entries], [row[f"{score}_mean"] for row in entries],
                              yerr=[row[f"{score}_std"] for row in entries], marker="o", capsize=3,
                              label=EVAL_METHODS[method].label)
        axis.axhline(pretrained, color="grey", linestyle="--", label=f"pretrained {info['tuned']}")
        axis.set_xscale("log")
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=7)
    figure.suptitle(title + (" (VOID)" if info["void"] else ""))
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()


def _csv(records: list[dict]) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
    return text.getvalue().encode()


def write_outputs(result: dict, output: Location, title: str) -> list[str]:
    """Every output file; settings.json last, so its presence means the run's outputs are complete."""
    output.write_bytes("results.csv", _csv(result["rows"]))
    output.write_bytes("summary.csv", _csv(result["summary"]))
    output.write_bytes("summary.md", (f"## {title}\n\n" + markdown_table(result["summary"], result["info"])).encode())
    output.write_bytes("nll_vs_budget.png", plot_results(result["summary"], result["info"], title))
    output.write_bytes("settings.json", (json.dumps(result["info"], indent=2, default=str) + "\n").encode())
    return [output.child(name).url for name in FILES]
