"""Human-facing outputs of a run: the report figure and the end-of-run summary table."""

from __future__ import annotations

import io

import numpy as np

from fishersft_ray.features import FeatureSet
from fishersft_ray.select import Selection, information_matrix


def render_report(features: FeatureSet, selection: Selection, *, lam: float,
                  pool_lengths: np.ndarray | None = None, pool_information: np.ndarray | None = None,
                  groups: dict | None = None) -> bytes:
    """A 2×2 PNG: objective and marginal gain per step; target lengths, selected vs corpus;
    eigen-spectrum of Σ_S against a same-size uniform subset's expected Σ. With ``groups``
    (io/groups.group_account) a third row: each group's share of the examples and of the
    target tokens, picks vs corpus.

    ``features`` holds the picks (``selection.indices`` point into it); the corpus side
    comes from it too unless ``pool_lengths`` (every example's target tokens) and
    ``pool_information`` (Σ A_i over the pool) are given, as a two-stage run does."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picked = selection.indices
    steps = np.arange(1, len(picked) + 1)
    fig, axes = plt.subplots(2 + (groups is not None), 2, figsize=(12, 8.5 + 4.25 * (groups is not None)))

    ax = axes[0, 0]
    ax.plot(steps, selection.objective, color="tab:blue")
    ax.set_xlabel("greedy step")
    ax.set_ylabel("f(S) = log det Σ_S − log det Σ_0", color="tab:blue")
    ax.set_title("objective" + ("" if selection.upper_bound is None else
                                f" (certified ≥ {selection.certificate_ratio:.3f} of optimum)"))

    ax = axes[0, 1]
    ax.semilogy(steps, np.maximum(selection.gains, 1e-12), color="tab:orange")
    ax.set_xlabel("greedy step")
    ax.set_ylabel("marginal gain Δ(i | S)")
    ax.set_title("marginal gain of each pick")

    ax = axes[1, 0]
    lengths = features.num_targets if pool_lengths is None else np.asarray(pool_lengths)
    bins = np.histogram_bin_edges(lengths, bins=40)
    ax.hist(lengths, bins=bins, density=True, alpha=0.5, label=f"corpus (n={len(lengths)})")
    ax.hist(features.num_targets[picked], bins=bins, density=True, alpha=0.6, label=f"selected (n={len(picked)})")
    ax.set_xlabel("target tokens per example")
    ax.set_ylabel("density")
    ax.set_title("target length: selected vs corpus")
    ax.legend()

    ax = axes[1, 1]
    eye = lam * np.eye(features.dim)
    selected_eigs = np.linalg.eigvalsh(eye + information_matrix(features, picked))[::-1]
    share = len(picked) / max(len(lengths), 1)
    pool = information_matrix(features) if pool_information is None else pool_information
    uniform_eigs = np.linalg.eigvalsh(eye + share * pool)[::-1]
    ax.semilogy(selected_eigs, label="Σ_S (selected)")
    ax.semilogy(uniform_eigs, label="E[Σ] of a uniform subset of the same size", linestyle="--")
    ax.set_xlabel("eigenvalue index")
    ax.set_ylabel("eigenvalue")
    ax.set_title("spectrum of the design matrix")
    ax.legend()

    if groups is not None:
        names = list(groups["per_group"])
        where = np.arange(len(names))
        for ax, unit in zip(axes[2], ("example", "token")):
            for offset, (side, label) in zip((-0.2, 0.2), (("corpus", "corpus"), ("picked", "selected"))):
                ax.bar(where + offset, [groups["per_group"][name][f"{side}_{unit}_share"] for name in names],
                       width=0.4, label=label)
            ax.set_xticks(where, names, rotation=30, ha="right", fontsize=8)
            ax.set_ylabel(f"share of {unit}s" if unit == "example" else "share of target tokens")
            ax.set_title(f"groups ({groups['source']}): share of {unit}s, selected vs corpus")
            ax.legend()

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _skip_counts(skipped: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()) if v) or "none"


def summary_table(manifest: dict) -> str:
    """A short plain-text table of what a run read, skipped, selected and how long it took."""
    corpus, sel = manifest["corpus"], manifest["selection"]
    skipped = _skip_counts(corpus["skipped"])
    rows = [
        ("output", manifest["output"]),
        ("model", f"{manifest['model']['name']} (d={manifest['model']['dim']})"),
        ("rows read / kept", f"{corpus['rows_read']} / {corpus['kept']}  (skipped: {skipped}; "
                             f"truncated: {corpus['truncated']})"),
        *([("prior rows read / kept", f"{prior['rows_read']} / {prior['kept']}  "
                                      f"(skipped: {_skip_counts(prior['skipped'])})")]
          if (prior := manifest.get("prior")) else []),
        ("features", "reused from cache" if manifest["features"]["reused"] else "computed"),
        ("selected", f"{sel['selected']} examples, {sel['selected_target_tokens']} of "
                     f"{corpus['target_tokens']} target tokens ({sel['budget_unit']} budget "
                     f"{sel['budget']})"),
        ("method", sel["method"]),
        ("objective", f"{sel['objective']:.4f}  (" + (f"≥ {sel['certificate_ratio']:.3f} of optimum, "
                      if sel["certificate_ratio"] is not None else "no certificate, ")
                      + f"{sel['evaluations']} gain evaluations"
                      + (f", {updates} bounds updated" if (updates := sel.get("bound_updates")) else "") + ")"),
        *([("length cap", f"{cap['rule']} = {cap['tokens']} target tokens: {cap['excluded_examples']} "
                          f"longer examples ({cap['excluded_target_tokens']} target tokens) not eligible")]
          if (cap := sel.get("length_cap")) else []),
        ("near-duplicates", f"{sel['near_duplicates']['picks_with_twin']} picks have a twin at cosine ≥ "
                            f"{sel['near_duplicates']['cosine_threshold']} (exact duplicates were "
                            f"dropped before selection: {corpus['skipped'].get('duplicate', 0)})"),
        *[(f"group {name}", f"selected {g['picked_examples']} examples ({g['picked_example_share']:.1%}), "
                            f"{g['picked_tokens']} target tokens ({g['picked_token_share']:.1%}); corpus "
                            f"{g['corpus_example_share']:.1%} of examples, {g['corpus_token_share']:.1%} of tokens")
          for name, g in (sel["groups"]["per_group"] if sel.get("groups") else {}).items()],
        ("time", "  ".join(f"{k}={v:.1f}s" for k, v in manifest["timings_s"].items())),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)
