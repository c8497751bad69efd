"""`fishersft-ray evaluate`: does a selected subset fine-tune better than baselines of the same size?

Protocol (one command, seeded, identical for every method):
1. Split the corpus into a held-out test set and the rest; carve a validation split from
   the rest (never from the test set); the remainder is the selection pool.
2. Featurize pool, validation and test with the same model (`keep_states=True`), cached as
   Parquet under `<cache>/<fingerprint>-<part>.parquet` (fingerprint: model + examples of
   that part + featurize settings), so a rerun does not re-embed.
3. Fine-tune on each subset, one mode for the whole run (`--mode`):
   - `head`: only the LM head (the paper's linearised model), from the pretrained head, on
     the subset's target tokens, using the stored pre-logit states. The softmax runs over
     the restricted vocabulary of token ids that occur as targets in pool ∪ validation ∪
     test, for the pretrained and every fine-tuned head alike.
   - `full` / `lora`: the whole model (every parameter, or LoRA adapters on the frozen
     base; `model_tuning`) on the subset's raw examples, mapped from the picks by corpus
     key and tokenised with the featurizer's target masks. The softmax is the model's full
     vocabulary, so these NLLs are not on head mode's scale. Real sizes want a GPU
     (`--train-device cuda`).
   Score: held-out NLL per target token on the test set.
4. The recipe (head: Adam; full/lora: AdamW, weight decay 0, grad clipping 1; both with
   linear decay of lr to 0 over epochs × subset tokens / batch tokens steps) is a rule chosen
   once, by the same protocol in every mode: each (lr, epochs) candidate fine-tunes uniform
   random subsets of the pool at the smallest and largest budget and is scored on the
   validation split; the best mean validation NLL wins and is then used for every method,
   with the same training seed, so only the data differs. The test set is never used.
5. A run is void when the uniform baseline at the largest budget does not beat the
   pretrained head/model on the test set: no method comparison means anything then.

The picks are always made on the pool's featurized states (the selection methods need
them), whatever the fine-tuning mode.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from fishersft_ray import baselines
from fishersft_ray.features import length_cap_tokens
from fishersft_ray.model_tuning import MODEL_MODES, ModelTrainer, ModelTuner, require_peft, resolve_train_device

log = logging.getLogger(__name__)

METHODS = ("tokenod", "tokenod_tokens", "tokenod_loss", "tokenod_loss_tokens", "tokenod_capped",
           "tokenod_capped_tokens", "vopt", "vopt_tokens", "uniform", "length_matched", "uniform_capped_tokens",
           "longest_first", "density", "sentence_od")
RANDOM_METHODS = frozenset({"uniform", "length_matched", "uniform_capped_tokens", "density"})
METHOD_LABELS = {
    "tokenod": "TokenOD (n examples)",
    "tokenod_tokens": "TokenOD (tokens of uniform@n)",
    "tokenod_loss": "TokenOD loss-weighted (n examples)",
    "tokenod_loss_tokens": "TokenOD loss-weighted (tokens of uniform@n)",
    "tokenod_capped": "TokenOD length-capped (n examples)",
    "tokenod_capped_tokens": "TokenOD length-capped (tokens of uniform@n)",
    "vopt": "V-optimal (n examples)",
    "vopt_tokens": "V-optimal (tokens of uniform@n)",
    "uniform": "uniform random (n examples)",
    "length_matched": "random, tokens of TokenOD@n",
    "uniform_capped_tokens": "random length-capped (tokens of uniform@n)",
    "longest_first": "longest first (n examples)",
    "density": "density sampling (n examples)",
    "sentence_od": "sentence-level OD (n examples)",
}
FEATURIZE_CHUNK_ROWS = 256  # progress granularity of the in-process featurization
RECIPE_CANDIDATES = {  # mode → default (--recipe-lrs, --recipe-epochs)
    "head": ("3e-5,1e-4,3e-4,1e-3", "1,3"),
    "full": ("1e-5,3e-5,1e-4", "1"),
    "lora": ("1e-4,3e-4,1e-3", "1"),
}


# --------------------------------------------------------------------------- data


@dataclass
class TokenStates:
    """Pre-logit states of a set of examples, concatenated over their target tokens."""

    states: np.ndarray  # (T, d) float32
    targets: np.ndarray  # (T,) int64 token ids, the token each state predicts
    offsets: np.ndarray  # (N+1,) int64: example i owns rows offsets[i]:offsets[i+1]
    row_index: np.ndarray  # (N,) int64 corpus keys

    @property
    def num_examples(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_targets(self) -> np.ndarray:
        return np.diff(self.offsets)

    def token_rows(self, positions: Sequence[int]) -> np.ndarray:
        """Row numbers of the target tokens of the examples at `positions`."""
        positions = np.asarray(positions, dtype=np.int64)
        starts, lengths = self.offsets[positions], self.num_targets[positions]
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return np.repeat(starts, lengths) + within

    def subset(self, positions: Sequence[int]) -> "TokenStates":
        """The examples at `positions`, in that order."""
        positions = np.asarray(positions, dtype=np.int64)
        rows = self.token_rows(positions)
        offsets = np.zeros(len(positions) + 1, np.int64)
        np.cumsum(self.num_targets[positions], out=offsets[1:])
        return TokenStates(self.states[rows], self.targets[rows], offsets,
                           self.row_index[positions])

    def per_example(self) -> list[np.ndarray]:
        return [self.states[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    @classmethod
    def from_featurized(cls, table: pa.Table, dim: int) -> "TokenStates":
        """From `featurize_local(..., keep_states=True)` output; drops examples without targets."""
        table = table.filter(pc.greater(pc.list_value_length(table.column("target_ids")), 0))
        states = table.column("states").combine_chunks()
        while pa.types.is_list(states.type) or pa.types.is_large_list(states.type):
            states = states.flatten()
        targets = table.column("target_ids").combine_chunks()
        lengths = pc.list_value_length(targets).to_numpy(zero_copy_only=False).astype(np.int64)
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(np.array(states.to_numpy(zero_copy_only=False), np.float32).reshape(-1, dim),  # writable
                   targets.flatten().to_numpy(zero_copy_only=False).astype(np.int64), offsets,
                   table.column("row_index").to_numpy().astype(np.int64))


@dataclass(frozen=True)
class Split:
    """Positions into the corpus's examples: selection pool, validation (from the non-test
    part) and held-out test."""

    pool: np.ndarray
    validation: np.ndarray
    test: np.ndarray


def split_examples(num_examples: int, *, test_fraction: float, validation_size: int, seed: int,
                   max_pool: int | None = None, max_test: int | None = None) -> Split:
    """Seeded split; the pool and test caps subsample (documented in settings.json)."""
    order = np.random.default_rng(seed).permutation(num_examples)
    num_test = int(round(num_examples * test_fraction))
    test, rest = order[:num_test], order[num_test:]
    if validation_size >= len(rest):
        raise ValueError(f"validation_size={validation_size} leaves no pool ({len(rest)} rows)")
    validation, pool = rest[:validation_size], rest[validation_size:]
    if max_test is not None:
        test = test[:max_test]
    if max_pool is not None:
        pool = pool[:max_pool]
    return Split(np.sort(pool), np.sort(validation), np.sort(test))


def make_redundant(pool: TokenStates, *, share: float, num_sources: int, near_copy_noise: float,
                   seed: int) -> tuple[TokenStates, np.ndarray]:
    """Redundant-pool scenario: replace `share` of the pool by copies of `num_sources` rows.

    Copies are exact (identical states and targets) unless `near_copy_noise` > 0, in which
    case each copy's states get Gaussian noise of that size relative to the rows' RMS
    (synthetic near-copies in state space). Returns the pool and each example's content
    group: exact copies share their source's group, everything else has its own.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(pool.num_examples)
    sources = order[:num_sources]
    replaced = order[num_sources:num_sources + int(round(share * pool.num_examples))]
    layout = np.arange(pool.num_examples)
    layout[replaced] = sources[np.arange(len(replaced)) % num_sources]
    redundant = pool.subset(layout)
    groups = np.arange(pool.num_examples)
    if near_copy_noise > 0:
        rows = redundant.token_rows(replaced)
        scale = near_copy_noise * np.sqrt(np.mean(redundant.states[rows] ** 2, axis=1, keepdims=True))
        redundant.states[rows] += (scale * rng.standard_normal((len(rows), pool.states.shape[1]))
                                   ).astype(np.float32)
    else:
        groups = layout.copy()
    return redundant, groups


def restricted_vocabulary(*parts: TokenStates) -> np.ndarray:
    """Sorted token ids occurring as targets in any part (the softmax's support)."""
    return np.unique(np.concatenate([part.targets for part in parts]))


# --------------------------------------------------------------------------- head fine-tuning


@dataclass(frozen=True)
class HeadRecipe:
    """Fixed fine-tuning rule: Adam at `lr` (linear decay to 0), `epochs` passes over the
    subset's target tokens in shuffled batches of `batch_tokens`, at least `min_steps` steps."""

    lr: float
    epochs: float
    batch_tokens: int = 1024
    min_steps: int = 10

    def num_steps(self, num_tokens: int) -> int:
        return max(self.min_steps, math.ceil(self.epochs * num_tokens / self.batch_tokens))


@dataclass
class Head:
    """An LM head restricted to a vocabulary: logits = states @ weight.T (+ bias)."""

    weight: torch.Tensor  # (K, d)
    bias: torch.Tensor | None  # (K,)

    @classmethod
    def restricted(cls, weight: np.ndarray, bias: np.ndarray | None, vocabulary: np.ndarray) -> "Head":
        return cls(torch.tensor(np.asarray(weight)[vocabulary], dtype=torch.float32),
                   None if bias is None else torch.tensor(np.asarray(bias)[vocabulary],
                                                          dtype=torch.float32))

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        logits = states @ self.weight.T
        return logits if self.bias is None else logits + self.bias


def head_nll(head: Head, states: np.ndarray, targets: np.ndarray, chunk_tokens: int = 4096) -> float:
    """Mean NLL per target token; `targets` index the head's (restricted) vocabulary."""
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(targets), chunk_tokens):
            x = torch.from_numpy(states[start:start + chunk_tokens])
            y = torch.from_numpy(targets[start:start + chunk_tokens])
            total += float(torch.nn.functional.cross_entropy(head.logits(x), y, reduction="sum"))
    return total / len(targets)


def finetune_head(head: Head, states: np.ndarray, targets: np.ndarray, recipe: HeadRecipe,
                  seed: int = 0) -> Head:
    """Fine-tune a copy of `head` on (state, target) pairs with the recipe; same seed for
    every method so only the data differs."""
    weight = head.weight.clone().requires_grad_(True)
    bias = None if head.bias is None else head.bias.clone().requires_grad_(True)
    tuned = Head(weight, bias)
    parameters = [p for p in (weight, bias) if p is not None]
    steps = recipe.num_steps(len(targets))
    optimizer = torch.optim.Adam(parameters, lr=recipe.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    x_all, y_all = torch.from_numpy(states), torch.from_numpy(targets)
    generator = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(len(targets), generator=generator), 0
    for _ in range(steps):
        if cursor >= len(order):
            order, cursor = torch.randperm(len(targets), generator=generator), 0
        batch = order[cursor:cursor + recipe.batch_tokens]
        cursor += recipe.batch_tokens
        loss = torch.nn.functional.cross_entropy(tuned.logits(x_all[batch]), y_all[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return Head(weight.detach(), None if bias is None else bias.detach())


# --------------------------------------------------------------------------- picks


@dataclass
class Pick:
    method: str
    budget: int  # the example budget n this pick is compared at
    seed: int | None
    positions: np.ndarray


def example_embeddings(pool: TokenStates) -> np.ndarray:
    return baselines.mean_embeddings(pool.states, pool.offsets)


def pool_features(pool: TokenStates, token_weights: np.ndarray | None = None):
    """The pool as the product's FeatureSet; ``token_weights`` (one per target token) scale
    the rows by √w exactly as the featurizer's ``token_weights="loss"`` does."""
    from fishersft_ray.features import FeatureSet

    states = pool.states if token_weights is None else pool.states * np.sqrt(token_weights)[:, None]
    per_example = [states[a:b] for a, b in zip(pool.offsets[:-1], pool.offsets[1:])]
    return FeatureSet.from_examples(per_example, num_targets=pool.num_targets, row_index=pool.row_index)


def pool_loss_weights(pool: TokenStates, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """``featurize.loss_weights`` of every pool token under the pretrained (full-vocabulary) head."""
    from fishersft_ray.featurize import loss_weights

    with torch.no_grad():
        return loss_weights(torch.from_numpy(pool.states), torch.from_numpy(pool.targets),
                            torch.from_numpy(np.asarray(weight, np.float32)),
                            None if bias is None else torch.from_numpy(np.asarray(bias, np.float32))
                            ).numpy()


def pick_subsets(pool: TokenStates, budgets: Sequence[int], seeds: Sequence[int], methods: Sequence[str],
                 *, lam: float, device: str = "cpu", token_weights: np.ndarray | None = None,
                 lam_relative: float | None = None, length_cap: str = "p50") -> list[Pick]:
    """Every method's subset at every budget (random methods once per seed).

    Example-budget rankings (TokenOD, sentence OD, longest first, a seed's density order) are
    nested, so one run to the largest budget gives every smaller budget as a prefix.
    ``token_weights`` (per pool token) are needed by the loss-weighted TokenOD methods.
    ``lam_relative``: TokenOD's λ is this × the mean ‖x‖² per token of the (weighted) pool,
    as `select --lam-relative` resolves it; otherwise ``lam``. ``length_cap``: the rule of
    `select --length-cap` for the length-capped methods (TokenOD and its random control,
    both picked among the pool's examples no longer than the cap).
    """
    from fishersft_ray.tokenod import select as select_with_lam

    def lam_for(pool_set) -> float:
        return lam if lam_relative is None else lam_relative * pool_set.mean_token_energy()

    def select(pool_set, budget, **kwargs):
        started = time.time()
        selection = select_with_lam(pool_set, budget, lam=lam_for(pool_set), **kwargs)
        log.info("TokenOD %s budget %g: %d picks, %d evaluations, %.0f s", kwargs.get("budget_unit"),
                 budget, len(selection.indices), selection.evaluations, time.time() - started)
        return selection

    features, weighted = pool_features(pool), None
    if {"tokenod_loss", "tokenod_loss_tokens"} & set(methods):
        if token_weights is None:
            raise ValueError("loss-weighted TokenOD methods need token_weights")
        weighted = pool_features(pool, token_weights)
    embeddings = example_embeddings(pool)
    costs = pool.num_targets
    largest = max(budgets)
    picks: list[Pick] = []

    def tokens(positions):
        return int(costs[positions].sum())

    uniform = {(n, s): baselines.uniform_random(features, n, seed=s) for n in budgets for s in seeds}
    needs_tokenod = {"tokenod", "length_matched"} & set(methods)
    tokenod_order = (np.asarray(select(features, largest, method="lazy",
                                       budget_unit="examples", device=device).indices)
                     if needs_tokenod else None)
    sentence_order = (baselines.sentence_od(features, embeddings, largest, lam=lam, device=device)
                      if "sentence_od" in methods else None)
    density_orders = ({s: baselines.density_sampling(features, embeddings, largest, seed=s) for s in seeds}
                      if "density" in methods else None)
    loss_order = (np.asarray(select(weighted, largest, method="lazy", budget_unit="examples",
                                    device=device).indices) if "tokenod_loss" in methods else None)
    capped, eligible = None, None
    if {"tokenod_capped", "tokenod_capped_tokens", "uniform_capped_tokens"} & set(methods):
        eligible = np.flatnonzero(costs <= length_cap_tokens(length_cap, costs))
        capped = features.subset(eligible)
    capped_order = (eligible[select(capped, largest, method="lazy", budget_unit="examples",
                                    device=device).indices] if "tokenod_capped" in methods else None)
    vopt_order = (baselines.v_optimal(features, largest, lam=lam_for(features), device=device)
                  if "vopt" in methods else None)
    for n in budgets:
        uniform_tokens = float(np.mean([tokens(uniform[n, s]) for s in seeds]))
        if "vopt" in methods:
            picks.append(Pick("vopt", n, None, vopt_order[:n]))
        if "vopt_tokens" in methods:
            started = time.time()
            picks.append(Pick("vopt_tokens", n, None, baselines.v_optimal(
                features, uniform_tokens, budget_unit="tokens", lam=lam_for(features), device=device)))
            log.info("V-optimal tokens budget %g: %.0f s", uniform_tokens, time.time() - started)
        if "tokenod" in methods:
            picks.append(Pick("tokenod", n, None, tokenod_order[:n]))
        if "tokenod_loss" in methods:
            picks.append(Pick("tokenod_loss", n, None, loss_order[:n]))
        if "tokenod_capped" in methods:
            picks.append(Pick("tokenod_capped", n, None, capped_order[:n]))
        for method, pool_set, positions in (("tokenod_tokens", features, None),
                                            ("tokenod_loss_tokens", weighted, None),
                                            ("tokenod_capped_tokens", capped, eligible)):
            if method in methods:
                selection = select(pool_set, uniform_tokens, method="lazy",
                                   budget_unit="tokens", device=device)
                picked = np.asarray(selection.indices, np.int64)
                picks.append(Pick(method, n, None, picked if positions is None else positions[picked]))
        if "longest_first" in methods:
            picks.append(Pick("longest_first", n, None, baselines.longest_first(features, n)))
        if "sentence_od" in methods:
            picks.append(Pick("sentence_od", n, None, sentence_order[:n]))
        for s in seeds:
            if "uniform" in methods:
                picks.append(Pick("uniform", n, s, uniform[n, s]))
            if "length_matched" in methods:
                picks.append(Pick("length_matched", n, s, baselines.uniform_random(
                    features, tokens(tokenod_order[:n]), budget_unit="tokens", seed=s)))
            if "uniform_capped_tokens" in methods:  # the control of the capped TokenOD methods
                picks.append(Pick("uniform_capped_tokens", n, s, eligible[baselines.uniform_random(
                    capped, uniform_tokens, budget_unit="tokens", seed=s)]))
            if "density" in methods:
                picks.append(Pick("density", n, s, density_orders[s][:n]))
    return picks


def redundancy_counts(positions: np.ndarray, groups: np.ndarray, embeddings: np.ndarray
                      ) -> tuple[int, int]:
    """(picks that exactly copy an earlier pick, picks with a cosine ≥ 0.98 twin in the subset),
    the second measured as the job's manifest does (features.count_near_twins)."""
    from fishersft_ray.features import count_near_twins

    exact_copies = len(positions) - len(np.unique(groups[positions]))
    return int(exact_copies), count_near_twins(embeddings[positions])


# --------------------------------------------------------------------------- protocol


@dataclass
class EvalSettings:
    budgets: list[int]
    seeds: int = 3
    methods: list[str] = dataclasses.field(default_factory=lambda: list(METHODS))
    lam: float = 1.0
    lam_relative: float | None = None
    length_cap: str = "p50"
    recipe_lrs: list[float] = dataclasses.field(default_factory=lambda: [3e-5, 1e-4, 3e-4, 1e-3])
    recipe_epochs: list[float] = dataclasses.field(default_factory=lambda: [1.0, 3.0])
    batch_tokens: int = 1024
    train_seed: int = 0
    device: str = "cpu"


class Scorer(Protocol):
    def nll(self, part: str) -> float:
        """Mean NLL per target token on "validation" or "test"."""


class Trainer(Protocol):
    """One fine-tuning mode, as the protocol sees it: `info` (facts for settings.json:
    "tuned" — what is compared with its pretrained self —, "optimizer", ...), `recipe(lr,
    epochs)`, `pretrained()` and `fit(pool positions, recipe)`, the last two returning a
    Scorer (valid until the next fit: whole-model trainers tune in place)."""

    info: dict

    def recipe(self, lr: float, epochs: float): ...

    def pretrained(self) -> Scorer: ...

    def fit(self, positions: np.ndarray, recipe) -> Scorer: ...


@dataclass
class HeadScorer:
    head: Head
    parts: dict[str, TokenStates]

    def nll(self, part: str) -> float:
        return head_nll(self.head, self.parts[part].states, self.parts[part].targets)


class HeadTrainer:
    """`head` mode: fine-tunes the LM head on stored states, softmax over the targets' vocabulary."""

    def __init__(self, pool: TokenStates, validation: TokenStates, test: TokenStates, weight: np.ndarray,
                 bias: np.ndarray | None, *, batch_tokens: int, seed: int):
        vocabulary = restricted_vocabulary(pool, validation, test)
        self.head = Head.restricted(weight, bias, vocabulary)
        self.parts = {name: dataclasses.replace(part, targets=np.searchsorted(vocabulary, part.targets))
                      for name, part in (("pool", pool), ("validation", validation), ("test", test))}
        self.batch_tokens, self.seed = batch_tokens, seed
        self.info = {"tuned": "head", "optimizer": "Adam", "vocabulary_size": int(len(vocabulary)),
                     "softmax": "restricted to the token ids occurring as targets in pool, validation, test"}

    def recipe(self, lr: float, epochs: float) -> HeadRecipe:
        return HeadRecipe(lr=lr, epochs=epochs, batch_tokens=self.batch_tokens)

    def pretrained(self) -> HeadScorer:
        return HeadScorer(self.head, self.parts)

    def fit(self, positions: np.ndarray, recipe: HeadRecipe) -> HeadScorer:
        subset = self.parts["pool"].subset(positions)
        tuned = finetune_head(self.head, subset.states, subset.targets, recipe, self.seed)
        return HeadScorer(tuned, self.parts)


def choose_recipe(pool: TokenStates, trainer: Trainer, settings: EvalSettings) -> tuple[object, list[dict]]:
    """Pick the recipe once: uniform subsets of the pool at the smallest and largest budget,
    scored by mean validation NLL. Never uses the test set; never looks at any method."""
    subsets = [baselines.uniform_random(pool, n, seed=settings.train_seed)
               for n in sorted({min(settings.budgets), max(settings.budgets)})]
    scores = []
    for lr in settings.recipe_lrs:
        for epochs in settings.recipe_epochs:
            recipe = trainer.recipe(lr, epochs)
            nlls = [trainer.fit(positions, recipe).nll("validation") for positions in subsets]
            scores.append({"lr": lr, "epochs": epochs, "validation_nll": float(np.mean(nlls)),
                           "per_budget": nlls})
            log.info("recipe lr=%g epochs=%g: validation NLL %.4f", lr, epochs, np.mean(nlls))
    best = min(scores, key=lambda row: row["validation_nll"])
    return trainer.recipe(best["lr"], best["epochs"]), scores


class ProtocolCheckpoint:
    """The finished parts of a protocol run, saved after each fine-tune in one JSON file, so
    an interrupted run (a long whole-model evaluation on CPU) loses nothing: a rerun of the
    same command reuses the chosen recipe, the pretrained scores and every finished run.

    ``key`` ties the file to one run's settings and data; a file written by another run is
    ignored (and overwritten). Picks are not stored: they are deterministic and recomputed.
    """

    def __init__(self, path: str, key: str):
        self.path, self.key = path, key
        self.state = {"key": key, "recipe": None, "pretrained": None, "runs": {}}
        if os.path.exists(path):
            with open(path) as handle:
                saved = json.load(handle)
            if saved.get("key") == key:
                self.state = saved
                log.info("resuming from %s: %d finished runs", path, len(saved["runs"]))
            else:
                log.info("ignoring %s: written by a run with other settings or data", path)

    @staticmethod
    def run_key(method: str, budget: int, seed) -> str:
        return f"{method}/{budget}/{seed}"

    def save(self, **updates) -> None:
        self.state.update(updates)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path + ".partial", "w") as handle:
            json.dump(self.state, handle, default=str)
        os.replace(self.path + ".partial", self.path)


def run_protocol(pool: TokenStates, validation: TokenStates, test: TokenStates, weight: np.ndarray,
                 bias: np.ndarray | None, settings: EvalSettings, groups: np.ndarray | None = None,
                 trainer: Trainer | None = None, checkpoint: ProtocolCheckpoint | None = None) -> dict:
    """Everything after featurization: recipe, picks, fine-tuning, scores.

    ``trainer`` is the fine-tuning mode (default: `HeadTrainer` on these parts); the picks
    always come from the parts' states, and ``weight``/``bias`` (the pretrained LM head)
    also give the loss-weighted methods their token weights. Returns {"rows": per-run
    dicts, "summary": per (method, budget) dicts, "info": settings and protocol facts
    (the trainer's, pretrained NLL, recipe, void flag)}.
    """
    unknown = set(settings.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    for name, part in (("pool", pool), ("validation", validation), ("test", test)):
        if not part.num_examples:
            raise ValueError(f"the {name} split has no example with a target token to train or score on")
    token_weights = (pool_loss_weights(pool, weight, bias)
                     if {"tokenod_loss", "tokenod_loss_tokens"} & set(settings.methods) else None)
    trainer = trainer or HeadTrainer(pool, validation, test, weight, bias,
                                     batch_tokens=settings.batch_tokens, seed=settings.train_seed)
    tuned = trainer.info["tuned"]
    groups = np.arange(pool.num_examples) if groups is None else groups
    started = time.time()
    saved = checkpoint.state if checkpoint is not None else {"recipe": None, "pretrained": None, "runs": {}}
    if saved["recipe"] is None:
        recipe, recipe_scores = choose_recipe(pool, trainer, settings)
        saved = {**saved, "recipe": {"lr": recipe.lr, "epochs": recipe.epochs, "scores": recipe_scores}}
        if checkpoint is not None:
            checkpoint.save(recipe=saved["recipe"])
    recipe, recipe_scores = trainer.recipe(saved["recipe"]["lr"], saved["recipe"]["epochs"]), saved["recipe"]["scores"]
    if saved["pretrained"] is None:
        pretrained = trainer.pretrained()
        saved = {**saved, "pretrained": [pretrained.nll("validation"), pretrained.nll("test")]}
        if checkpoint is not None:
            checkpoint.save(pretrained=saved["pretrained"])
    pretrained_validation, pretrained_test = saved["pretrained"]
    log.info("recipe %s (pretrained validation NLL %.4f)", recipe, pretrained_validation)

    picks = pick_subsets(pool, settings.budgets, list(range(settings.seeds)), settings.methods,
                         lam=settings.lam, device=settings.device, token_weights=token_weights,
                         lam_relative=settings.lam_relative, length_cap=settings.length_cap)
    embeddings = example_embeddings(pool)
    rows = []
    for pick in picks:
        run_key = ProtocolCheckpoint.run_key(pick.method, pick.budget, pick.seed)
        if run_key in saved["runs"]:
            test_nll = saved["runs"][run_key]
        else:
            test_nll = trainer.fit(pick.positions, recipe).nll("test")
            saved["runs"][run_key] = test_nll
            if checkpoint is not None:
                checkpoint.save(runs=saved["runs"])
        exact_copies, near_twins = redundancy_counts(pick.positions, groups, embeddings)
        rows.append({"method": pick.method, "budget": pick.budget, "seed": pick.seed,
                     "examples": len(pick.positions), "tokens": int(pool.num_targets[pick.positions].sum()),
                     "test_nll": test_nll, "exact_copies": exact_copies, "near_twins": near_twins})
        log.info("%s n=%d seed=%s: %d examples, %d tokens, test NLL %.4f", pick.method, pick.budget,
                 pick.seed, rows[-1]["examples"], rows[-1]["tokens"], rows[-1]["test_nll"])
    summary = summarise(rows)
    largest_uniform = [r for r in summary if r["method"] == "uniform" and r["budget"] == max(settings.budgets)]
    void = bool(largest_uniform) and largest_uniform[0]["test_nll_mean"] >= pretrained_test
    if void:
        log.warning("VOID: uniform at n=%d does not beat the pretrained %s (%.4f >= %.4f)",
                    max(settings.budgets), tuned, largest_uniform[0]["test_nll_mean"], pretrained_test)
    info = {"settings": dataclasses.asdict(settings)} | trainer.info | {
            "pool_examples": pool.num_examples, "pool_tokens": int(pool.targets.size),
            "validation_examples": validation.num_examples, "test_examples": test.num_examples,
            "test_tokens": int(test.targets.size), "recipe": dataclasses.asdict(recipe),
            "recipe_search": recipe_scores, "pretrained_validation_nll": pretrained_validation,
            "pretrained_test_nll": pretrained_test, "void": void,
            "exact_copy_rows_in_pool": int(pool.num_examples - len(np.unique(groups))),
            "protocol_seconds": round(time.time() - started, 1)}
    return {"rows": rows, "summary": summary, "info": info}


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and sample std (ddof=1; 0 for one run) per (method, budget), in METHODS order."""
    keys = sorted({(r["method"], r["budget"]) for r in rows},
                  key=lambda key: (METHODS.index(key[0]), key[1]))
    summary = []
    for method, budget in keys:
        runs = [r for r in rows if r["method"] == method and r["budget"] == budget]
        entry = {"method": method, "budget": budget, "runs": len(runs)}
        for column in ("test_nll", "tokens", "examples", "exact_copies", "near_twins"):
            values = np.array([r[column] for r in runs], dtype=np.float64)
            entry[f"{column}_mean"] = float(values.mean())
            entry[f"{column}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


# --------------------------------------------------------------------------- outputs


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
        lines.append(f"| {row['budget']} | {METHOD_LABELS[row['method']]} | {row['test_nll_mean']:.4f}{std} "
                     f"| {row['tokens_mean']:.0f} | {row['examples_mean']:.0f} "
                     f"| {row['exact_copies_mean']:.1f} | {row['near_twins_mean']:.1f} | {row['runs']} |")
    return "\n".join(lines) + "\n"


def plot_results(summary: list[dict], info: dict, path: str, title: str) -> None:
    """Two panels: NLL vs example budget, NLL vs target tokens actually used."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in METHODS:
        entries = [row for row in summary if row["method"] == method]
        if not entries:
            continue
        nll = [row["test_nll_mean"] for row in entries]
        err = [row["test_nll_std"] for row in entries]
        axes[0].errorbar([row["budget"] for row in entries], nll, yerr=err, marker="o", capsize=3,
                         label=METHOD_LABELS[method])
        axes[1].errorbar([row["tokens_mean"] for row in entries], nll, yerr=err, marker="o", capsize=3,
                         label=METHOD_LABELS[method])
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
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_outputs(result: dict, output: str, title: str) -> dict[str, str]:
    """results.csv (one line per run), summary.csv, summary.md, nll_vs_budget.png, settings.json."""
    os.makedirs(output, exist_ok=True)
    paths = {name: os.path.join(output, name) for name in
             ("results.csv", "summary.csv", "summary.md", "nll_vs_budget.png", "settings.json")}
    for name, records in (("results.csv", result["rows"]), ("summary.csv", result["summary"])):
        with open(paths[name], "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    with open(paths["summary.md"], "w") as handle:
        handle.write(f"## {title}\n\n" + markdown_table(result["summary"], result["info"]))
    plot_results(result["summary"], result["info"], paths["nll_vs_budget.png"], title)
    with open(paths["settings.json"], "w") as handle:
        json.dump(result["info"], handle, indent=2, default=str)
    return paths


# --------------------------------------------------------------------------- corpus → states


def featurize_cached(examples: pa.Table, part: str, model, config, cache_dir: str) -> pa.Table:
    """Featurize `examples` with states kept, cached as `<cache_dir>/<fingerprint>-<part>.parquet`."""
    import pyarrow.parquet as pq

    from fishersft_ray.featurize import Featurizer
    from fishersft_ray.storage import fingerprint

    key = fingerprint(model.fingerprint, examples, dataclasses.asdict(config) | {"model": None})
    path = os.path.join(cache_dir, f"{key}-{part}.parquet")
    if os.path.exists(path):
        log.info("%s: reusing featurized cache %s", part, path)
        return pq.read_table(path)
    started, chunks, featurizer = time.time(), [], Featurizer(config)  # loads the model once
    for start in range(0, examples.num_rows, FEATURIZE_CHUNK_ROWS):
        chunks.append(featurizer(examples.slice(start, FEATURIZE_CHUNK_ROWS)))
        log.info("%s: featurized %d/%d examples (%.0f s)", part, min(start + FEATURIZE_CHUNK_ROWS,
                 examples.num_rows), examples.num_rows, time.time() - started)
    table = pa.concat_tables(chunks)
    os.makedirs(cache_dir, exist_ok=True)
    pq.write_table(table, path + ".partial")
    os.replace(path + ".partial", path)
    log.info("%s: featurized %d examples in %.0f s -> %s", part, examples.num_rows,
             time.time() - started, path)
    return table


def corpus_states(args) -> tuple[dict[str, TokenStates], np.ndarray, np.ndarray | None, dict, pa.Table]:
    """Read, split and featurize the corpus; returns parts, LM head weight, bias, facts and the
    corpus's examples table (whole-model modes train on its rows, keyed by `row_index`)."""
    from fishersft_ray.corpus import CorpusSpec, read_corpus
    from fishersft_ray.featurize import FeaturizeConfig, lm_head_weight, resolve_model

    corpus = read_corpus(CorpusSpec(path=args.input, format=args.format))
    split = split_examples(corpus.examples.num_rows, test_fraction=args.test_fraction,
                           validation_size=args.validation_size, seed=args.split_seed,
                           max_pool=args.max_pool, max_test=args.max_test)
    model = resolve_model(args.model)
    config = FeaturizeConfig(model=model.path, keep_states=True)
    weight, bias = lm_head_weight(model)
    cache_dir = args.cache_dir or os.path.join(args.output, "cache")
    parts = {}
    for part, positions in (("pool", split.pool), ("validation", split.validation), ("test", split.test)):
        table = featurize_cached(corpus.examples.take(pa.array(positions)), part, model, config, cache_dir)
        parts[part] = TokenStates.from_featurized(table, weight.shape[1])
    facts = {"input": args.input, "format": corpus.format, "corpus_stats": corpus.stats,
             "model": model.name, "model_path": model.path, "model_fingerprint": model.fingerprint,
             "split_seed": args.split_seed,
             "split_sizes": {k: int(len(v)) for k, v in dataclasses.asdict(split).items()},
             "cache_dir": cache_dir}
    return parts, weight, bias, facts, corpus.examples


def _numbers(text: str, kind=float) -> list:
    return [kind(value) for value in text.split(",") if value.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fishersft-ray evaluate",
        description="Fine-tune on subsets picked by TokenOD and baselines; report held-out NLL.")
    parser.add_argument("--input", required=True, help="corpus file/dir/glob (txt, jsonl, json, parquet)")
    parser.add_argument("--output", required=True, help="directory for tables, plot, settings.json")
    parser.add_argument("--format", default="auto", help="auto | text | alpaca | chat")
    parser.add_argument("--model", default=None, help="HF id, local dir or GGUF (default: offline SmolLM2-135M)")
    parser.add_argument("--mode", default="head", choices=["head", *MODEL_MODES],
                        help="head: fine-tune the LM head on stored states; full: every parameter of the "
                             "model; lora: LoRA adapters (r=16) on all linear layers")
    parser.add_argument("--train-device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="full/lora fine-tuning device (auto: cuda if available)")
    parser.add_argument("--budgets", default="100,250,500,1000", help="example budgets, comma-separated")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per random method")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    parser.add_argument("--lam", type=float, default=1.0, help="TokenOD / sentence-OD prior λ")
    parser.add_argument("--lam-relative", type=float, default=None,
                        help="TokenOD's λ = this × the pool's mean ‖x‖² per target token (as select's)")
    parser.add_argument("--length-cap", default="p50",
                        help="cap of the length-capped TokenOD methods, as select's --length-cap")
    parser.add_argument("--test-fraction", type=float, default=1 / 6)
    parser.add_argument("--validation-size", type=int, default=300, help="rows carved from the non-test part")
    parser.add_argument("--max-pool", type=int, default=None, help="subsample the pool to this many rows")
    parser.add_argument("--max-test", type=int, default=None, help="subsample the test set to this many rows")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--recipe-lrs", default=None,
                        help="recipe candidates: lr (default: " + "; ".join(
                            f"{mode} {lrs}" for mode, (lrs, _) in RECIPE_CANDIDATES.items()) + ")")
    parser.add_argument("--recipe-epochs", default=None,
                        help="recipe candidates: epochs (default: " + "; ".join(
                            f"{mode} {epochs}" for mode, (_, epochs) in RECIPE_CANDIDATES.items()) + ")")
    parser.add_argument("--batch-tokens", type=int, default=1024,
                        help="tokens per optimizer step (head: target tokens; full/lora: input tokens)")
    parser.add_argument("--redundant-share", type=float, default=0.0,
                        help="share of the pool replaced by copies of --redundant-sources rows")
    parser.add_argument("--redundant-sources", type=int, default=60)
    parser.add_argument("--near-copy-noise", type=float, default=0.0,
                        help="> 0: copies become near-copies (relative Gaussian noise on their states; "
                             "whole-model modes still train on the source rows' text)")
    parser.add_argument("--cache-dir", default=None, help="featurized-table cache (default OUTPUT/cache)")
    parser.add_argument("--device", default="cpu", help="device for the selection")
    parser.add_argument("--title", default=None, help="plot/table title (default: the input's name)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `fishersft-ray evaluate` (and `python -m fishersft_ray.evaluate`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    default_lrs, default_epochs = RECIPE_CANDIDATES[args.mode]
    settings = EvalSettings(budgets=_numbers(args.budgets, int), seeds=args.seeds,
                            methods=[m.strip() for m in args.methods.split(",") if m.strip()],
                            lam=args.lam, lam_relative=args.lam_relative, length_cap=args.length_cap,
                            recipe_lrs=_numbers(args.recipe_lrs or default_lrs),
                            recipe_epochs=_numbers(args.recipe_epochs or default_epochs),
                            batch_tokens=args.batch_tokens, device=args.device)
    try:  # before the featurization, not after it
        if args.mode == "lora":
            require_peft()
        train_device = resolve_train_device(args.train_device) if args.mode in MODEL_MODES else None
    except (RuntimeError, ValueError) as exc:
        parser.error(str(exc))
    parts, weight, bias, facts, examples = corpus_states(args)
    pool, groups = parts["pool"], None
    if args.redundant_share > 0:
        pool, groups = make_redundant(pool, share=args.redundant_share, num_sources=args.redundant_sources,
                                      near_copy_noise=args.near_copy_noise, seed=args.split_seed)
        facts["redundant"] = {"share": args.redundant_share, "sources": args.redundant_sources,
                              "near_copy_noise": args.near_copy_noise}
    trainer = None
    if args.mode in MODEL_MODES:
        tuner = ModelTuner(facts["model_path"], args.mode, device=train_device, seed=settings.train_seed)
        trainer = ModelTrainer(tuner, examples, {"pool": pool, "validation": parts["validation"],
                                                 "test": parts["test"]}, batch_tokens=settings.batch_tokens)
    from fishersft_ray.storage import fingerprint

    checkpoint = ProtocolCheckpoint(os.path.join(args.output, "_checkpoint", "evaluate.json"), fingerprint(
        dataclasses.asdict(settings), facts, args.mode, args.train_device, pool.row_index.tolist(), list(pool.states.shape)))
    result = run_protocol(pool, parts["validation"], parts["test"], weight, bias, settings, groups, trainer,
                          checkpoint)
    result["info"] = facts | {"mode": args.mode} | result["info"]
    paths = write_outputs(result, args.output, args.title or os.path.basename(args.input))
    print(markdown_table(result["summary"], result["info"]))
    print("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
