"""Feature shards: the stored factors of each example's information matrix A_i = X_iᵀ X_i.

One module per job: ``schema`` (the shard contract and its validation), ``storage_rule`` (rows →
factor, numpy and torch), ``embeddings`` (the mean-row column, near twins), ``featureset``
(``FeatureSet``), ``load`` (reading shards, ``FactorRows``), ``summary`` (``FeatureSummary``),
``states`` (``TokenStates``) and ``sizing`` (size estimates). See docs/CONTRACTS.md.

numpy, pyarrow and fsspec (through io/storage) only: no Ray, and torch only where
``store_examples`` is handed torch tensors.
"""

from .embeddings import NEAR_TWIN_COSINE, count_near_twins, mean_rows
from .featureset import FeatureSet
from .load import FactorRows, concat_shards, read_shards, shard_urls, skipped_rows
from .schema import (FACTOR_TYPES, FLOAT_BYTES, METADATA_KEY, SHARD_FORMAT, SHARD_SCHEMA, SHARD_WRITE_OPTIONS,
                     SKIP_REASON, STATE_FIELDS, factor_dtype_of, first_copies, shard_schema, shard_table)
from .sizing import PROJECTION_LADDER, ROW_OVERHEAD_BYTES, estimate_feature_bytes, fitting_options
from .states import TokenStates, with_token_states
from .storage_rule import factor_from_rows, store_examples, stored_factor, stored_rank
from .summary import FeatureSummary

__all__ = [
    "FACTOR_TYPES", "FLOAT_BYTES", "METADATA_KEY", "NEAR_TWIN_COSINE", "PROJECTION_LADDER", "ROW_OVERHEAD_BYTES",
    "SHARD_FORMAT", "SHARD_SCHEMA", "SHARD_WRITE_OPTIONS", "SKIP_REASON", "STATE_FIELDS", "FactorRows",
    "FeatureSet", "FeatureSummary", "TokenStates", "concat_shards", "count_near_twins",
    "estimate_feature_bytes", "factor_dtype_of", "factor_from_rows", "first_copies", "fitting_options",
    "mean_rows", "read_shards", "shard_schema", "shard_table", "shard_urls", "skipped_rows", "store_examples",
    "stored_factor", "stored_rank", "with_token_states",
]
