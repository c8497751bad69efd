"""The `evaluate` command: the same stages as `select` (storage, corpus reader, model
reference, feature cache and executor, selection methods), then the protocol.

With groups (``--group-field``/``--group-by-file``, io/groups.py) the split draws test and
validation rows per group and every run is scored per group too (evaluate/protocol.py).

Features come from the one feature cache: when a complete cache of the WHOLE corpus exists
under the same key (e.g. `select --keep-states --features PATH` on the same corpus, model
and settings), evaluate reads it and embeds nothing; otherwise it featurizes the rows its
split uses (all of them when the split covers the corpus) into that cache.
"""

from __future__ import annotations

import dataclasses
import logging
import posixpath

import numpy as np
import pyarrow as pa

from fishersft_ray.config import EvaluateSettings, flat_dict
from fishersft_ray.evaluate.data import GroupCodes, make_redundant, pool_share_vector, split_by_group, split_examples
from fishersft_ray.evaluate.model_tuning import MODEL_MODES, ModelTrainer, ModelTuner, require_peft, resolve_train_device
from fishersft_ray.evaluate.outputs import markdown_table, write_outputs
from fishersft_ray.evaluate.protocol import ProtocolCheckpoint, run_protocol, with_recipe_defaults
from fishersft_ray.features import FeatureSet, TokenStates
from fishersft_ray.io.corpus import CorpusIndex, file_examples, index_corpus
from fishersft_ray.io.groups import corpus_groups
from fishersft_ray.io.storage import Location, fingerprint
from fishersft_ray.run.executors import executor_for
from fishersft_ray.run.feature_cache import FeatureCache, cache_key
from fishersft_ray.select.device import selection_device

log = logging.getLogger(__name__)


def run_evaluate(settings: EvaluateSettings) -> dict:
    """Run the protocol on the corpus; returns {"table": markdown summary, "files": urls}."""
    from fishersft_ray.featurize.model_ref import lm_head_weight, resolve_model

    options = settings.storage_options
    output = Location.of(settings.output, options)
    Location.of(settings.input, options).check_readable()
    output.check_writable()
    train_device = None
    if settings.mode in MODEL_MODES:  # before the featurization, not after it
        if settings.mode == "lora":
            require_peft()
        train_device = resolve_train_device(settings.train_device)

    executor = executor_for(settings.resources)
    corpus = index_corpus(settings.input, settings.corpus, options, executor.map_files)
    groups = corpus_groups(corpus, settings.groups, executor.map_files)
    if groups is None:
        split = split_examples(corpus.num_rows, test_fraction=settings.split.test_fraction,
                               validation_size=settings.split.validation_size, seed=settings.split.split_seed,
                               max_pool=settings.split.max_pool, max_test=settings.split.max_test)
    else:
        split = split_by_group(groups.codes, groups.names, test_per_group=settings.split.test_per_group,
                               validation_per_group=settings.split.validation_per_group,
                               seed=settings.split.split_seed, max_pool=settings.split.max_pool,
                               pool_shares=pool_share_vector(groups, settings.split.pool_shares))
    model = resolve_model(settings.featurize.model, options)
    config = executor.featurizer_config(dataclasses.replace(settings.featurize, model=model))
    cache = FeatureCache(Location.of(settings.features or f"{settings.output}/features", options), executor)
    needed = corpus.row_index[np.sort(np.concatenate([split.pool, split.validation, split.test]))]
    whole_key = cache_key(model.fingerprint, corpus, config)
    if cache.is_complete(whole_key) or len(needed) == corpus.num_rows:
        shards, features_info = cache.ensure(corpus, config, model)
    else:
        log.info("no complete feature cache of the whole corpus at %s (`select --keep-states --features "
                 "%s` fills one): featurizing the %d rows the split uses", cache.location(whole_key).url,
                 cache.root.url, len(needed))
        shards, features_info = cache.ensure(corpus, config, model, rows=needed)
    log.info("features %s at %s: %d rows embedded", "reused" if features_info["reused"] else "cached",
             shards.url, features_info["embedded_rows"])

    parts = {name: _with_targets(TokenStates.load(shards.url, corpus.row_index[positions], options))
             for name, positions in (("pool", split.pool), ("validation", split.validation),
                                     ("test", split.test))}
    group_codes = None if groups is None else GroupCodes(
        groups.names, *(groups.codes_of(parts[name].row_index) for name in ("pool", "validation", "test")))
    pool, copy_groups, features, target = parts["pool"], None, None, None
    if settings.split.target_group is not None:
        target = target_features(shards, parts["validation"], group_codes, settings.split.target_group, options)
    if settings.split.redundant_share > 0:
        pool, copy_groups = make_redundant(pool, share=settings.split.redundant_share,
                                      num_sources=settings.split.redundant_sources,
                                      near_copy_noise=settings.split.near_copy_noise, seed=settings.split.split_seed)
    else:  # the stored factors of the pool's rows, as select would read them
        stored = FeatureSet.load(shards.url, storage_options=options)
        features = stored.subset(np.searchsorted(stored.row_index, pool.row_index))

    weight, bias = lm_head_weight(model)
    trainer = None
    if settings.mode in MODEL_MODES:
        tuner = ModelTuner(model.local_path(), settings.mode, device=train_device, seed=settings.protocol.train_seed)
        trainer = ModelTrainer(tuner, corpus_examples(corpus, needed, executor),
                               {"pool": pool, "validation": parts["validation"], "test": parts["test"]},
                               batch_tokens=settings.protocol.batch_tokens)
    protocol = dataclasses.replace(with_recipe_defaults(settings.protocol, settings.mode),
                                   device=selection_device(settings.featurize.device))
    facts = {"input": settings.input, "format": corpus.format, "corpus_stats": corpus.stats,
             "model": model.name, "model_source": model.source, "model_fingerprint": model.fingerprint,
             "split_seed": settings.split.split_seed,
             "split_sizes": {k: int(len(v)) for k, v in dataclasses.asdict(split).items()},
             "features": features_info, "mode": settings.mode}
    if target is not None:
        facts["target"] = {"group": settings.split.target_group, "part": "validation", "examples": target.n,
                           "target_tokens": int(target.num_targets.sum())}
    if groups is not None:
        part_sizes = {part: groups.sizes(group_codes.of(part)) for part in ("pool", "validation", "test")}
        facts["groups"] = {"source": groups.source, "names": groups.mapping(), "pool_shares": settings.split.pool_shares,
                           "sizes": {name: {"corpus": rows} | {part: sizes[name] for part, sizes in part_sizes.items()}
                                     for name, rows in groups.sizes(groups.codes).items()}}
    if settings.split.redundant_share > 0:
        facts["redundant"] = {"share": settings.split.redundant_share, "sources": settings.split.redundant_sources,
                              "near_copy_noise": settings.split.near_copy_noise}
    checkpoint = ProtocolCheckpoint(output, fingerprint(
        flat_dict(settings) | {"features": None, "storage_options": None, "title": None, "config_file": None},
        protocol.recipe_lrs, protocol.recipe_epochs, model.fingerprint, features_info["key"],
        pool.row_index.tolist(), list(pool.states.shape)))
    result = run_protocol(pool, parts["validation"], parts["test"], weight, bias, protocol, settings.rules,
                          features=features, groups=copy_groups, trainer=trainer, checkpoint=checkpoint,
                          group_codes=group_codes, target=target)
    result["info"] = facts | {"command_settings": flat_dict(settings)} | result["info"]
    files = write_outputs(result, output, settings.title or posixpath.basename(settings.input.rstrip("/")))
    checkpoint.clear()
    return {"table": markdown_table(result["summary"], result["info"]), "files": files}


def target_features(shards: Location, validation: TokenStates, group_codes: GroupCodes, group: str,
                    options) -> FeatureSet:
    """The stored features of ``group``'s validation rows: the targeted methods' target set."""
    if group not in group_codes.names:
        raise ValueError(f"--target-group {group!r} is not a group of this corpus ({', '.join(group_codes.names)})")
    rows = validation.row_index[group_codes.validation == group_codes.names.index(group)]
    if not len(rows):
        raise ValueError(f"--target-group {group!r} has no validation rows with target tokens: raise "
                         "--validation-per-group or pick another group")
    stored = FeatureSet.load(shards.url, storage_options=options)
    return stored.subset(np.searchsorted(stored.row_index, rows))


def corpus_examples(corpus: CorpusIndex, row_index: np.ndarray, executor) -> pa.Table:
    """The examples (row_index, id, messages) of these kept rows, read from the corpus files."""
    plan = pa.table({"row_index": pa.array(row_index, pa.int64()),
                     "file": pa.array(corpus.file_of(row_index), pa.int64())})
    return pa.concat_tables(executor.map_files(file_examples, corpus.work(plan)))


def _with_targets(part: TokenStates) -> TokenStates:
    """The part's examples that have a target token (nothing to train on or score otherwise)."""
    return part.subset(np.flatnonzero(part.num_targets > 0))
