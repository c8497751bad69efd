"""Whole-model fine-tuning for `fishersft-ray evaluate --mode full|lora`.

`ModelTuner` loads the pretrained causal LM once and fine-tunes it on lists of examples
with a fixed `ModelRecipe`. Every fine-tune restarts from the same point — the pretrained
weights (`full`: every parameter trains) or the same freshly initialised LoRA adapters on
the frozen base (`lora`) — and walks the data in the same seeded order, so between two
fine-tunes only the data differs.

Examples are tokenised exactly as the featurizer does (`featurize.masks.encode_with_targets`, cut
to the model's max length like its "truncate" windows), so the loss covers the very target
tokens whose pre-logit states the selection methods saw. NLL is per target token under the
model's FULL-vocabulary softmax; `head` mode restricts the softmax to the target ids that
occur in the data, so the two modes' NLLs are not on the same scale.

LoRA: rank 16, alpha 32, no dropout, on every linear layer of the transformer blocks
(peft's "all-linear": q/k/v/o and gate/up/down projections for Llama-likes; the LM head is
left out) — the usual placement when the whole network should adapt, not only attention.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from fishersft_ray.featurize.masks import encode_with_targets, max_positions, windows

MODEL_MODES = ("full", "lora")
IGNORE_INDEX = -100  # label of a token the loss skips (Hugging Face's convention)
LORA_SETTINGS = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear",
                 "bias": "none"}


def require_peft() -> None:
    """Fail early, with the fix, when `--mode lora` cannot work."""
    if importlib.util.find_spec("peft") is None:
        raise RuntimeError("--mode lora needs the `peft` package: pip install 'peft>=0.18' "
                           "(or reinstall fishersft-ray, which depends on it)")


def resolve_train_device(device: str) -> str:
    """The fine-tuning device: auto → cuda when a GPU is visible, else cpu; cuda without one is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"train device must be auto, cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--train-device cuda, but torch sees no CUDA GPU")
    return device


def tokenise(tokenizer, messages, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(input ids, labels) of one example, cut to `max_length` like the featurizer's "truncate".

    Labels are the ids at target tokens and IGNORE_INDEX elsewhere, NOT shifted: Hugging
    Face causal LMs shift them internally, so position t's logits are scored on label t+1.
    """
    ids, targets = encode_with_targets(tokenizer, messages)
    (start, end), = windows(len(ids), max_length, "truncate")
    ids = ids[start:end]
    return ids, np.where(targets[start:end], ids, IGNORE_INDEX)


@dataclass(frozen=True)
class ModelRecipe:
    """Fixed whole-model rule: AdamW at `lr` (weight decay 0, linear decay to 0, no warm-up),
    `epochs` passes over the examples in shuffled optimizer steps of at most `batch_tokens`
    tokens (an example longer than that is a step of its own), gradient norm clipped."""

    lr: float
    epochs: float = 1.0
    batch_tokens: int = 1024
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0


def step_batches(lengths: np.ndarray, batch_tokens: int, rng: np.random.Generator) -> list[list[int]]:
    """One epoch: a shuffled order cut into steps of at most `batch_tokens` tokens."""
    batches, current, used = [], [], 0
    for index in rng.permutation(len(lengths)):
        if current and used + lengths[index] > batch_tokens:
            batches.append(current)
            current, used = [], 0
        current.append(int(index))
        used += int(lengths[index])
    return batches + ([current] if current else [])


def micro_batches(indices: list[int], lengths: np.ndarray, micro_batch_tokens: int) -> list[list[int]]:
    """`indices` sorted longest first and cut so that count × longest ≤ micro_batch_tokens
    (a single longer example still gets its own micro-batch)."""
    batches, current = [], []
    for index in sorted(indices, key=lambda i: -lengths[i]):
        if current and (len(current) + 1) * lengths[current[0]] > micro_batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    return batches + ([current] if current else [])


def collate(sequences: list[tuple[np.ndarray, np.ndarray]], device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (padding is IGNORE_INDEX)."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.zeros((len(sequences), width), dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, row_labels) in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.from_numpy(ids)
        attention_mask[row, :len(ids)] = 1
        labels[row, :len(ids)] = torch.from_numpy(row_labels)
    return {name: tensor.to(device) for name, tensor in
            (("input_ids", input_ids), ("attention_mask", attention_mask), ("labels", labels))}


def num_targets(encoded: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    return np.array([int((labels != IGNORE_INDEX).sum()) for _, labels in encoded], np.int64)


class ModelTuner:
    """The pretrained causal LM, loaded once; fine-tunes it (`full` or `lora`) and scores NLL.

    `finetune` changes the model in place; `reset` (called by `finetune` first) puts back the
    pretrained weights, or for `lora` the initial adapters, from a CPU copy of the
    trainable parameters, so a run never re-reads the checkpoint. On "cuda" the forward
    passes run under bf16 autocast; weights and optimizer state stay float32.
    """

    def __init__(self, model_path: str, mode: str, *, device: str = "cpu", seed: int = 0,
                 micro_batch_tokens: int = 2048):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if mode not in MODEL_MODES:
            raise ValueError(f"mode must be one of {MODEL_MODES}, not {mode!r}")
        if mode == "lora":
            require_peft()
        self.mode, self.seed, self.micro_batch_tokens = mode, seed, micro_batch_tokens
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.max_length = max_positions(model.config)
        self.vocab_size = model.config.vocab_size
        if mode == "lora":
            from peft import LoraConfig, get_peft_model

            with torch.random.fork_rng(devices=[]):  # fixed adapter init, the caller's RNG untouched
                torch.manual_seed(seed)
                model = get_peft_model(model, LoraConfig(**LORA_SETTINGS))
        self.model = model.to(self.device)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.initial = [p.detach().to("cpu", copy=True) for p in self.trainable]

    def encode(self, examples: list) -> list[tuple[np.ndarray, np.ndarray]]:
        """(input ids, labels) per example, each given as its normalised messages."""
        return [tokenise(self.tokenizer, messages, self.max_length) for messages in examples]

    def describe(self) -> dict:
        """What is trained and how it is scored (for settings.json)."""
        facts = {"tuned": "model", "optimizer": "AdamW", "train_device": str(self.device),
                 "trained": "all parameters" if self.mode == "full" else "LoRA adapters (frozen base)",
                 "trainable_parameters": sum(p.numel() for p in self.trainable),
                 "total_parameters": sum(p.numel() for p in self.model.parameters()),
                 "softmax": f"full vocabulary ({self.vocab_size} ids); head mode restricts it",
                 "max_length": self.max_length}
        return facts | ({"lora": LORA_SETTINGS} if self.mode == "lora" else {})

    def reset(self) -> None:
        """Back to the pretrained model (`lora`: the initial adapters on the untouched base)."""
        with torch.no_grad():
            for parameter, initial in zip(self.trainable, self.initial):
                parameter.copy_(initial)

    def _autocast(self):
        return (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                else contextlib.nullcontext())

    def _loss(self, batch: dict[str, torch.Tensor], divisor: int) -> torch.Tensor:
        # With num_items_in_batch, HF's causal-LM loss is the SUM over target tokens / divisor.
        with self._autocast():
            return self.model(**batch, num_items_in_batch=divisor, use_cache=False).loss

    def finetune(self, encoded: list[tuple[np.ndarray, np.ndarray]], recipe: ModelRecipe) -> None:
        """Fine-tune a fresh start (see `reset`) on `encoded` examples with the recipe."""
        counts = num_targets(encoded)
        if not counts.sum():
            raise ValueError("no target tokens to fine-tune on (every example's targets are empty "
                             "or cut off by the model's max length)")
        encoded = [example for example, count in zip(encoded, counts) if count]
        counts = counts[counts > 0]
        lengths = np.array([len(ids) for ids, _ in encoded])
        rng = np.random.default_rng(self.seed)
        steps = step_batches(lengths, recipe.batch_tokens, rng)
        num_steps = max(1, math.ceil(recipe.epochs * len(steps)))
        while len(steps) < num_steps:
            steps += step_batches(lengths, recipe.batch_tokens, rng)
        steps = steps[:num_steps]

        self.reset()
        optimizer = torch.optim.AdamW(self.trainable, lr=recipe.lr, weight_decay=recipe.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / num_steps)
        self.model.train()
        for step in steps:
            optimizer.zero_grad(set_to_none=True)
            step_targets = int(counts[step].sum())
            for micro in micro_batches(step, lengths, self.micro_batch_tokens):
                self._loss(collate([encoded[i] for i in micro], self.device), step_targets).backward()
            torch.nn.utils.clip_grad_norm_(self.trainable, recipe.max_grad_norm)
            optimizer.step()
            schedule.step()
        optimizer.zero_grad(set_to_none=True)
        self.model.eval()

    @torch.no_grad()
    def nll(self, encoded: list[tuple[np.ndarray, np.ndarray]]) -> float:
        """Mean NLL per target token of the current model: Σ token losses / Σ target tokens."""
        total_targets = int(num_targets(encoded).sum())
        if not total_targets:
            raise ValueError("no target tokens to score")
        lengths = np.array([len(ids) for ids, _ in encoded])
        self.model.eval()
        total = 0.0
        for micro in micro_batches(list(range(len(encoded))), lengths, self.micro_batch_tokens):
            total += float(self._loss(collate([encoded[i] for i in micro], self.device), 1))
        return total / total_targets

    @torch.no_grad()
    def example_losses(self, encoded: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Each example's summed NLL over its target tokens under the current model (float64)."""
        lengths = np.array([len(ids) for ids, _ in encoded])
        self.model.eval()
        losses = np.zeros(len(encoded))
        for micro in micro_batches(list(range(len(encoded))), lengths, self.micro_batch_tokens):
            batch = collate([encoded[i] for i in micro], self.device)
            labels = batch.pop("labels")
            with self._autocast():
                logits = self.model(**batch, use_cache=False).logits
            # position t predicts token t + 1 (the labels are not shifted, see `tokenise`)
            token_losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none")
            losses[micro] = token_losses.sum(dim=1).double().cpu().numpy()
        return losses


class ModelScorer:
    """Scores the tuner's model as it was when this scorer was made; refuses once it has
    been fine-tuned again (the model is tuned in place to hold one copy in memory)."""

    def __init__(self, trainer: "ModelTrainer"):
        self.trainer, self.generation = trainer, trainer.generation

    def nll(self, part: str) -> float:
        return self._current().tuner.nll(self.trainer.encoded[part])

    def example_losses(self, part: str) -> tuple[np.ndarray, np.ndarray]:
        encoded = self._current().encoded[part]
        return self.trainer.tuner.example_losses(encoded), num_targets(encoded)

    def _current(self) -> "ModelTrainer":
        if self.trainer.generation != self.generation:
            raise RuntimeError("stale scorer: the model has been fine-tuned again since")
        return self.trainer


class ModelTrainer:
    """`evaluate`'s trainer for `full`/`lora`: maps the parts' examples (by their corpus key,
    `TokenStates.row_index`) to the corpus's raw examples and fine-tunes the whole model.

    `examples` is the corpus's examples table (`row_index`, `messages`); `parts` maps
    "pool", "validation" and "test" to their TokenStates (only `row_index` is read).
    """

    def __init__(self, tuner: ModelTuner, examples: pa.Table, parts: dict, *, batch_tokens: int):
        self.tuner, self.batch_tokens, self.generation = tuner, batch_tokens, 0
        messages = examples.column("messages").to_pylist()
        where = {key: position for position, key in enumerate(examples.column("row_index").to_pylist())}
        self.encoded = {name: tuner.encode([messages[where[int(key)]] for key in part.row_index])
                        for name, part in parts.items()}
        self.info = tuner.describe()

    def recipe(self, lr: float, epochs: float) -> ModelRecipe:
        return ModelRecipe(lr=lr, epochs=epochs, batch_tokens=self.batch_tokens)

    def pretrained(self) -> ModelScorer:
        self.tuner.reset()
        self.generation += 1
        return ModelScorer(self)

    def fit(self, positions, recipe: ModelRecipe) -> ModelScorer:
        """Fine-tune afresh on the pool examples at `positions`."""
        pool = self.encoded["pool"]
        self.tuner.finetune([pool[p] for p in positions], recipe)
        self.generation += 1
        return ModelScorer(self)
