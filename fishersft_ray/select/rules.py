"""Selection rules shared by every method: the ridge λ, the eligible rows (target tokens,
length cap) and the account of featurized rows without targets (numpy only)."""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping

import numpy as np

log = logging.getLogger(__name__)

NO_TARGET_TOKENS = "no_target_tokens"  # the skip reason of a row left without targets (--max-length)


def resolve_lam(lam: float, lam_relative: float | None, features) -> float:
    """λ of Σ_0 = λI: ``lam``, or ``lam_relative`` × the corpus's mean ‖x‖² per target token.

    Hidden states are not normalised (a few coordinates carry most of ‖x‖²), so an absolute
    λ means something different for every model; a relative one keeps the prior worth a
    fixed number of average tokens.
    """
    if lam_relative is None:
        return lam
    energy = features.mean_token_energy()
    if not energy > 0:
        raise ValueError("--lam-relative: the corpus has no target tokens with nonzero embeddings")
    return lam_relative * energy


def length_cap_tokens(rule: str, num_targets: np.ndarray) -> int:
    """Resolve a length cap: ``"256"`` (target tokens) or ``"p50"`` (that percentile of the
    target lengths of the examples that have targets, rounded down; p50 = the median).

    Examples with more target tokens than the cap are kept out of the selection. Why: at a
    fixed example budget, log det rewards long examples (their A_i has more rank), so the
    picks cost several times the tokens of a random subset; a cap keeps the selection among
    examples of typical length.
    """
    text = str(rule).strip()
    is_percentile = text.startswith("p")
    try:
        number = float(text[1:] if is_percentile else text)
    except ValueError:
        number = math.nan
    valid = 0 < number <= 100 if is_percentile else number >= 1 and number.is_integer()
    if not valid:
        raise ValueError(f"--length-cap must be a positive number of target tokens (e.g. 256) or a "
                         f"percentile of the corpus's target lengths (e.g. p50), got {rule!r}")
    if not is_percentile:
        return int(number)
    lengths = np.asarray(num_targets)
    lengths = lengths[lengths > 0]
    if not len(lengths):
        raise ValueError("--length-cap: the corpus has no examples with target tokens")
    return int(np.floor(np.percentile(lengths, number)))


def within_length_cap(rule: str | None, num_targets: np.ndarray) -> tuple[np.ndarray | None, dict | None]:
    """Positions the selection may pick (None: all) and the manifest's account of the length
    cap (None without one: the rule, the resolved token count and what it kept out).

    Every method picks among these only: rows with target tokens (a row left without any, e.g.
    a prompt longer than --max-length, trains nothing; ``count_rows_without_targets``), and
    under a length cap those within it."""
    num_targets = np.asarray(num_targets)
    has_targets = num_targets > 0
    if rule is None:
        return (None if has_targets.all() else np.flatnonzero(has_targets)), None
    cap = length_cap_tokens(rule, num_targets)
    over = num_targets > cap
    account = {"rule": rule, "tokens": cap, "excluded_examples": int(over.sum()),
               "excluded_target_tokens": int(num_targets[over].sum())}
    log.info("length cap %s = %d target tokens: %d examples (%d target tokens) not eligible",
             rule, cap, account["excluded_examples"], account["excluded_target_tokens"])
    return np.flatnonzero(has_targets & ~over), account


def count_rows_without_targets(stats: Mapping, row_index: np.ndarray, num_targets: np.ndarray,
                               skipped: Mapping[int, tuple[str, str]], on_bad_row: str) -> dict:
    """The corpus counts (``CorpusIndex.stats``) with the featurized rows that have no target
    token moved from kept to skipped, by reason: the featurizer's (``skipped``: row_index →
    (id, "reason: message"), ``features.skipped_rows``; e.g. "chat_template") or
    ``NO_TARGET_TOKENS``. rows_read == kept + sum(skipped) stays true. A row the featurizer
    skipped is a bad row: with ``on_bad_row`` "error" it raises a one-line ValueError naming it."""
    if skipped and on_bad_row == "error":
        row = min(skipped)
        row_id, why = skipped[row]
        raise ValueError(f"row_index {row} (id {row_id!r}): {why}; fix the row or pass --on-bad-row skip "
                         f"to skip such rows ({len(skipped)} in all)")
    empty = np.asarray(row_index)[np.asarray(num_targets) == 0].tolist()
    reasons = Counter({NO_TARGET_TOKENS: 0})
    reasons.update(skipped[row][1].split(":", 1)[0] if row in skipped else NO_TARGET_TOKENS for row in empty)
    if empty:
        log.info("%d featurized rows have no target tokens and are not eligible: %s", len(empty), dict(reasons))
    return {**stats, "kept": stats["kept"] - len(empty), "skipped": {**stats["skipped"], **{reason: stats["skipped"].get(reason, 0) + count
                                                                   for reason, count in reasons.items()}}}
