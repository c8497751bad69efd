"""The evaluation protocol: does a selected subset fine-tune better than baselines of the same size?

Protocol (one command, seeded, identical for every method):
1. Split the corpus into a held-out test set and the rest; carve a validation split from
   the rest (never from the test set); the remainder is the selection pool.
2. Featurize with the same model, storing each target token's state (`keep_states`), in the
   feature cache that `select` uses (run/feature_cache.py, one key rule): a cache that
   `select --keep-states --features PATH` filled for the same corpus, model and settings is
   read, not embedded again (evaluate/run.py).
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
   Score: held-out NLL per target token on the test set. With groups (`--group-field`,
   `--group-by-file`), test and validation hold the same number of rows from every group, and
   each run is also scored per group (`nll_<group>`), by the groups' mean (`nll_macro`) and
   their worst (`nll_worst`), all from one scoring pass (`part_scores`).
4. The recipe (head: Adam; full/lora: AdamW, weight decay 0, grad clipping 1; both with
   linear decay of lr to 0 over epochs × subset tokens / batch tokens steps) is a rule chosen
   once, by the same protocol in every mode: each (lr, epochs) candidate fine-tunes uniform
   random subsets of the pool at the smallest and largest budget and is scored on the
   validation split; the best mean validation NLL (with groups: validation macro NLL) wins
   and is then used for every method,
   with the same training seed, so only the data differs. The test set is never used.
5. A run is void when the uniform baseline at the largest budget does not beat the
   pretrained head/model on the test set: no method comparison means anything then.

The picks are always made on the pool's featurized states (the selection methods need
them), whatever the fine-tuning mode.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Protocol as Interface

import numpy as np
import torch

from fishersft_ray.config import Protocol, Rules
from fishersft_ray.features import FeatureSet, TokenStates, count_near_twins
from fishersft_ray.evaluate.data import GroupCodes
from fishersft_ray.evaluate.head import HeadTrainer
from fishersft_ray.evaluate.methods import METHODS, check_methods, default_methods, pick_subsets
from fishersft_ray.io.storage import Location
from fishersft_ray.select.samplers import uniform_random

log = logging.getLogger(__name__)

RECIPE_CANDIDATES = {  # mode → default (--recipe-lrs, --recipe-epochs)
    "head": ([3e-5, 1e-4, 3e-4, 1e-3], [1.0, 3.0]),
    "full": ([1e-5, 3e-5, 1e-4], [1.0]),
    "lora": ([1e-4, 3e-4, 1e-3], [1.0]),
}


def with_recipe_defaults(protocol: Protocol, mode: str) -> Protocol:
    """``protocol`` with the mode's default recipe candidates where none were given."""
    lrs, epochs = RECIPE_CANDIDATES[mode]
    return dataclasses.replace(protocol, recipe_lrs=protocol.recipe_lrs or lrs,
                               recipe_epochs=protocol.recipe_epochs or epochs)


class Scorer(Interface):
    def nll(self, part: str) -> float:
        """Mean NLL per target token on "validation" or "test"."""

    def example_losses(self, part: str) -> tuple[np.ndarray, np.ndarray]:
        """Per example of the part: (its summed NLL over its target tokens, its target tokens)."""


def part_scores(scorer: Scorer, part: str, group_codes: GroupCodes | None = None) -> dict[str, float]:
    """{"nll": mean NLL per target token of the part}; with groups also "nll_<group>" (the
    group's mean NLL per target token), "nll_macro" (the mean of those) and "nll_worst" (their
    max), all from one pass over the part's examples."""
    if group_codes is None:
        return {"nll": scorer.nll(part)}
    losses, tokens = scorer.example_losses(part)
    codes, count = group_codes.of(part), len(group_codes.names)
    per_group = np.bincount(codes, losses, count) / np.bincount(codes, tokens, count)
    return {"nll": float(losses.sum() / tokens.sum()), "nll_macro": float(per_group.mean()),
            "nll_worst": float(per_group.max()),
            **{f"nll_{name}": float(value) for name, value in zip(group_codes.names, per_group)}}


class Trainer(Interface):
    """One fine-tuning mode, as the protocol sees it: `info` (facts for settings.json:
    "tuned" — what is compared with its pretrained self —, "optimizer", ...), `recipe(lr,
    epochs)`, `pretrained()` and `fit(pool positions, recipe)`, the last two returning a
    Scorer (valid until the next fit: whole-model trainers tune in place)."""

    info: dict

    def recipe(self, lr: float, epochs: float): ...

    def pretrained(self) -> Scorer: ...

    def fit(self, positions: np.ndarray, recipe) -> Scorer: ...


def choose_recipe(pool: TokenStates, trainer: Trainer, protocol: Protocol,
                  group_codes: GroupCodes | None = None) -> tuple[object, list[dict]]:
    """Pick the recipe once: uniform subsets of the pool at the smallest and largest budget,
    scored by mean validation NLL (with groups: mean validation macro NLL). Never uses the
    test set; never looks at any method."""
    subsets = [uniform_random(pool, n, seed=protocol.train_seed)
               for n in sorted({min(protocol.budgets), max(protocol.budgets)})]
    rule = "validation_nll" if group_codes is None else "validation_nll_macro"
    scores = []
    for lr in protocol.recipe_lrs:
        for epochs in protocol.recipe_epochs:
            recipe = trainer.recipe(lr, epochs)
            scored = [part_scores(trainer.fit(positions, recipe), "validation", group_codes) for positions in subsets]
            nlls = [entry["nll"] for entry in scored]
            scores.append({"lr": lr, "epochs": epochs, "validation_nll": float(np.mean(nlls)), "per_budget": nlls})
            if group_codes is not None:
                macro = [entry["nll_macro"] for entry in scored]
                scores[-1] |= {"validation_nll_macro": float(np.mean(macro)), "per_budget_macro": macro}
            log.info("recipe lr=%g epochs=%g: %s %.4f", lr, epochs, rule, scores[-1][rule])
    best = min(scores, key=lambda row: row[rule])
    return trainer.recipe(best["lr"], best["epochs"]), scores


class ProtocolCheckpoint:
    """The finished parts of a protocol run, saved after each fine-tune in one JSON file
    (``<output>/_checkpoint/evaluate.json``), so an interrupted run (a long whole-model
    evaluation on CPU) loses nothing: a rerun of the same command reuses the chosen recipe,
    the pretrained scores and every finished run.

    ``key`` ties the file to one run's settings and data; a file written by another run is
    ignored (and overwritten). Picks are not stored: they are deterministic and recomputed.
    """

    NAME = "_checkpoint/evaluate.json"

    def __init__(self, output: Location, key: str):
        self.output, self.key = output, key
        self.state = {"key": key, "recipe": None, "pretrained": None, "runs": {}}
        if output.exists(self.NAME):
            saved = output.read_json(self.NAME)
            if saved.get("key") == key:
                self.state = saved
                log.info("resuming from %s: %d finished runs", output.child(self.NAME).url, len(saved["runs"]))
            else:
                log.info("ignoring %s: written by a run with other settings or data", output.child(self.NAME).url)

    @staticmethod
    def run_key(method: str, budget: int, seed) -> str:
        return f"{method}/{budget}/{seed}"

    def save(self, **updates) -> None:
        self.state.update(updates)
        self.output.write_json(self.NAME, self.state)

    def clear(self) -> None:
        self.output.remove(self.NAME)


def pool_loss_weights(pool: TokenStates, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """``featurizer.loss_weights`` of every pool token under the pretrained (full-vocabulary) head."""
    from fishersft_ray.featurize.featurizer import loss_weights

    with torch.no_grad():
        return loss_weights(torch.from_numpy(pool.states), torch.from_numpy(pool.targets),
                            torch.from_numpy(np.asarray(weight, np.float32)),
                            None if bias is None else torch.from_numpy(np.asarray(bias, np.float32))
                            ).numpy()


def redundancy_counts(positions: np.ndarray, groups: np.ndarray, embeddings: np.ndarray) -> tuple[int, int]:
    """(picks that exactly copy an earlier pick, picks with a cosine ≥ 0.98 twin in the subset),
    the second measured as the job's manifest does (features.count_near_twins)."""
    exact_copies = len(positions) - len(np.unique(groups[positions]))
    return int(exact_copies), count_near_twins(embeddings[positions])


def run_protocol(pool: TokenStates, validation: TokenStates, test: TokenStates, weight: np.ndarray,
                 bias: np.ndarray | None, protocol: Protocol, rules: Rules, *,
                 features: FeatureSet | None = None, groups: np.ndarray | None = None,
                 trainer: Trainer | None = None, checkpoint: ProtocolCheckpoint | None = None,
                 group_codes: GroupCodes | None = None, target: FeatureSet | None = None) -> dict:
    """Everything after featurization: recipe, picks, fine-tuning, scores.

    ``features``: the pool under the storage rule (the stored shards; default: built from
    the pool's states). ``trainer`` is the fine-tuning mode (default: `HeadTrainer` on these
    parts); ``weight``/``bias`` (the pretrained LM head) also give the loss-weighted methods
    their token weights. ``groups``: the pool's exact-copy groups (the redundant scenario);
    ``group_codes``: the parts' groups (a mixture's sources), for the per-group scores, the
    recipe rule on validation macro NLL and the label-aware methods. ``target``: the target
    set's features (a group's validation rows), read by the targeted methods. Returns {"rows": per-run
    dicts, "summary": per (method, budget) dicts, "info": settings and protocol facts (the
    trainer's, pretrained NLL, recipe, void)}.
    """
    grouped = group_codes is not None
    methods = list(protocol.methods or default_methods(grouped, target is not None))
    check_methods(methods, grouped=grouped, targeted=target is not None)
    if not (protocol.recipe_lrs and protocol.recipe_epochs):
        raise ValueError("the protocol needs recipe candidates (see with_recipe_defaults)")
    for name, part in (("pool", pool), ("validation", validation), ("test", test)):
        if not part.num_examples:
            raise ValueError(f"the {name} split has no example with a target token to train or score on")
    features = features if features is not None else pool.features()
    weighted = (pool.features(pool_loss_weights(pool, weight, bias))
                if {"tokenod_loss", "tokenod_loss_tokens"} & set(methods) else None)
    trainer = trainer or HeadTrainer(pool, validation, test, weight, bias,
                                     batch_tokens=protocol.batch_tokens, seed=protocol.train_seed)
    tuned = trainer.info["tuned"]
    groups = np.arange(pool.num_examples) if groups is None else groups
    started = time.time()
    saved = checkpoint.state if checkpoint is not None else {"recipe": None, "pretrained": None, "runs": {}}
    if saved["recipe"] is None:
        recipe, recipe_scores = choose_recipe(pool, trainer, protocol, group_codes)
        saved = {**saved, "recipe": {"lr": recipe.lr, "epochs": recipe.epochs, "scores": recipe_scores}}
        if checkpoint is not None:
            checkpoint.save(recipe=saved["recipe"])
    recipe = trainer.recipe(saved["recipe"]["lr"], saved["recipe"]["epochs"])
    if saved["pretrained"] is None:
        pretrained = trainer.pretrained()
        saved = {**saved, "pretrained": {part: part_scores(pretrained, part, group_codes)
                                         for part in ("validation", "test")}}
        if checkpoint is not None:
            checkpoint.save(pretrained=saved["pretrained"])
    pretrained_validation, pretrained_test = (saved["pretrained"][part]["nll"] for part in ("validation", "test"))
    log.info("recipe %s (pretrained validation NLL %.4f)", recipe, pretrained_validation)

    picks = pick_subsets(features, protocol.budgets, list(range(protocol.seeds)), methods, rules=rules,
                         device=protocol.device, weighted=weighted, groups=None if group_codes is None else group_codes.pool,
                         target=target)
    rows = []
    for pick in picks:
        run_key = ProtocolCheckpoint.run_key(pick.method, pick.budget, pick.seed)
        if run_key not in saved["runs"]:
            saved["runs"][run_key] = part_scores(trainer.fit(pick.positions, recipe), "test", group_codes)
            if checkpoint is not None:
                checkpoint.save(runs=saved["runs"])
        exact_copies, near_twins = redundancy_counts(pick.positions, groups, features.embeddings)
        scores = dict(saved["runs"][run_key])
        rows.append({"method": pick.method, "budget": pick.budget, "seed": pick.seed,
                     "examples": len(pick.positions), "tokens": int(pool.num_targets[pick.positions].sum()),
                     "test_nll": scores.pop("nll"), "exact_copies": exact_copies, "near_twins": near_twins}
                    | scores | group_picks(pick.positions, group_codes))
        log.info("%s n=%d seed=%s: %d examples, %d tokens, test NLL %.4f", pick.method, pick.budget,
                 pick.seed, rows[-1]["examples"], rows[-1]["tokens"], rows[-1]["test_nll"])
    summary = summarise(rows)
    largest_uniform = [r for r in summary if r["method"] == "uniform" and r["budget"] == max(protocol.budgets)]
    void = bool(largest_uniform) and largest_uniform[0]["test_nll_mean"] >= pretrained_test
    if void:
        log.warning("VOID: uniform at n=%d does not beat the pretrained %s (%.4f >= %.4f)",
                    max(protocol.budgets), tuned, largest_uniform[0]["test_nll_mean"], pretrained_test)
    info = {"settings": dataclasses.asdict(protocol) | {"methods": methods}, "rules": dataclasses.asdict(rules)}
    info |= trainer.info | {
        "pool_examples": pool.num_examples, "pool_tokens": int(pool.targets.size),
        "validation_examples": validation.num_examples, "test_examples": test.num_examples,
        "test_tokens": int(test.targets.size), "recipe": dataclasses.asdict(recipe),
        "recipe_search": saved["recipe"]["scores"], "pretrained_validation_nll": pretrained_validation,
        "pretrained_test_nll": pretrained_test, "void": void,
        "exact_copy_rows_in_pool": int(pool.num_examples - len(np.unique(groups))),
        "protocol_seconds": round(time.time() - started, 1)}
    if grouped:
        info |= {"recipe_rule": "validation macro NLL",
                 "pretrained_test_groups": {k: v for k, v in saved["pretrained"]["test"].items() if k != "nll"}}
    return {"rows": rows, "summary": summary, "info": info}


def group_picks(positions: np.ndarray, group_codes: GroupCodes | None) -> dict[str, int]:
    """{"picks_<group>": picked examples of the group} (nothing without groups)."""
    if group_codes is None:
        return {}
    counts = np.bincount(group_codes.pool[positions], minlength=len(group_codes.names))
    return {f"picks_{name}": int(count) for name, count in zip(group_codes.names, counts)}


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and sample std (ddof=1; 0 for one run) per (method, budget), in METHODS order, of
    every score and count, the per-group ones (nll_*, picks_*) included."""
    keys = sorted({(r["method"], r["budget"]) for r in rows},
                  key=lambda key: (METHODS.index(key[0]), key[1]))
    summary = []
    for method, budget in keys:
        runs = [r for r in rows if r["method"] == method and r["budget"] == budget]
        entry = {"method": method, "budget": budget, "runs": len(runs)}
        per_group = [column for column in runs[0] if column.startswith(("nll_", "picks_"))]
        for column in ("test_nll", "tokens", "examples", "exact_copies", "near_twins", *per_group):
            values = np.array([r[column] for r in runs], dtype=np.float64)
            entry[f"{column}_mean"] = float(values.mean())
            entry[f"{column}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary
