"""Rendering and SFT target masks, shared by the featurizer and whole-model fine-tuning.

Every corpus format is normalised at read time (io/corpus.py) to one form: a list of
messages ``{"role", "content", "train"}``. ``train`` marks the turns the SFT loss trains
on. A single message with role ``DOCUMENT_ROLE`` is plain text: rendered as is (with the
tokenizer's special tokens), every token after the first is a target.
"""

from __future__ import annotations

import json
import re

import numpy as np
from jinja2.exceptions import TemplateError

from fishersft_ray.io.corpus import DOCUMENT_ROLE

ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that "
                 "appropriately completes the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n")
# Tokens past the window that a cut content keeps: the tokens around a cut (a word cut in two)
# may differ from the uncut text's, and this margin keeps any such difference out of the window.
CUT_MARGIN_TOKENS = 64
_NON_SPACE = re.compile(r"\S")


class ChatTemplateError(ValueError):
    """The tokenizer's chat template rejected this row (e.g. Mistral's "Conversation roles must
    alternate ..."): a problem of the row, not of the run."""


def as_messages(messages) -> list[dict]:
    """Messages from an examples-table cell (a list of dicts, or its JSON text)."""
    return json.loads(messages) if isinstance(messages, str) else list(messages)


def is_document(messages: list[dict]) -> bool:
    return len(messages) == 1 and messages[0]["role"] == DOCUMENT_ROLE


def render_with_target_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]], bool]:
    """(rendered text, character spans of target text, whether the tokenizer adds special tokens).

    Conversations are rendered with the tokenizer's chat template; a trained turn's span
    runs from the end of the prompt before it (the generation prompt, for an assistant
    turn) to the end of its rendered turn (end-of-turn token included, trailing whitespace
    excluded). A user/assistant pair becomes the classic Alpaca prompt + response + EOS
    when the tokenizer has no chat template.
    """
    if is_document(messages):
        text = messages[0]["content"]
        return text, [(0, len(text))], True
    roles = [m["role"] for m in messages]
    if not tokenizer.chat_template and roles == ["user", "assistant"]:
        prompt = ALPACA_PROMPT.format(prompt=messages[0]["content"])
        text = prompt + messages[1]["content"] + (tokenizer.eos_token or "")
        return text, ([(len(prompt), len(text))] if messages[1]["train"] else []), True
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]

    def render(prefix, generation_prompt=False) -> str:
        try:
            return tokenizer.apply_chat_template(prefix, tokenize=False, add_generation_prompt=generation_prompt)
        except TemplateError as error:
            raise ChatTemplateError(str(error)) from None

    text = render(turns)
    spans = []
    for k, message in enumerate(messages):
        if not message["train"]:
            continue
        before, through = render(turns[:k], message["role"] == "assistant"), render(turns[:k + 1])
        if not (text.startswith(before) and text.startswith(through)):
            raise ValueError("the chat template does not render message prefixes as prefixes "
                             "of the whole conversation; cannot locate the trained turns")
        spans.append((len(before), len(through.rstrip())))
    return text, spans, False


def content_limit(tokenizer, max_length: int) -> int:
    """Characters of a message's content that can matter to its first ``max_length`` tokens:
    a token covers at most as many characters as its vocabulary string is long (a byte-level
    string counts bytes, a byte-fallback piece more), so ``max_length`` tokens never reach past
    ``max_length`` × the longest; plus ``CUT_MARGIN_TOKENS`` of those. A chat template only adds
    text around a content, which moves its cut further from the start, never closer.
    Assumes no normaliser deletes characters."""
    return (max_length + CUT_MARGIN_TOKENS) * max(map(len, tokenizer.get_vocab()))


def cut_content(content: str, limit: int) -> str:
    """``content`` cut ``limit`` characters past its leading whitespace, and past the whitespace
    run the cut would end in: a template that trims the content then still renders the kept
    characters in full."""
    lead = len(content) - len(content.lstrip())
    end = lead + limit
    if end >= len(content):
        return content
    if content[end - 1].isspace():
        following = _NON_SPACE.search(content, end)
        end = following.end() if following else len(content)
    return content[:end]


def cut_messages(messages: list[dict], limit: int) -> list[dict]:
    """The messages with every content cut to ``limit`` (``cut_content``)."""
    return [{**m, "content": cut_content(m["content"], limit)} for m in messages]


def encode_with_targets(tokenizer, messages, max_chars: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (int64) and target flags (bool): True where the SFT loss trains on the token.

    Documents: every token after the first. Conversations: tokens starting inside a
    trained turn's span. Token 0 is never a target (nothing predicts it). ``max_chars``
    (``content_limit``): each content is cut to it first, so a huge row tokenises no more
    than its window needs; the first max_length ids and targets are those of the uncut row.
    A chat template that rejects the row raises ChatTemplateError.
    """
    messages = as_messages(messages)
    if max_chars is not None:
        messages = cut_messages(messages, max_chars)
    text, spans, add_special = render_with_target_spans(tokenizer, messages)
    document = is_document(messages)
    encoding = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=not document)
    ids = np.asarray(encoding["input_ids"], np.int64)
    if document:
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
