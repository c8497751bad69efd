"""Selection rules shared by every method: the ridge λ and the length cap (numpy only)."""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)


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
    """Positions the selection may pick under a length cap (None: all) and the manifest's
    account of the cap: the rule, the resolved token count and what it kept out."""
    if rule is None:
        return None, None
    num_targets = np.asarray(num_targets)
    cap = length_cap_tokens(rule, num_targets)
    over = num_targets > cap
    account = {"rule": rule, "tokens": cap, "excluded_examples": int(over.sum()),
               "excluded_target_tokens": int(num_targets[over].sum())}
    log.info("length cap %s = %d target tokens: %d examples (%d target tokens) not eligible",
             rule, cap, account["excluded_examples"], account["excluded_target_tokens"])
    return np.flatnonzero(~over), account
