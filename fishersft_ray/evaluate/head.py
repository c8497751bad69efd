"""`head` mode of `evaluate`: fine-tune only the LM head (the paper's linearised model) on
stored pre-logit states, scored by held-out NLL under a softmax restricted to the token ids
that occur as targets in pool ∪ validation ∪ test (for the pretrained and every fine-tuned
head alike).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from fishersft_ray.features import TokenStates


def restricted_vocabulary(*parts: TokenStates) -> np.ndarray:
    """Sorted token ids occurring as targets in any part (the softmax's support)."""
    return np.unique(np.concatenate([part.targets for part in parts]))


@dataclass(frozen=True)
class HeadRecipe:
    """Fixed fine-tuning rule: Adam at `lr` (linear decay to 0), `epochs` passes over the
    subset's target tokens in shuffled batches of `batch_tokens`, at least `min_steps` steps."""

    lr: float
    epochs: float
    batch_tokens: int = 1024
    min_steps: int = 10

    def num_steps(self, num_tokens: int) -> int:
        return max(self.min_steps, math.ceil(self.epochs * num_tokens / self.batch_tokens))


@dataclass
class Head:
    """An LM head restricted to a vocabulary: logits = states @ weight.T (+ bias)."""

    weight: torch.Tensor  # (K, d)
    bias: torch.Tensor | None  # (K,)

    @classmethod
    def restricted(cls, weight: np.ndarray, bias: np.ndarray | None, vocabulary: np.ndarray) -> "Head":
        return cls(torch.tensor(np.asarray(weight)[vocabulary], dtype=torch.float32),
                   None if bias is None else torch.tensor(np.asarray(bias)[vocabulary],
                                                          dtype=torch.float32))

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        logits = states @ self.weight.T
        return logits if self.bias is None else logits + self.bias


def head_nll(head: Head, states: np.ndarray, targets: np.ndarray, chunk_tokens: int = 4096) -> float:
    """Mean NLL per target token; `targets` index the head's (restricted) vocabulary."""
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(targets), chunk_tokens):
            x = torch.from_numpy(states[start:start + chunk_tokens])
            y = torch.from_numpy(targets[start:start + chunk_tokens])
            total += float(torch.nn.functional.cross_entropy(head.logits(x), y, reduction="sum"))
    return total / len(targets)


def head_example_losses(head: Head, part: TokenStates, chunk_tokens: int = 4096) -> np.ndarray:
    """Each example's summed NLL over its target tokens (float64); ``part.targets`` index the
    head's (restricted) vocabulary."""
    token_losses = np.empty(len(part.targets))
    with torch.no_grad():
        for start in range(0, len(part.targets), chunk_tokens):
            x = torch.from_numpy(part.states[start:start + chunk_tokens])
            y = torch.from_numpy(part.targets[start:start + chunk_tokens])
            token_losses[start:start + len(y)] = torch.nn.functional.cross_entropy(
                head.logits(x), y, reduction="none").numpy()
    owner = np.repeat(np.arange(part.num_examples), part.num_targets)
    return np.bincount(owner, token_losses, part.num_examples)


def finetune_head(head: Head, states: np.ndarray, targets: np.ndarray, recipe: HeadRecipe,
                  seed: int = 0) -> Head:
    """Fine-tune a copy of `head` on (state, target) pairs with the recipe; same seed for
    every method so only the data differs."""
    weight = head.weight.clone().requires_grad_(True)
    bias = None if head.bias is None else head.bias.clone().requires_grad_(True)
    tuned = Head(weight, bias)
    parameters = [p for p in (weight, bias) if p is not None]
    steps = recipe.num_steps(len(targets))
    optimizer = torch.optim.Adam(parameters, lr=recipe.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    x_all, y_all = torch.from_numpy(states), torch.from_numpy(targets)
    generator = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(len(targets), generator=generator), 0
    for _ in range(steps):
        if cursor >= len(order):
            order, cursor = torch.randperm(len(targets), generator=generator), 0
        batch = order[cursor:cursor + recipe.batch_tokens]
        cursor += recipe.batch_tokens
        loss = torch.nn.functional.cross_entropy(tuned.logits(x_all[batch]), y_all[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return Head(weight.detach(), None if bias is None else bias.detach())


@dataclass
class HeadScorer:
    head: Head
    parts: dict[str, TokenStates]

    def nll(self, part: str) -> float:
        return head_nll(self.head, self.parts[part].states, self.parts[part].targets)

    def example_losses(self, part: str) -> tuple[np.ndarray, np.ndarray]:
        return head_example_losses(self.head, self.parts[part]), self.parts[part].num_targets


class HeadTrainer:
    """`head` mode: fine-tunes the LM head on stored states, softmax over the targets' vocabulary."""

    def __init__(self, pool: TokenStates, validation: TokenStates, test: TokenStates, weight: np.ndarray,
                 bias: np.ndarray | None, *, batch_tokens: int, seed: int):
        vocabulary = restricted_vocabulary(pool, validation, test)
        self.head = Head.restricted(weight, bias, vocabulary)
        self.parts = {name: dataclasses.replace(part, targets=np.searchsorted(vocabulary, part.targets))
                      for name, part in (("pool", pool), ("validation", validation), ("test", test))}
        self.batch_tokens, self.seed = batch_tokens, seed
        self.info = {"tuned": "head", "optimizer": "Adam", "vocabulary_size": int(len(vocabulary)),
                     "softmax": "restricted to the token ids occurring as targets in pool, validation, test"}

    def recipe(self, lr: float, epochs: float) -> HeadRecipe:
        return HeadRecipe(lr=lr, epochs=epochs, batch_tokens=self.batch_tokens)

    def pretrained(self) -> HeadScorer:
        return HeadScorer(self.head, self.parts)

    def fit(self, positions: np.ndarray, recipe: HeadRecipe) -> HeadScorer:
        subset = self.parts["pool"].subset(positions)
        tuned = finetune_head(self.head, subset.states, subset.targets, recipe, self.seed)
        return HeadScorer(tuned, self.parts)

