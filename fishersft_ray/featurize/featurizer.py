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
from fishersft_ray.features.embeddings import mean_rows
from fishersft_ray.features.schema import SKIP_REASON, shard_table
from fishersft_ray.features.states import with_token_states
from fishersft_ray.features.storage_rule import device_factors, factor_from_rows, stored_factor
from fishersft_ray.featurize.masks import (ChatTemplateError, content_limit, encode_with_targets, max_positions,
                                           windows)
from fishersft_ray.featurize.model_ref import ModelRef, resolve_model

LOSS_WEIGHT_CHUNK_TOKENS = 1024  # logits materialised at once: chunk × vocabulary floats
CHAT_TEMPLATE_SKIP = "chat_template"  # the skip reason of a row its chat template rejects
NO_TOKENS = (np.zeros(0, np.int64), np.zeros(0, bool))


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
    """The default model backend: transformers' Auto classes on the model's local directory.
    Another backend (vLLM, or random weights built from a config for benchmarks) returns the
    same four things from ``load``."""

    def load(self, model_ref: ModelRef, *, device: torch.device, dtype: torch.dtype, with_head: bool):
        """(tokenizer, base model (its ``last_hidden_state`` is the pre-logit state), LM head
        or None, model config); the base model in eval mode on ``device``."""
        path = model_ref.local_path()  # fetched or converted once per node
        tokenizer = AutoTokenizer.from_pretrained(path)
        head = None
        if with_head:  # load the causal LM, keep both parts
            causal = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                          attn_implementation="sdpa").to(device).eval()
            model, head = causal.base_model, causal.get_output_embeddings()
        else:
            model = AutoModel.from_pretrained(path, dtype=dtype,
                                              attn_implementation="sdpa").to(device).eval()
        return tokenizer, model, head, AutoConfig.from_pretrained(path)


# The model backends by ``FeaturizeConfig.backend``: classes whose instances have
# ``HFBackend.load``'s signature. Register another where the featurizer's workers import it.
BACKENDS = {"hf": HFBackend}


class Featurizer:
    """Callable class for `map_batches(batch_format="pyarrow")`: examples → SHARD_SCHEMA rows."""

    def __init__(self, config: FeaturizeConfig):
        self.config = config
        self.model_ref = config.model if isinstance(config.model, ModelRef) else resolve_model(config.model)
        use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if use_cuda else "cpu")
        dtype = torch.bfloat16 if use_cuda else torch.float32
        if config.backend not in BACKENDS:
            raise ValueError(f"unknown model backend {config.backend!r}; registered: {', '.join(BACKENDS)}")
        self.backend = BACKENDS[config.backend]()
        self.tokenizer, self.model, self.head, model_config = self.backend.load(
            self.model_ref, device=self.device, dtype=dtype, with_head=config.token_weights == "loss")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        model_max = max_positions(model_config)
        self.max_length = min(config.max_length or model_max, model_max)
        # Contents are cut before tokenising where the rest cannot reach the window (truncate).
        self.content_limit = content_limit(self.tokenizer, self.max_length) if config.overlong == "truncate" else None
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

    def encode(self, batch: pa.Table) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each row's (token ids, target flags), from its normalised ``messages``."""
        return [self.encode_row(messages)[0] for messages in batch.column("messages").to_pylist()]

    def encode_row(self, messages) -> tuple[tuple[np.ndarray, np.ndarray], str | None]:
        """A row's (token ids, target flags), its contents cut to what the window can reach;
        and why it has none (``SKIP_REASON``), else None. A chat template that rejects the row
        gives it no tokens: whether that stops the job or skips the row is the driver's call
        (--on-bad-row), made once the row is named in the shards."""
        try:
            return encode_with_targets(self.tokenizer, messages, self.content_limit), None
        except ChatTemplateError as error:
            return NO_TOKENS, f"{CHAT_TEMPLATE_SKIP}: {error}"

    def pieces(self, encoded: list, examples=None) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """(example, window token ids, window positions whose NEXT token is a target) per window
        of the ``examples`` (positions into ``encoded``; default: all)."""
        pieces = []
        for example in range(len(encoded)) if examples is None else examples:
            ids, targets = encoded[example]
            if not len(ids):  # rejected by its chat template: nothing to run
                continue
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
        """Per example, X_i (m_i, d) float32 on the host: the pre-logit states predicting its
        target tokens (see ``device_states``)."""
        return [X.cpu().numpy() for X in self.device_states(encoded, units)]

    @torch.inference_mode()
    def device_states(self, encoded: list, units: list[int] | None = None, messages: list | None = None,
                      skip_reasons: list | None = None) -> list[torch.Tensor]:
        """Per example, X_i (m_i, d) float32 on the featurizer's device.

        With ``units`` (one id per example, see run/feature_cache.plan_forward_units) each unit
        is micro-batched on its own, so an example's forward pass — and its float bits — depend
        only on its unit, not on which other rows share this call. With ``messages`` the
        examples are tokenised here, unit by unit, into ``encoded``: a unit's tokenising and
        padding run on the host while the device still computes the previous unit's forward
        passes (nothing waits for the device until the caller reads the states), and each row's
        skip reason (``encode_row``) goes into ``skip_reasons``.
        """
        count = len(messages) if messages is not None else len(encoded)
        units = [0] * count if units is None else units
        members: dict = {}
        for example, unit in enumerate(units):
            members.setdefault(unit, []).append(example)
        rows: list[list] = [[] for _ in range(count)]
        for group in members.values():
            if messages is not None:
                with self.timed("tokenize"):
                    for example in group:
                        encoded[example], skip_reasons[example] = self.encode_row(messages[example])
            for micro_batch in self.micro_batches(self.pieces(encoded, group)):
                for (example, _, _), piece_rows in zip(micro_batch, self._forward(micro_batch)):
                    rows[example].append(piece_rows)
        empty = torch.zeros((0, self.dim), dtype=torch.float32, device=self.device)
        return [torch.cat(parts) if len(parts) > 1 else (parts[0] if parts else empty) for parts in rows]

    @torch.inference_mode()
    def token_weights(self, states: list[torch.Tensor], target_ids: list[np.ndarray]) -> list[torch.Tensor] | None:
        """Per example, the weight of each target-token row (``loss_weights``); None if unweighted."""
        if self.head is None:
            return None
        lengths = [len(X) for X in states]
        if not sum(lengths):
            return [torch.zeros(0, device=self.device) for _ in states]
        targets = torch.from_numpy(np.concatenate(target_ids).astype(np.int64)).to(self.device)
        bias = getattr(self.head, "bias", None)
        weights = loss_weights(torch.cat(states), targets, self.head.weight, bias)
        return list(torch.split(weights, lengths))

    def pad(self, micro_batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, position_ids) of a micro-batch, padded on the tokenizer's side."""
        padded = self.tokenizer.pad({"input_ids": [ids.tolist() for _, ids, _ in micro_batch]},
                                    return_tensors="pt")
        attention_mask = padded["attention_mask"]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # right for either padding side
        return padded["input_ids"], attention_mask, position_ids

    @torch.inference_mode()
    def _forward(self, pieces) -> list[torch.Tensor]:
        """One padded forward pass; per piece, the float32 states at its predictor positions,
        left on the device."""
        with self.timed("pad"):
            input_ids, attention_mask, position_ids = self.pad(pieces)
            width = input_ids.shape[1]
            first_real = ((width - attention_mask.sum(-1)) if self.tokenizer.padding_side == "left"
                          else torch.zeros(len(pieces), dtype=torch.long))
            flat_index = torch.from_numpy(np.concatenate([row * width + int(first_real[row]) + predictors
                                                          for row, (_, _, predictors) in enumerate(pieces)]))
            self.real_tokens += int(attention_mask.sum())
            self.padded_tokens += int(attention_mask.numel() - attention_mask.sum())
            input_ids, attention_mask, position_ids, flat_index = (
                t.to(self.device, non_blocking=True) for t in (input_ids, attention_mask, position_ids, flat_index))
        with self.timed("forward"):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=False).last_hidden_state
        with self.timed("gather"):
            gathered = hidden.reshape(-1, hidden.shape[-1])[flat_index].float()
        return list(torch.split(gathered, [len(p) for _, _, p in pieces]))

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Examples (row_index, id, messages[, unit]) → one SHARD_SCHEMA row each, plus its
        ``skip_reason`` (features.SKIP_REASON)."""
        encoded: list = [None] * batch.num_rows
        skip_reasons: list = [None] * batch.num_rows
        units = batch.column("unit").to_pylist() if "unit" in batch.column_names else None
        states = self.device_states(encoded, units, batch.column("messages").to_pylist(), skip_reasons)
        # Truncation keeps a prefix of the targets, so the first len(X) target ids match X's rows.
        target_ids = [ids_[1:][targets[1:]][:len(X)] for (ids_, targets), X in zip(encoded, states)]
        ids = batch.column("id").to_pylist()
        weights = self.token_weights(states, target_ids)
        with self.timed("factors"):
            if self.device.type == "cuda":
                host_states, factors, spectra, embeddings = self._storage_rule_on_device(states, weights, ids)
            else:
                host_states, factors, spectra, embeddings = self._storage_rule_on_host(states, weights, ids)
            if self.config.factor_dtype != "float32":
                factors, spectra = self._stored_factors(factors, spectra, ids)
        num_tokens = [len(ids_) for ids_, _ in encoded]
        out_dim = self.dim if self.projection is None else self.projection.shape[1]
        with self.timed("table"):
            table = shard_table({
                "row_index": batch.column("row_index").to_pylist(), "id": ids,
                "num_tokens": [min(n, self.max_length) if self.config.overlong == "truncate" else n
                               for n in num_tokens],
                "num_targets": [len(X) for X in states],
                "truncated": [self.config.overlong == "truncate" and n > self.max_length for n in num_tokens],
                "factor": factors, "spectrum": spectra, "embedding": embeddings,
            }, dim=out_dim, meta={"model": self.model_ref.name, "model_fingerprint": self.model_ref.fingerprint,
                                  "token_weights": self.config.token_weights},
                factor_dtype=self.config.factor_dtype)
            table = table.append_column(SKIP_REASON, pa.array(skip_reasons, pa.string()))
            if self.config.keep_states:
                table = with_token_states(table, host_states, target_ids)
        maybe_crash("featurize")
        return table

    def _stored_factors(self, factors, spectra, ids):
        """Factors rounded to ``--factor-dtype`` with their spectra recomputed (features.stored_factor)."""
        stored = []
        for row_id, factor, spectrum in zip(ids, factors, spectra):
            try:
                stored.append(stored_factor(factor, spectrum, self.config.factor_dtype))
            except ValueError as error:
                raise ValueError(f"row id {row_id!r}: {error}") from None
        return [f for f, _ in stored], [s for _, s in stored]

    def _storage_rule_on_host(self, states, weights, ids):
        """The storage rule per example in numpy float64 (features.factor_from_rows): the CPU path."""
        host_states = [X.numpy() for X in states]
        for row_id, X in zip(ids, host_states):
            if not np.isfinite(X).all():
                raise ValueError(f"row id {row_id!r}: non-finite hidden states (NaN/Inf) from the model")
        factors, spectra, embeddings = [], [], []
        for position, X in enumerate(host_states):
            rows = X if self.projection is None else X @ self.projection
            embeddings.append(mean_rows(rows, rows.shape[1]))
            if weights is not None:
                rows = rows * np.sqrt(weights[position].numpy())[:, None]
            factor, spectrum = factor_from_rows(rows, self.config.max_rank)
            factors.append(factor)
            spectra.append(spectrum)
        return host_states, factors, spectra, embeddings

    @torch.inference_mode()
    def _storage_rule_on_device(self, states, weights, ids):
        """The storage rule for the whole call on the GPU: projection, token weights, the
        spectra of X Xᵀ batched in float64 (``device_spectra``), eigen factors past d; then
        ONE copy of every factor (and stored state) into pinned host memory."""
        lengths = [len(X) for X in states]
        flat = torch.cat(states) if sum(lengths) else torch.zeros((0, self.dim), device=self.device)
        finite = torch.isfinite(flat).all(dim=1)
        if not bool(finite.all()):
            example = int(np.searchsorted(np.cumsum(lengths), int(torch.nonzero(~finite)[0, 0]), side="right"))
            raise ValueError(f"row id {ids[example]!r}: non-finite hidden states (NaN/Inf) from the model")
        rows = flat if self.projection is None else flat @ self._device_projection()
        embeddings = [X.double().mean(0).float() if len(X) else torch.zeros(rows.shape[1], device=self.device)
                      for X in torch.split(rows, lengths)]
        if weights is not None:
            rows = rows * torch.cat(weights).sqrt()[:, None]
        factors, spectra = device_factors(list(torch.split(rows, lengths)), self.config.max_rank)
        to_host = [flat] if self.config.keep_states else []
        host = self._to_pinned_host(to_host + [torch.cat(factors), torch.cat(spectra), torch.stack(embeddings)])
        factor_rows = [len(F) for F in factors]
        host_factors = np.split(host[-3], np.cumsum(factor_rows)[:-1])
        host_spectra = np.split(host[-2], np.cumsum(factor_rows)[:-1])
        host_states = np.split(host[0], np.cumsum(lengths)[:-1]) if self.config.keep_states else None
        return host_states, host_factors, host_spectra, list(host[-1])

    def _device_projection(self) -> torch.Tensor:
        if not hasattr(self, "_projection_on_device"):
            self._projection_on_device = torch.from_numpy(self.projection).to(self.device)
        return self._projection_on_device

    def _to_pinned_host(self, tensors: list[torch.Tensor]) -> list[np.ndarray]:
        """Device tensors copied into page-locked host memory (one buffer, reused by the next
        call: the views are valid until then), queued together and waited for once:
        page-locked copies run at the bus's speed."""
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
        return [view.numpy() for view in views]


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
    """The Featurizer run in this process on one table, with a PCA basis fitted on that table
    when one is asked: what the tests compare the executors' shards with (the executors build
    their Featurizer from the feature cache's config, its basis fitted on the whole plan)."""
    return Featurizer(with_fitted_projection(config, examples))(examples)
