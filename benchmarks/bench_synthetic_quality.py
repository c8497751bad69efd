"""Paper Sec. 5.1 (arXiv 2505.14826): which n examples best identify a softmax model?

    python benchmarks/bench_synthetic_quality.py [--seeds 3] [--no-write]

A true multinomial logistic model Θ* (d=10 features, L=20 classes) labels every token of a
pool of N examples with M tokens each. Each method picks n examples; a multinomial logistic
regression is fit on the picked examples' tokens (same recipe for every method: LBFGS on
the mean cross-entropy + 1e-4·||Θ||², 100 iterations); we report the max and mean absolute
error of the predicted class probabilities over all tokens of the pool, averaged over seeds.

Pool: example i has a random centre c_i ~ N(0, I) and a per-example token spread
σ_i ~ LogNormal(−0.5, 0.7) along random axes, x_ij = c_i + σ_i ⊙ z_ij: examples differ in
how much new information their tokens carry, as sentences do.

Methods (one ranking each, prefixes give every n):
- tokenod: ``select`` on all token rows of each example (λ = 1).
- sentence_od: ``select`` on one row per example, its mean token embedding (λ = 1).
- uniform: a uniformly random order.
- density: Sachdeva et al. 2024 density sampling: a Gaussian kernel density estimate of each
  example's mean embedding over the pool (bandwidth = median pairwise distance), then
  sampling without replacement with probability ∝ 1 / density (favours sparse regions).
"""

from __future__ import annotations

import argparse
import pathlib
import re

import numpy as np
import torch

from fishersft_ray.select import select

DIM, CLASSES, POOL, TOKENS = 10, 20, 4000, 20
BUDGETS = (100, 200, 500, 1000)
METHODS = ("tokenod", "sentence_od", "uniform", "density")
RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")
SECTION = "## Synthetic quality (paper Sec. 5.1)"


def make_pool(rng):
    theta = rng.normal(size=(DIM, CLASSES))
    centres = rng.normal(size=(POOL, 1, DIM))
    spread = rng.lognormal(-0.5, 0.7, size=(POOL, 1, DIM)) * (rng.random((POOL, 1, DIM)) < 0.5)
    tokens = centres + spread * rng.normal(size=(POOL, TOKENS, DIM))
    logits = tokens @ theta
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    cumulative = probs.cumsum(-1)
    labels = (rng.random((POOL, TOKENS, 1)) > cumulative).sum(-1).clip(max=CLASSES - 1)
    return tokens, labels, probs


def density_order(rng, embeddings):
    sample = embeddings[rng.choice(len(embeddings), min(1000, len(embeddings)), replace=False)]
    distances = np.sqrt(((sample[:, None] - sample[None]) ** 2).sum(-1))
    bandwidth = np.median(distances[distances > 0])
    squared = ((embeddings ** 2).sum(1)[:, None] + (embeddings ** 2).sum(1)[None]
               - 2 * embeddings @ embeddings.T).clip(min=0)
    density = np.exp(-squared / (2 * bandwidth ** 2)).mean(1)
    weights = 1.0 / density
    # Sampling without replacement ∝ weights via exponential keys (Efraimidis–Spirakis).
    keys = rng.exponential(size=len(weights)) / weights
    return np.argsort(keys)


def rankings(rng, tokens):
    largest = max(BUDGETS)
    means = tokens.mean(1)
    return {
        "tokenod": select(list(tokens), largest).indices,
        "sentence_od": select(list(means[:, None, :]), largest).indices,
        "uniform": rng.permutation(len(tokens))[:largest],
        "density": density_order(rng, means)[:largest],
    }


def fit_softmax(features, labels):
    x = torch.as_tensor(features, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.int64)
    theta = torch.zeros(DIM, CLASSES, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([theta], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ theta, y) + 1e-4 * (theta ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return theta.detach().numpy()


def probability_errors(theta, tokens, true_probs):
    logits = tokens.reshape(-1, DIM) @ theta
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    errors = np.abs(probs - true_probs.reshape(-1, CLASSES))
    return errors.max(), errors.mean()


def run(seeds):
    results = {(method, n): [] for method in METHODS for n in BUDGETS}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        tokens, labels, true_probs = make_pool(rng)
        for method, order in rankings(rng, tokens).items():
            for n in BUDGETS:
                picks = order[:n]
                theta = fit_softmax(tokens[picks].reshape(-1, DIM), labels[picks].ravel())
                results[method, n].append(probability_errors(theta, tokens, true_probs))
        print(f"seed {seed} done", flush=True)
    return results


def table(results, seeds):
    lines = [f"| n | method | max abs error (mean ± sd over {seeds} seeds) | mean abs error | lowest max error |",
             "|---|---|---|---|---|"]
    for n in BUDGETS:
        best = min(METHODS, key=lambda m: np.mean([e[0] for e in results[m, n]]))
        for method in METHODS:
            errors = np.array(results[method, n])
            lines.append(f"| {n} | {method} | {errors[:, 0].mean():.4f} ± {errors[:, 0].std():.4f} | "
                         f"{errors[:, 1].mean():.5f} | {'yes' if method == best else ''} |")
    return "\n".join(lines)


def write_section(body):
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = f"{SECTION}\n\n{body}\n"
    pattern = re.compile(rf"{re.escape(SECTION)}\n.*?(?=\n## |\Z)", re.S)
    text = pattern.sub(lambda _: section.rstrip("\n"), text) if pattern.search(text) \
        else text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text if text.endswith("\n") else text + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = run(args.seeds)
    body = table(results, args.seeds)
    print(body)
    if not args.no_write:
        write_section(
            f"Command: `python benchmarks/bench_synthetic_quality.py --seeds {args.seeds}`\n\n"
            f"Pool: N={POOL} examples × M={TOKENS} tokens, d={DIM}, L={CLASSES} classes; setup, "
            f"fit recipe and the density baseline are described in the script's docstring.\n\n{body}")


if __name__ == "__main__":
    main()
