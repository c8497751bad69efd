"""evaluate's outputs, written through the storage layer (local or s3://): results.csv (one
line per run), summary.csv, summary.md, nll_vs_budget.png and settings.json (last)."""

from __future__ import annotations

import csv
import io
import json

from fishersft_ray.evaluate.methods import EVAL_METHODS
from fishersft_ray.io.storage import Location

FILES = ("results.csv", "summary.csv", "summary.md", "nll_vs_budget.png", "settings.json")


def markdown_table(summary: list[dict], info: dict) -> str:
    """Budget x method table: NLL mean ± std, tokens, exact copies / near twins."""
    vocabulary = (f"vocabulary {info['vocabulary_size']}" if "vocabulary_size" in info
                  else "full vocabulary")
    lines = [f"pretrained {info['tuned']} NLL {info['pretrained_test_nll']:.4f} (test, "
             f"{info['test_tokens']} target tokens, {vocabulary}); recipe {info['optimizer']} lr="
             f"{info['recipe']['lr']:g}, {info['recipe']['epochs']:g} epochs"
             + (f" — **VOID: uniform at the largest budget does not beat the pretrained {info['tuned']}**"
                if info["void"] else ""),
             "",
             "| n | method | test NLL (mean ± std) | target tokens | examples | exact copies | near twins | runs |",
             "|---|---|---|---|---|---|---|---|"]
    for row in summary:
        std = f" ± {row['test_nll_std']:.4f}" if row["runs"] > 1 else ""
        lines.append(f"| {row['budget']} | {EVAL_METHODS[row['method']].label} | {row['test_nll_mean']:.4f}{std} "
                     f"| {row['tokens_mean']:.0f} | {row['examples_mean']:.0f} "
                     f"| {row['exact_copies_mean']:.1f} | {row['near_twins_mean']:.1f} | {row['runs']} |")
    return "\n".join(lines) + "\n"


def plot_results(summary: list[dict], info: dict, title: str) -> bytes:
    """Two panels, as PNG bytes: NLL vs example budget, NLL vs target tokens actually used."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in EVAL_METHODS:
        entries = [row for row in summary if row["method"] == method]
        if not entries:
            continue
        nll = [row["test_nll_mean"] for row in entries]
        err = [row["test_nll_std"] for row in entries]
        axes[0].errorbar([row["budget"] for row in entries], nll, yerr=err, marker="o", capsize=3,
                         label=EVAL_METHODS[method].label)
        axes[1].errorbar([row["tokens_mean"] for row in entries], nll, yerr=err, marker="o", capsize=3,
                         label=EVAL_METHODS[method].label)
    for axis, xlabel in zip(axes, ("example budget n", "target tokens fine-tuned on")):
        axis.axhline(info["pretrained_test_nll"], color="grey", linestyle="--",
                     label=f"pretrained {info['tuned']}")
        axis.set_xscale("log")
        axis.set_xlabel(xlabel)
        axis.set_ylabel("held-out NLL per target token")
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
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
