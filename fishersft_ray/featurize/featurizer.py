"""The featurizer: any Hugging Face causal LM → per-example factors of A_i = X_iᵀ X_i.

`Featurizer` is the actor of the featurize stage (run/executors.py runs it on a Ray Data
actor pool, or in-process): it loads the tokenizer and the BASE model once (no LM head: its
pre-logit state is the base model's `last_hidden_state`, after the final norm), tokenises
rows with target masks (featurize/masks.py), runs length-sorted micro-batches under a token
budget, gathers the state at every position that predicts a target token, and emits one
`features.SHARD_SCHEMA` row per example.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pyarrow as pa
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from fishersft_ray.faults import maybe_crash
from fishersft_ray.config import FeaturizeConfig
from fishersft_ray.features import factor_from_rows, mean_rows, shard_table, with_token_states
from fishersft_ray.featurize.masks import encode_with_targets, max_positions, windows
from fishersft_ray.featurize.model_ref import ModelRef, resolve_model

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


class HFBackend:
    """The model backend: transformers' Auto classes on the model's local directory. Another
    backend (vLLM, or random weights built from a config for benchmarks) returns the same
    four things from ``load``."""

    def load(self, model_ref: ModelRef, *, device: torch.device, dtype: torch.dtype, with_head: bool):
        """(tokenizer, base model (its ``last_hidden_state`` is the pre-logit state), LM head
        or None, model config); the base model in eval mode on ``device``."""
        tokenizer = AutoTokenizer.from_pretrained(model_ref.path)
        head = None
        if with_head:  # load the causal LM, keep both parts
            causal = AutoModelForCausalLM.from_pretrained(model_ref.path, dtype=dtype,
                                                          attn_implementation="sdpa").to(device).eval()
            model, head = causal.base_model, causal.get_output_embeddings()
        else:
            model = AutoModel.from_pretrained(model_ref.path, dtype=dtype,
                                              attn_implementation="sdpa").to(device).eval()
        return tokenizer, model, head, AutoConfig.from_pretrained(model_ref.path)


class Featurizer:
    """Callable class for `map_batches(batch_format="pyarrow")`: examples → SHARD_SCHEMA rows."""

    def __init__(self, config: FeaturizeConfig, backend=None):
        self.config = config
        self.model_ref = config.model if isinstance(config.model, ModelRef) else resolve_model(config.model)
        use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if use_cuda else "cpu")
        dtype = torch.bfloat16 if use_cuda else torch.float32
        self.tokenizer, self.model, self.head, model_config = (backend or HFBackend()).load(
            self.model_ref, device=self.device, dtype=dtype, with_head=config.token_weights == "loss")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        model_max = max_positions(model_config)
        self.max_length = min(config.max_length or model_max, model_max)
        self.dim = model_config.hidden_size
        self.projection = self._projection()
        self.real_tokens = 0
        self.padded_tokens = 0
        # Seconds per phase over every call (what a Ray actor spends where); see `timed`.
        self.seconds = dict.fromkeys(("tokenize", "pad", "forward", "gather_copy", "factors", "table"), 0.0)

    def _projection(self) -> np.ndarray | None:
        config = self.config
        if config.project_dim is None:
            return None
        if config.projection == "random":
            return random_projection(self.dim, config.project_dim, config.projection_seed)
        if config.projection == "pca":
            if config.projection_matrix is None:
                raise ValueError("projection='pca' needs projection_matrix: fit it with "
                                 "fit_pca_projection (featurize_dataset/featurize_local do)")
            return np.asarray(config.projection_matrix, np.float32)
        raise ValueError(f"projection must be 'random' or 'pca', not {config.projection!r}")

    @contextmanager
    def timed(self, phase: str):
        """Add the wall time of the block to ``seconds[phase]``; on a GPU the queued kernels are
        waited for first, so a phase is charged its own device work."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[phase] += time.perf_counter() - start

    @property
    def padding_fraction(self) -> float:
        """Share of the forward passes' token slots that were padding, so far."""
        return self.padded_tokens / max(self.real_tokens + self.padded_tokens, 1)

    def encode(self, batch: pa.Table) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each row's (token ids, target flags), from its normalised ``messages``."""
        return [encode_with_targets(self.tokenizer, messages)
                for messages in batch.column("messages").to_pylist()]

    def pieces(self, encoded: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(example, window token ids, window positions whose NEXT token is a target) per window."""
        pieces = []
        for example, (ids, targets) in enumerate(encoded):
            for start, end in windows(len(ids), self.max_length, self.config.overlong):
                pieces.append((example, ids[start:end], np.flatnonzero(targets[start + 1:end])))
        return pieces

    def micro_batches(self, pieces: list) -> list[list]:
        """Pieces sorted by length (longest first), cut when count × longest would pass
        micro_batch_tokens or the batch's padding share would pass max_padding."""
        batches, current, longest, real = [], [], 0, 0
        for piece in sorted(pieces, key=lambda p: -len(p[1])):
            length, slots = len(piece[1]), (len(current) + 1) * longest
            if current and (slots > self.config.micro_batch_tokens
                            or 1 - (real + length) / slots > self.config.max_padding):
                batches.append(current)
                current = []
            if not current:
                longest, real = length, 0
            current.append(piece)
            real += length
        return batches + ([current] if current else [])

    def target_states(self, encoded: list[tuple[np.ndarray, np.ndarray]],
                      units: list[int] | None = None) -> list[np.ndarray]:
        """Per example, X_i (m_i, d) float32: the pre-logit states predicting its target tokens.

        With ``units`` (one id per example, see run/feature_cache.plan_forward_units) each unit is
        micro-batched on its own, so an example's forward pass — and its float bits — depend
        only on its unit, not on which other rows share this call.
        """
        states = [[] for _ in encoded]
        pieces = self.pieces(encoded)
        groups = [pieces] if units is None else \
            [[p for p in pieces if units[p[0]] == unit] for unit in dict.fromkeys(units)]
        for group in groups:
            for micro_batch in self.micro_batches(group):
                for (example, _, _), rows in zip(micro_batch, self._forward(micro_batch)):
                    states[example].append(rows)
        return [np.concatenate(rows) if rows else np.zeros((0, self.dim), np.float32)
                for rows in states]

    @torch.inference_mode()
    def token_weights(self, states: list[np.ndarray], target_ids: list[np.ndarray]) -> list[np.ndarray] | None:
        """Per example, the weight of each target-token row (``loss_weights``); None if unweighted."""
        if self.head is None:
            return None
        lengths = [len(X) for X in states]
        if not sum(lengths):
            return [np.zeros(0, np.float32) for _ in states]
        flat = torch.from_numpy(np.concatenate(states)).to(self.device)
        targets = torch.from_numpy(np.concatenate(target_ids).astype(np.int64)).to(self.device)
        bias = getattr(self.head, "bias", None)
        weights = loss_weights(flat, targets, self.head.weight, bias).cpu().numpy()
        return np.split(weights, np.cumsum(lengths)[:-1])

    def pad(self, micro_batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, position_ids) of a micro-batch, padded on the tokenizer's side."""
        padded = self.tokenizer.pad({"input_ids": [ids.tolist() for _, ids, _ in micro_batch]},
                                    return_tensors="pt")
        attention_mask = padded["attention_mask"]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # right for either padding side
        return padded["input_ids"], attention_mask, position_ids

    @torch.inference_mode()
    def _forward(self, pieces) -> list[np.ndarray]:
        """One padded forward pass; per piece, the fp32 states at its predictor positions."""
        with self.timed("pad"):
            input_ids, attention_mask, position_ids = (t.to(self.device) for t in self.pad(pieces))
        self.real_tokens += int(attention_mask.sum())
        self.padded_tokens += int(attention_mask.numel() - attention_mask.sum())
        with self.timed("forward"):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=False).last_hidden_state
        with self.timed("gather_copy"):
            width = hidden.shape[1]
            first_real = ((width - attention_mask.sum(-1)).cpu() if self.tokenizer.padding_side == "left"
                          else torch.zeros(len(pieces), dtype=torch.long))
            flat_index = np.concatenate([row * width + int(first_real[row]) + predictors
                                         for row, (_, _, predictors) in enumerate(pieces)])
            gathered = hidden.reshape(-1, hidden.shape[-1])[torch.from_numpy(flat_index).to(self.device)]
            gathered = gathered.float().cpu().numpy()
        return np.split(gathered, np.cumsum([len(p) for _, _, p in pieces])[:-1])

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Examples (row_index, id, messages[, unit]) → one SHARD_SCHEMA row each."""
        with self.timed("tokenize"):
            encoded = self.encode(batch)
        units = batch.column("unit").to_pylist() if "unit" in batch.column_names else None
        all_states = self.target_states(encoded, units)
        # Truncation keeps a prefix of the targets, so the first len(X) target ids match X's rows.
        target_ids = [ids_[1:][targets[1:]][:len(X)] for (ids_, targets), X in zip(encoded, all_states)]
        ids = batch.column("id").to_pylist()
        for row_id, X in zip(ids, all_states):
            if not np.isfinite(X).all():
                raise ValueError(f"row id {row_id!r}: non-finite hidden states (NaN/Inf) from the model")
        weights = self.token_weights(all_states, target_ids)
        factors, spectra, embeddings = [], [], []
        with self.timed("factors"):
            for position, X in enumerate(all_states):
                rows = X if self.projection is None else X @ self.projection
                embeddings.append(mean_rows(rows, rows.shape[1]))
                if weights is not None:
                    rows = rows * np.sqrt(weights[position])[:, None]
                factor, spectrum = factor_from_rows(rows, self.config.max_rank)
                factors.append(factor)
                spectra.append(spectrum)
        num_tokens = [len(ids_) for ids_, _ in encoded]
        out_dim = self.dim if self.projection is None else self.projection.shape[1]
        with self.timed("table"):
            table = shard_table({
                "row_index": batch.column("row_index").to_pylist(), "id": ids,
                "num_tokens": [min(n, self.max_length) if self.config.overlong == "truncate" else n
                               for n in num_tokens],
                "num_targets": [len(X) for X in all_states],
                "truncated": [self.config.overlong == "truncate" and n > self.max_length for n in num_tokens],
                "factor": factors, "spectrum": spectra, "embedding": embeddings,
            }, dim=out_dim, meta={"model": self.model_ref.name, "model_fingerprint": self.model_ref.fingerprint,
                                  "token_weights": self.config.token_weights})
            if self.config.keep_states:
                table = with_token_states(table, all_states, target_ids)
        maybe_crash("featurize")
        return table


# ---------------------------------------------------------------- entry points

def fit_pca_projection(examples: pa.Table, config: FeaturizeConfig) -> np.ndarray:
    """Fit the PCA basis (d, project_dim) in-process on the first `pca_sample_rows` examples."""
    sample = examples.slice(0, config.pca_sample_rows)
    featurizer = Featurizer(replace(config, project_dim=None))
    return pca_projection(featurizer.target_states(featurizer.encode(sample)), config.project_dim)


def with_fitted_projection(config: FeaturizeConfig, examples: pa.Table) -> FeaturizeConfig:
    """``config`` with its PCA basis fitted on the first examples, when one is asked and missing."""
    if config.project_dim is None or config.projection != "pca" or config.projection_matrix is not None:
        return config
    return replace(config, projection_matrix=fit_pca_projection(examples, config))


def featurize_local(examples: pa.Table, config: FeaturizeConfig) -> pa.Table:
    """Run the Featurizer in this process on one table (the local executor runs it per block)."""
    return Featurizer(with_fitted_projection(config, examples))(examples)
