"""Where the driver keeps the features it selects from, and whether they fit.

Before featurizing: an estimate of the feature bytes from the corpus index (text lengths ×
target tokens per character, measured by the model's tokenizer on a sample of rows → the
storage rule's bytes, ``features.estimate_feature_bytes``), said in the log and the manifest; the job stops early, naming the flags that would fit, when a local
feature store's disk cannot hold it, or when the features exceed the driver's memory budget
and the spill directory's disk too.

After featurizing: shards whose in-RAM load (about ``RAM_LOAD_PEAK`` × their bytes) fits the
memory budget are loaded into RAM; larger ones are streamed into memory-mapped files under
the spill directory (``FeatureSet.load(memmap_dir=)``), so features larger than RAM need
disk, not memory. The picks are the same either way.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pyarrow as pa

from fishersft_ray.config import FeaturizeConfig
from fishersft_ray.features import FeatureSet, estimate_feature_bytes, fitting_options
from fishersft_ray.featurize.masks import ChatTemplateError, cut_messages, encode_with_targets
from fishersft_ray.io.corpus import CorpusIndex, file_examples
from fishersft_ray.io.storage import Location

log = logging.getLogger(__name__)

# Where the model's tokenizer is not loaded on the driver: characters per target token, every
# character of a row counted as a target (SmolLM2's tokenizer measured 2.7 characters a token
# on GSM8K responses, 3.3 on tinyshakespeare, but 0.4 on CJK text: 6x more tokens).
CHARS_PER_TOKEN = 2.5
# The measured rule: target tokens per character of up to SAMPLE_ROWS random kept rows of up to
# SAMPLE_FILES corpus files (each content cut to SAMPLE_CHARS), times TARGETS_MARGIN.
SAMPLE_ROWS = 200
SAMPLE_FILES = 8
SAMPLE_CHARS = 100_000
TARGETS_MARGIN = 1.25


# Peak memory of loading shards into RAM (FeatureSet.load streams them into the final arrays,
# one shard batch at a time), as a multiple of the shard bytes (benchmarks/bench_load.py):
# 1.08× on 466 MB of SmolLM2 factors in 40 shards and 1.10× on 16 synthetic shards (reading
# whole tables and copying them, as before, took 4.9× and 4.6×); 2.2× when the factors are
# one file of one row group (pyarrow decodes a row group's column whole). The memory-mapped
# load peaks at about 40 MB whatever the size.
RAM_LOAD_PEAK = 1.5


def loads_in_ram(shard_bytes: float, memory_budget: int) -> bool:
    """Whether shards of this size load into RAM within the budget (else memory-mapped)."""
    return shard_bytes * RAM_LOAD_PEAK <= memory_budget


class FeaturesTooLarge(ValueError):
    """The features would not fit where they must go; the message names flags that fit."""


def available_memory_bytes() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_budget_bytes(driver_memory_gb: float | None) -> int:
    """``--driver-memory-gb``, else half the memory available now."""
    return int(driver_memory_gb * 1e9) if driver_memory_gb is not None else available_memory_bytes() // 2


def spill_root(spill_dir: str | None) -> Path:
    from fishersft_ray.featurize.model_ref import cache_root

    return Path(spill_dir) if spill_dir else cache_root() / "spill"


def estimated_targets(corpus: CorpusIndex, config: FeaturizeConfig, targets_per_char: float) -> np.ndarray:
    """Target tokens per row: its text length × ``targets_per_char``, capped at --max-length
    when overlong rows are truncated."""
    tokens = np.ceil(np.asarray(corpus.length, np.float64) * targets_per_char).astype(np.int64)
    return np.minimum(tokens, config.max_length) if config.max_length and config.overlong == "truncate" else tokens


def driver_tokenizer(model) -> tuple[object | None, str]:
    """The model's tokenizer loaded here, or None and why not. A local directory or GGUF is on
    this node already (a GGUF is converted once per node: this node's actors reuse it), a hub
    model's tokenizer files are small; a model on object storage would be copied here whole."""
    if model is None:
        return None, "no model given to measure with"
    if model.kind == "url":
        return None, "the model's tokenizer is not loaded on the driver for a model on object storage"
    from transformers import AutoTokenizer

    try:
        if model.kind == "hub":
            return AutoTokenizer.from_pretrained(model.source, revision=model.revision), ""
        return AutoTokenizer.from_pretrained(model.local_path()), ""
    except Exception as exc:  # noqa: BLE001 - the estimate falls back to the character rule
        return None, f"the model's tokenizer did not load on the driver: {str(exc).splitlines()[0]}"


def measured_targets_per_char(corpus: CorpusIndex, tokenizer, map_files=None) -> tuple[float, int]:
    """Target tokens per character over a seeded sample of kept rows (see SAMPLE_ROWS), read
    back by ``map_files`` (the executor's; default: here), and how many rows it measured."""
    rng = np.random.default_rng(0)
    files = corpus.file_of(corpus.row_index)
    candidates = corpus.row_index[np.isin(files, rng.permutation(np.unique(files))[:SAMPLE_FILES])]
    rows = np.sort(rng.choice(candidates, size=min(SAMPLE_ROWS, len(candidates)), replace=False))
    plan = pa.table({"row_index": pa.array(rows, pa.int64()), "file": pa.array(corpus.file_of(rows), pa.int64())})
    tables = (map_files or (lambda function, items: [function(**item) for item in items]))(
        file_examples, corpus.work(plan))
    targets = chars = measured = 0
    for table in tables:
        for messages in table.column("messages").to_pylist():
            messages = cut_messages(messages, SAMPLE_CHARS)
            try:
                targets += int(encode_with_targets(tokenizer, messages)[1].sum())
            except ChatTemplateError:
                continue
            chars += sum(len(m["content"]) for m in messages)
            measured += 1
    return (targets / chars if chars else 0.0), measured


def estimate(corpus: CorpusIndex, config: FeaturizeConfig, dim: int | None, model=None,
             map_files=None) -> dict | None:
    """The manifest's ``features.estimate``: bytes of the feature shards of ``corpus``, from
    target tokens per character measured with ``model``'s tokenizer (a ModelRef; see
    ``measured_targets_per_char``) × TARGETS_MARGIN, else the character rule; ``rule`` says which."""
    if dim is None:
        return None
    config = config.for_width(dim)
    tokenizer, why_not = driver_tokenizer(model)
    measured = measured_targets_per_char(corpus, tokenizer, map_files) if tokenizer is not None else (0.0, 0)
    if measured[1]:
        targets_per_char = measured[0] * TARGETS_MARGIN
        rule = (f"{measured[0]:.3g} target tokens a character measured by the model's tokenizer on {measured[1]} "
                f"sampled rows, × {TARGETS_MARGIN}, capped at --max-length")
    else:
        targets_per_char = 1 / CHARS_PER_TOKEN
        rule = (f"every character a target, {CHARS_PER_TOKEN} characters a token, capped at --max-length "
                f"({why_not or 'no sampled row could be measured'})")
    log.info("feature size estimate: %s", rule)
    targets = estimated_targets(corpus, config, targets_per_char)
    return {"bytes": estimate_feature_bytes(targets, dim, config.project_dim, config.max_rank, config.keep_states,
                                            config.factor_dtype),
            "rows": int(corpus.num_rows), "dim": int(dim), "stored_width": int(config.project_dim or dim),
            "factor_dtype": config.factor_dtype, "targets_per_char": targets_per_char, "rule": rule}


def _free_bytes(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free


def partitions_for(requested, guess: dict | None, memory_budget: int, spill: Path) -> int:
    """``--partitions``: an integer as given; "auto": 1 while the estimated features fit the
    driver's memory budget or its spill disk, else enough parts that one part fits the budget
    (two-stage selection: the driver then holds only the parts' candidates)."""
    if requested != "auto":
        return int(requested)
    if guess is None or loads_in_ram(guess["bytes"], memory_budget) or guess["bytes"] <= _free_bytes(spill):
        return 1
    parts = max(2, math.ceil(guess["bytes"] * RAM_LOAD_PEAK / max(memory_budget, 1)))
    log.info("features (about %.3g GB) exceed the driver's memory budget and spill disk: two-stage selection "
             "over %d parts", guess["bytes"] / 1e9, parts)
    return parts


def check_fits(guess: dict | None, corpus: CorpusIndex, config: FeaturizeConfig, store: Location | None,
               memory_budget: int, spill: Path, whole_pool_on_driver: bool = True) -> None:
    """Raise FeaturesTooLarge when the estimated features cannot be stored (in ``store``, a
    feature cache still to be filled; None when it is complete) or, when the driver selects
    over the whole pool (one stage), selected from."""
    if guess is None:
        return
    need = guess["bytes"]
    places = []
    if store is not None and store.is_local:
        places.append((f"the feature store {store.url}", _free_bytes(Path(store.path)),
                       "point --features at a larger disk"))
    if whole_pool_on_driver and not loads_in_ram(need, memory_budget):
        places.append((f"the spill directory {spill} (the features exceed the driver's memory budget of "
                       f"{memory_budget / 1e9:.3g} GB)", _free_bytes(spill),
                       "point --spill-dir at a larger disk, or select in two stages (--partitions auto)"))
    for where, free, elsewhere in places:
        if need > free:
            targets = estimated_targets(corpus, config, guess["targets_per_char"])
            options = {k: size for k, size in fitting_options(free, targets, guess["dim"], config.max_rank,
                                                              config.keep_states, config.factor_dtype).items()
                       if k < guess["stored_width"]}  # narrower than what is stored now
            hint = (f"pass --project-dim {next(iter(options))} (about {next(iter(options.values())) / 1e9:.3g} GB)"
                    if options and config.projection == "random" else "no --project-dim fits either")
            if config.factor_dtype == "float32":
                half = estimate_feature_bytes(targets, guess["dim"], guess["stored_width"], config.max_rank,
                                              config.keep_states, "float16")
                if half <= free:
                    hint = f"pass --factor-dtype float16 (about {half / 1e9:.3g} GB), or {hint}"
            raise FeaturesTooLarge(
                f"the features of {guess['rows']} rows need about {need / 1e9:.3g} GB (d={guess['dim']}, stored "
                f"width {guess['stored_width']}; {guess['rule']}) but {where} has {free / 1e9:.3g} GB free: "
                f"{hint}, or {elsewhere}")


def shard_bytes(shards: Location) -> int:
    return shards.total_bytes(".parquet")


def load(shards: Location, num_rows: int, memory_budget: int, spill: Path, stack: ExitStack) -> tuple[FeatureSet, dict]:
    """The shards as a FeatureSet, in RAM or memory-mapped under ``spill`` (removed when
    ``stack`` closes); and how (the manifest's ``features.driver``)."""
    stored = shard_bytes(shards)
    memmap_dir = None
    if not loads_in_ram(stored, memory_budget):
        spill.mkdir(parents=True, exist_ok=True)
        memmap_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="features-", dir=spill))
    features = FeatureSet.load(shards.url, storage_options=shards.storage_options, memmap_dir=memmap_dir)
    if features.n != num_rows:
        raise RuntimeError(f"feature shards at {shards.url} hold {features.n} examples but the corpus "
                           f"has {num_rows}; delete that directory and re-run")
    log.info("features at %s (%d examples, d=%d, %.3g GB) %s", shards.url, features.n, features.dim,
             stored / 1e9, f"memory-mapped under {memmap_dir}" if memmap_dir else "in RAM")
    return features, {"shard_bytes": stored, "memory_budget_bytes": memory_budget,
                      "held": "memory-mapped" if memmap_dir else "RAM"}
