"""The featurizer: any Hugging Face causal LM → per-example factors of A_i = X_iᵀ X_i.

`Featurizer` is the actor of the featurize stage (run/executors.py runs it on a Ray Data
actor pool behind the CPU tokenise stage, featurize/tokenize.py, or in-process): it loads the
BASE model once (no LM head: its pre-logit state is the base model's `last_hidden_state`, after
the final norm), runs the planned length-sorted micro-batches, gathers the state at every
position that predicts a target token, applies the storage rule to the whole call by length
(features.store_examples) on its device, and emits one `features.SHARD_SCHEMA` row per example
from one host buffer per column.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pyarrow as pa
import torch

from fishersft_ray.config import FeaturizeConfig
from fishersft_ray.faults import maybe_crash
from fishersft_ray.features.schema import SKIP_REASON, FlatRows, shard_table
from fishersft_ray.features.states import with_token_states
from fishersft_ray.features.storage_rule import StoredExamples, store_examples, stored_factor
from fishersft_ray.featurize.backends import backend_of, model_ref_of
from fishersft_ray.featurize.tokenize import TOKEN_IDS, EncodedRows, PaddedBatch, Tokenize

LOSS_WEIGHT_CHUNK_TOKENS = 1024  # logits materialised at once: chunk × vocabulary floats


# ---------------------------------------------------------------- projection

def random_projection(dim: int, project_dim: int, seed: int) -> np.ndarray:
    """A seeded (dim, project_dim) matrix with orthonormal columns."""
    gaussian = np.random.default_rng(seed).standard_normal((dim, project_dim))
    return np.linalg.qr(gaussian)[0].astype(np.float32)


def pca_projection(states: list[np.ndarray], project_dim: int) -> np.ndarray:
    """Top `project_dim` eigenvectors of the pooled uncentred second moment Σ_i X_iᵀ X_i."""
    second_moment = sum(X.astype(np.float64).T @ X.astype(np.float64) for X in states)
    eigenvalues, eigenvectors = np.linalg.eigh(second_moment)
    return np.ascontiguousarray(eigenvectors[:, ::-1][:, :project_dim], np.float32)


# ---------------------------------------------------------------- the actor

def loss_weights(states: torch.Tensor, targets: torch.Tensor, head_weight: torch.Tensor,
                 head_bias: torch.Tensor | None = None,
                 chunk_tokens: int = LOSS_WEIGHT_CHUNK_TOKENS) -> torch.Tensor:
    """Per-token empirical-Fisher weight w = ‖p − e_y‖² of the LM head's softmax (float32).

    A token's cross-entropy gradient with respect to the head is (p − e_y) xᵀ, so its
    empirical Fisher is (p − e_y)(p − e_y)ᵀ ⊗ x xᵀ; traced over the vocabulary side this is
    w · x xᵀ. Scaling the rows x by √w therefore makes A_i the example's loss-aware Fisher:
    tokens the model already predicts (p ≈ e_y, w ≈ 0) add nothing, confidently wrong ones
    up to 2. Logits are formed ``chunk_tokens`` rows at a time, never T × V at once.
    """
    weights = torch.empty(len(targets), dtype=torch.float32, device=states.device)
    for start in range(0, len(targets), chunk_tokens):
        stop = start + chunk_tokens
        logits = states[start:stop].float() @ head_weight.float().T
        if head_bias is not None:
            logits += head_bias.float()
        p = torch.softmax(logits, dim=-1)
        p_target = p.gather(1, targets[start:stop, None].long()).squeeze(1)
        weights[start:stop] = (p * p).sum(-1) - 2.0 * p_target + 1.0
    return weights.clamp_(min=0.0)


class Featurizer:
    """Callable class for `map_batches(batch_format="pyarrow")`: tokenised examples (a
    ``Tokenize`` table) → SHARD_SCHEMA rows plus ``skip_reason``. Examples handed over untokenised
    (row_index, id, messages[, unit]) are tokenised here first, by the same ``Tokenize``."""

    def __init__(self, config: FeaturizeConfig):
        self.config = config
        self.model_ref = model_ref_of(config)
        use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if use_cuda else "cpu")
        dtype = torch.bfloat16 if use_cuda else torch.float32
        self.backend = backend_of(config)
        self.tokenizer, self.model, self.head, model_config = self.backend.load(
            self.model_ref, device=self.device, dtype=dtype, with_head=config.token_weights == "loss")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.tokenize = Tokenize(config, self.tokenizer, model_config)
        self.dim = model_config.hidden_size
        self.config = config = config.for_width(self.dim)  # --project-dim auto, if the caller left it
        self.projection = self._projection()
        self.real_tokens = 0
        self.padded_tokens = 0
        # Seconds per phase over every call (what a Ray actor spends where); see `timed`.
        self.seconds = dict.fromkeys(("tokenize", "pad", "forward", "gather", "factors", "table"), 0.0)
        self.profile = False

    def _projection(self) -> np.ndarray | None:
        config = self.config
        if config.project_dim is None:
            return None
        if config.projection == "random":
            return random_projection(self.dim, config.project_dim, config.projection_seed)
        if config.projection == "pca":
            if config.projection_matrix is None:
                raise ValueError("projection='pca' needs projection_matrix: fit it with "
                                 "with_fitted_projection (the feature cache and featurize_local do)")
            return np.asarray(config.projection_matrix, np.float32)
        raise ValueError(f"projection must be 'random' or 'pca', not {config.projection!r}")

    @contextmanager
    def timed(self, phase: str):
        """Add the wall time of the block to ``seconds[phase]``. Device work is queued, not
        waited for, so it is charged to the phase where the host next waits for it; with
        ``profile`` set the device is synchronised at every phase boundary instead, so each
        phase is charged its own device work (slower: nothing overlaps)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.profile and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[phase] += time.perf_counter() - start

    @property
    def padding_fraction(self) -> float:
        """Share of the forward passes' token slots that were padding, so far."""
        return self.padded_tokens / max(self.real_tokens + self.padded_tokens, 1)

    def encoded(self, batch: pa.Table) -> tuple[EncodedRows, pa.Table]:
        """The batch's tokens and forward plan, and the batch as ``Tokenize`` returns it:
        tokenised here if the CPU stage did not."""
        if TOKEN_IDS not in batch.column_names:
            with self.timed("tokenize"):
                batch = self.tokenize(batch)
        return EncodedRows(batch), batch

    def padded_batches(self, rows: EncodedRows) -> list[PaddedBatch]:
        """Every micro-batch of ``rows`` padded as the forward pass takes it (run order)."""
        return [self.padded(rows, number) for number in range(rows.num_micro_batches)]

    def padded(self, rows: EncodedRows, number: int) -> PaddedBatch:
        """Micro-batch ``number`` of ``rows``, padded with the tokenizer's pad token on its side."""
        return rows.padded(number, self.tokenizer.pad_token_id, self.tokenizer.padding_side == "left")

    def target_states(self, examples: pa.Table) -> list[np.ndarray]:
        """Per example, X_i (m_i, d) float32 on the host: the pre-logit states predicting its
        target tokens (see ``device_states``), the examples run as one forward unit."""
        rows, _ = self.encoded(examples.drop_columns([name for name in ("unit",) if name in examples.column_names]))
        return np.split(self.device_states(rows).cpu().numpy(), rows.state_offsets[1:-1])

    @torch.inference_mode()
    def device_states(self, rows: EncodedRows) -> torch.Tensor:
        """(T, d) float32 on the featurizer's device: the state predicting each target token,
        example by example (rows.state_offsets). Every micro-batch is padded and sent to the
        device before the first forward pass (milliseconds, while the tokens are in cache:
        between forward passes the same work runs several times slower), and nothing waits for
        the device until the caller reads the states."""
        states = torch.empty((int(rows.state_offsets[-1]), self.dim), dtype=torch.float32, device=self.device)
        with self.timed("pad"):
            batches = self.padded_batches(rows)
            real = sum(int(batch.attention_mask.sum()) for batch in batches)
            self.real_tokens += real
            self.padded_tokens += sum(batch.attention_mask.size for batch in batches) - real
            batches = [[torch.from_numpy(a).to(self.device, non_blocking=True)
                        for a in (batch.input_ids, batch.attention_mask, batch.position_ids, batch.predictors,
                                  batch.destination)] for batch in batches]
        for input_ids, attention_mask, position_ids, predictors, destination in batches:
            with self.timed("forward"):
                hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=False).last_hidden_state
            with self.timed("gather"):  # index_select: a CPU gathers rows this way 5x faster than by indexing
                states.index_copy_(0, destination, hidden.reshape(-1, self.dim).index_select(0, predictors).float())
        return states

    @torch.inference_mode()
    def token_weights(self, states: torch.Tensor, target_ids: np.ndarray) -> torch.Tensor | None:
        """The weight of each target-token row (``loss_weights``); None if unweighted."""
        if self.head is None:
            return None
        if not len(states):
            return torch.zeros(0, device=self.device)
        targets = torch.from_numpy(target_ids.astype(np.int64)).to(self.device)
        return loss_weights(states, targets, self.head.weight, getattr(self.head, "bias", None))

    def __call__(self, batch: pa.Table) -> pa.Table:
        """One block of whole forward units → its shard rows: forward passes, gathered states,
        token weights, the storage rule, the table from one buffer per column."""
        rows, batch = self.encoded(batch)
        states = self.device_states(rows)
        target_ids = rows.target_ids()
        weights = self.token_weights(states, target_ids)
        ids = batch.column("id").to_pylist()
        with self.timed("factors"):
            stored, host_states = self._storage_rule(states, rows, weights, ids)
            factors = FlatRows(stored.factors, stored.offsets)
            spectra = FlatRows(stored.spectrum, stored.offsets)
            if self.config.factor_dtype != "float32":
                factors, spectra = self._stored_factors(factors, spectra, ids)
        out_dim = self.dim if self.projection is None else self.projection.shape[1]
        with self.timed("table"):
            table = shard_table({
                "row_index": batch.column("row_index").to_numpy(), "id": ids,
                "num_tokens": batch.column("num_tokens").to_numpy(), "num_targets": rows.num_targets,
                "truncated": batch.column("truncated").to_numpy(), "factor": factors, "spectrum": spectra,
                "embedding": stored.embeddings,
            }, dim=out_dim, meta={"model": self.model_ref.name, "model_fingerprint": self.model_ref.fingerprint,
                                  "token_weights": self.config.token_weights},
                factor_dtype=self.config.factor_dtype)
            table = table.append_column(SKIP_REASON, batch.column("skip_reason"))
            if self.config.keep_states:
                split = rows.state_offsets[1:-1]
                table = with_token_states(table, np.split(host_states, split), np.split(target_ids, split))
        maybe_crash("featurize")
        return table

    def _stored_factors(self, factors: FlatRows, spectra: FlatRows, ids) -> tuple[FlatRows, FlatRows]:
        """Factors rounded to ``--factor-dtype`` with their spectra recomputed (features.stored_factor)."""
        stored = []
        for row_id, factor, spectrum in zip(ids, factors.split(), spectra.split()):
            try:
                stored.append(stored_factor(factor, spectrum, self.config.factor_dtype))
            except ValueError as error:
                raise ValueError(f"row id {row_id!r}: {error}") from None
        return FlatRows.of([f for f, _ in stored], factors.values.shape[1]), FlatRows.of([s for _, s in stored])

    @torch.inference_mode()
    def _storage_rule(self, states: torch.Tensor, rows: EncodedRows, weights, ids) -> tuple[StoredExamples, object]:
        """The storage rule for the whole call on the featurizer's device (numpy on a CPU, so
        every example gets the bits ``factor_from_rows`` gives it; torch float64 solves on a
        GPU): projection, token weights, one batched solve per length (features.store_examples);
        then the stored columns (and, with keep_states, the states) on the host, copied off a GPU
        at once through pinned memory."""
        on_host = self.device.type != "cuda"
        flat = states.numpy() if on_host else states
        finite = np.isfinite(flat).all(1) if on_host else flat.isfinite().all(1)
        if not bool(finite.all()):
            first = int(np.flatnonzero(~np.asarray(finite.tolist(), bool))[0])
            example = int(np.searchsorted(rows.state_offsets, first, side="right") - 1)
            raise ValueError(f"row id {ids[example]!r}: non-finite hidden states (NaN/Inf) from the model")
        if weights is not None:
            weights = np.sqrt(weights.numpy()) if on_host else weights.sqrt()
        projection = self.projection if on_host or self.projection is None else self._device_projection()
        stored = store_examples(flat, rows.num_targets, self.config.max_rank, projection, weights)
        if on_host:
            return stored, flat
        host = self._to_pinned_host([stored.factors, stored.spectrum, stored.embeddings]
                                    + ([states] if self.config.keep_states else []))
        return (StoredExamples(host[0], host[1], stored.offsets, host[2]),
                host[3] if self.config.keep_states else None)

    def _device_projection(self) -> torch.Tensor:
        if not hasattr(self, "_projection_on_device"):
            self._projection_on_device = torch.from_numpy(self.projection).to(self.device)
        return self._projection_on_device

    def _to_pinned_host(self, tensors: list[torch.Tensor]) -> list[np.ndarray]:
        """Device tensors copied into page-locked host memory (one buffer, reused by the next
        call), queued together and waited for once (page-locked copies run at the bus's speed),
        then each copied once into an array of its own that the shard's columns can hold."""
        sizes = [t.numel() for t in tensors]
        if getattr(self, "_pinned", None) is None or self._pinned.numel() < sum(sizes):
            self._pinned = torch.empty(int(sum(sizes) * 1.25) + 1, dtype=torch.float32, pin_memory=True)
        views, offset = [], 0
        for tensor, size in zip(tensors, sizes):
            view = self._pinned[offset:offset + size].view(tensor.shape)
            view.copy_(tensor.float(), non_blocking=True)
            views.append(view)
            offset += size
        torch.cuda.current_stream(self.device).synchronize()
        return [view.numpy().copy() for view in views]


# ---------------------------------------------------------------- entry points

def fit_pca_projection(examples: pa.Table, config: FeaturizeConfig) -> np.ndarray:
    """Fit the PCA basis (d, project_dim) in-process on the first `pca_sample_rows` examples."""
    sample = examples.slice(0, config.pca_sample_rows)
    featurizer = Featurizer(replace(config, project_dim=None))
    return pca_projection(featurizer.target_states(sample), config.project_dim)


def with_fitted_projection(config: FeaturizeConfig, examples: pa.Table) -> FeaturizeConfig:
    """``config`` with its PCA basis fitted on the first examples, when one is asked and missing."""
    if config.project_dim is None or config.projection != "pca" or config.projection_matrix is not None:
        return config
    return replace(config, projection_matrix=fit_pca_projection(examples, config))


def featurize_local(examples: pa.Table, config: FeaturizeConfig) -> pa.Table:
    """The Featurizer run in this process on one table, with a PCA basis fitted on that table
    when one is asked: what the tests compare the executors' shards with (the executors build
    their Featurizer from the feature cache's config, its basis fitted on the whole plan)."""
    return Featurizer(with_fitted_projection(config, examples))(examples)
