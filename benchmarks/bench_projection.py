"""Projection quality on real states: does TokenOD pick the same examples on k-dim features?

SmolLM2-135M-Instruct (offline, d = 576) on the first ``--limit`` examples of
tinyshakespeare (plain text) and of GSM8K (alpaca: response tokens only). Each corpus is
featurized ONCE with ``keep_states=True`` (the package's featurizer, forward units as the
job plans them) and cached under ``--cache-dir``; reruns skip that step.

For each corpus and budget (n = 100 examples; a token budget = the target tokens of a
uniform random 250 examples), λ = 1:
  * full   picks on the full-width storage rule (``FeatureSet.from_examples(states)``);
  * for k ∈ --ks: picks on the states projected X_i P (P: a seeded orthonormal matrix,
    ``random_projection``, or PCA fitted on the first 256 examples' states, ``pca_projection``,
    as the featurizer does), then the storage rule at width k;
  * for r ∈ --ranks: picks on the full-width top-r eigenpairs (the storage rule's ``max_rank``);
  * float16: picks on the full-width factors stored as float16 (``--factor-dtype float16``).
Every pick set is scored with ``logdet_gains`` on the FULL-width FeatureSet (λ = 1):
full_metric_ratio = f_full(picks) / f_full(full picks); overlap = |picks ∩ full| / |full|.
Also: stored bytes (the storage rule, ``features.estimate_feature_bytes``) and selection
seconds. Prints a table, writes JSON (--out); the last line is
``projection d=576 k=128 full_metric_ratio=<r> overlap=<o>`` for the better of PCA/seeded at
k = 128 at n = 100 (worst of the two corpora), named on the line before.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fishersft_ray.features import FeatureSet, TokenStates, estimate_feature_bytes
from fishersft_ray.select import logdet_gains, select, uniform_random

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
CORPORA = {
    "tinyshakespeare": (DATA / "tinyshakespeare.txt", "text"),
    "gsm8k": (DATA / "gsm8k_train_alpaca.json", "alpaca"),
}
PCA_SAMPLE_ROWS = 256


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def featurized(name: str, limit: int, cache_dir: pathlib.Path, rows_per_unit: int = 16) -> pa.Table:
    """The shard table (with token states) of the first ``limit`` examples, cached."""
    path = cache_dir / f"{name}-limit{limit}-rpu{rows_per_unit}.parquet"
    if path.exists():
        return pq.read_table(path)
    import torch

    from fishersft_ray.config import CorpusOptions, FeaturizeConfig
    from fishersft_ray.featurize.featurizer import Featurizer
    from fishersft_ray.io.corpus import read_corpus
    from fishersft_ray.run.feature_cache import plan_forward_units

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    corpus_path, fmt = CORPORA[name]
    examples = read_corpus(str(corpus_path), CorpusOptions(format=fmt)).examples.slice(0, limit)
    planned = plan_forward_units(examples, rows_per_unit)
    featurizer = Featurizer(FeaturizeConfig(model=None, device="cpu", keep_states=True,
                                            rows_per_unit=rows_per_unit))
    block = 8 * rows_per_unit  # whole units per call: the numbers do not depend on it
    tables, started = [], time.perf_counter()
    for start in range(0, planned.num_rows, block):
        tables.append(featurizer(planned.slice(start, block)))
        done = min(start + block, planned.num_rows)
        log(f"featurize {name}: {done}/{planned.num_rows} rows, {time.perf_counter() - started:.0f} s")
    table = pa.concat_tables(tables)
    table = table.take(pa.array(np.argsort(table.column("row_index").to_numpy(), kind="stable")))
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    pq.write_table(table, partial)
    partial.rename(path)
    log(f"featurize {name}: cached {path} ({time.perf_counter() - started:.0f} s)")
    return table


def plan_order(name: str, limit: int, rows_per_unit: int = 16) -> np.ndarray:
    """row_index values in the featurizer's plan order (longest text first): the featurizer
    fits its PCA basis on the first ``pca_sample_rows`` of this order."""
    from fishersft_ray.config import CorpusOptions
    from fishersft_ray.io.corpus import read_corpus
    from fishersft_ray.run.feature_cache import plan_forward_units

    corpus_path, fmt = CORPORA[name]
    examples = read_corpus(str(corpus_path), CorpusOptions(format=fmt)).examples.slice(0, limit)
    return plan_forward_units(examples, rows_per_unit).column("row_index").to_numpy()


def pick(features: FeatureSet, budget: float, unit: str) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    indices = select(features, budget, lam=1.0, budget_unit=unit, threads=1).indices
    return np.asarray(indices, np.int64), time.perf_counter() - started


def f_full(full: FeatureSet, indices: np.ndarray) -> float:
    return float(logdet_gains(full, indices, lam=1.0)[1][-1]) if len(indices) else 0.0


def variants(states: list[np.ndarray], full: FeatureSet, pca_rows: np.ndarray, ks, ranks, seed: int):
    """(name, kind, k or r, FeatureSet factory, stored width) for every compressed variant."""
    d = full.dim
    num_targets = full.num_targets
    sample = [states[i] for i in pca_rows]
    pca_basis = {}
    from fishersft_ray.featurize.featurizer import pca_projection, random_projection

    for k in ks:
        seeded = random_projection(d, k, seed)
        yield f"seeded k={k}", "seeded", k, (lambda P=seeded: FeatureSet.from_examples(
            [X @ P for X in states], num_targets=num_targets, row_index=full.row_index)), k
        pca_basis[k] = pca_projection(sample, k)
        yield f"pca k={k}", "pca", k, (lambda P=pca_basis[k]: FeatureSet.from_examples(
            [X @ P for X in states], num_targets=num_targets, row_index=full.row_index)), k
    for r in ranks:
        yield f"max_rank r={r}", "max_rank", r, (lambda r=r: FeatureSet.from_examples(
            states, num_targets=num_targets, row_index=full.row_index, max_rank=r)), d
    yield "float16", "float16", 16, (lambda: full.stored_as("float16")), d


def pca_energy(states: list[np.ndarray], pca_rows: np.ndarray, ks) -> dict[int, float]:
    """Share of the WHOLE corpus's Σ_i tr(A_i) inside the PCA subspace fitted on the sample."""
    from fishersft_ray.featurize.featurizer import pca_projection

    total = sum(float(np.sum(X.astype(np.float64) ** 2)) for X in states)
    out = {}
    for k in ks:
        P = pca_projection([states[i] for i in pca_rows], k).astype(np.float64)
        out[k] = sum(float(np.sum((X.astype(np.float64) @ P) ** 2)) for X in states) / total
    return out


def run_corpus(name: str, args) -> dict:
    table = featurized(name, args.limit, args.cache_dir)
    dim = json.loads(table.schema.metadata[b"fishersft"])["dim"]
    tokens = TokenStates.from_table(table, dim)
    states = tokens.per_example()
    full = FeatureSet.from_examples(states, num_targets=tokens.num_targets, row_index=tokens.row_index)
    position = {int(r): p for p, r in enumerate(tokens.row_index)}
    pca_rows = np.array([position[int(r)] for r in plan_order(name, args.limit)[:PCA_SAMPLE_ROWS]])
    uniform = uniform_random(full, 250, seed=0)
    token_budget = int(full.num_targets[uniform].sum())
    budgets = [("n=100", 100, "examples"), (f"tokens={token_budget}", token_budget, "tokens")]
    m = full.num_targets
    result = {"corpus": name, "examples": full.n, "dim": dim, "target_tokens": int(m.sum()),
              "mean_targets": float(m.mean()), "max_targets": int(m.max()),
              "mean_token_energy": full.mean_token_energy(),
              "pca_energy_share": pca_energy(states, pca_rows, args.ks), "budgets": {}}
    log(f"{name}: {full.n} examples, mean m = {m.mean():.1f}, max m = {m.max()}")
    full_bytes = estimate_feature_bytes(m, dim)
    built = {}
    for label, budget, unit in budgets:
        full_picks, seconds = pick(full, budget, unit)
        f_ref = f_full(full, full_picks)
        rows = [{"variant": "full", "kind": "full", "param": dim, "f_full": f_ref, "ratio": 1.0,
                 "overlap": 1.0, "bytes": full_bytes, "reduction": 1.0, "select_s": seconds,
                 "picks": len(full_picks)}]
        log(f"{name} {label}: full f={f_ref:.2f} ({seconds:.1f} s)")
        random_picks = uniform_random(full, budget, budget_unit=unit, seed=args.seed)
        value = f_full(full, random_picks)
        rows.append({"variant": "uniform random (reference)", "kind": "uniform", "param": 0,
                     "f_full": value, "ratio": value / f_ref,
                     "overlap": len(np.intersect1d(random_picks, full_picks)) / len(full_picks),
                     "bytes": 0, "reduction": float("nan"), "select_s": 0.0, "picks": len(random_picks)})
        for variant, kind, param, make, width in variants(states, full, pca_rows, args.ks, args.ranks, args.seed):
            if variant not in built:
                built[variant] = make()
            picks, seconds = pick(built[variant], budget, unit)
            value = f_full(full, picks)
            stored = estimate_feature_bytes(m, dim, width if width < dim else None,
                                            param if kind == "max_rank" else None,
                                            factor_dtype="float16" if kind == "float16" else "float32")
            rows.append({"variant": variant, "kind": kind, "param": param, "f_full": value,
                         "ratio": value / f_ref, "overlap": len(np.intersect1d(picks, full_picks)) / len(full_picks),
                         "bytes": stored, "reduction": full_bytes / stored, "select_s": seconds,
                         "picks": len(picks)})
            log(f"{name} {label}: {variant} ratio={value / f_ref:.4f} "
                f"overlap={rows[-1]['overlap']:.2f} ({seconds:.1f} s)")
        result["budgets"][label] = rows
    return result


def synthetic_float16(seed: int = 0, n: int = 2000, d: int = 64) -> list[dict]:
    """float32 vs float16-stored factors on synthetic examples (lengths 1..3d, a decaying
    spectrum shared by all examples plus per-example directions), λ = 1."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(10.0, 0.01, d)
    examples = []
    for m in rng.integers(1, 3 * d, size=n):
        own = rng.normal(size=(d, d)) * 0.1 + np.eye(d)
        examples.append((rng.normal(size=(int(m), d)) * scales) @ own)
    full = FeatureSet.from_examples(examples)
    rounded = full.stored_as("float16")
    rows = []
    token_budget = int(full.num_targets[uniform_random(full, 250, seed=seed)].sum())
    for label, budget, unit in (("n=100", 100, "examples"), (f"tokens={token_budget}", token_budget, "tokens")):
        reference, _ = pick(full, budget, unit)
        picks, seconds = pick(rounded, budget, unit)
        rows.append({"budget": label, "ratio": f_full(full, picks) / f_full(full, reference),
                     "overlap": len(np.intersect1d(picks, reference)) / len(reference),
                     "identical_order": bool(len(picks) == len(reference) and np.all(picks == reference)),
                     "select_s": seconds})
        log(f"synthetic float16 {label}: {rows[-1]}")
    return rows


def print_tables(results: list[dict]) -> None:
    for result in results:
        print(f"\n{result['corpus']}: {result['examples']} examples, d = {result['dim']}, "
              f"{result['target_tokens']} target tokens (mean {result['mean_targets']:.1f}, "
              f"max {result['max_targets']}; mean ‖x‖² per target token {result['mean_token_energy']:.4g}, "
              f"λ = 1); PCA energy share (fit on {PCA_SAMPLE_ROWS} longest): "
              + ", ".join(f"k={k}: {v:.3f}" for k, v in result["pca_energy_share"].items()))
        for label, rows in result["budgets"].items():
            print(f"\n| {result['corpus']} {label} | full_metric_ratio | overlap | stored MB | reduction | select s |")
            print("|---|---|---|---|---|---|")
            for row in rows:
                stored = f"{row['bytes'] / 1e6:.1f} | {row['reduction']:.2f}×" if row["bytes"] else "– | –"
                print(f"| {row['variant']} | {row['ratio']:.4f} | {row['overlap']:.2f} | {stored} | "
                      f"{row['select_s']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=2000, help="first N examples of each corpus")
    parser.add_argument("--cache-dir", type=pathlib.Path, default=pathlib.Path("out/bench_projection"))
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="JSON results (default: <cache-dir>/results-limit<N>.json)")
    parser.add_argument("--corpora", default="tinyshakespeare,gsm8k")
    parser.add_argument("--ks", default="32,64,128,256")
    parser.add_argument("--ranks", default="32,64,128", help="max_rank truncations ('' for none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the orthonormal projection")
    args = parser.parse_args()
    args.ks = [int(k) for k in args.ks.split(",") if k]
    args.ranks = [int(r) for r in args.ranks.split(",") if r]
    synthetic = synthetic_float16(args.seed)
    results = [run_corpus(name, args) for name in args.corpora.split(",")]
    out = args.out or args.cache_dir / f"results-limit{args.limit}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"corpora": results, "synthetic_float16": synthetic}, indent=1))
    print("synthetic float16 (N=2000, d=64, λ=1): " + "; ".join(
        f"{row['budget']} ratio={row['ratio']:.6f} overlap={row['overlap']:.2f} "
        f"same order={row['identical_order']}" for row in synthetic))
    print_tables(results)
    print(f"\nJSON: {out}")
    worst = {}
    for kind in ("pca", "seeded"):
        rows = [row for result in results for label, rows in result["budgets"].items()
                for row in rows if row["kind"] == kind and row["param"] == 128]
        if rows:
            worst[kind] = min(rows, key=lambda row: row["ratio"])
    if worst:
        kind = max(worst, key=lambda kind: worst[kind]["ratio"])
        row = worst[kind]
        dim = results[0]["dim"]
        print(f"better at k=128: {kind} (worst case over corpora and budgets; "
              + ", ".join(f"{other} worst {worst[other]['ratio']:.4f}" for other in worst) + ")")
        print(f"projection d={dim} k=128 full_metric_ratio={row['ratio']:.4f} overlap={row['overlap']:.2f}")


if __name__ == "__main__":
    main()
