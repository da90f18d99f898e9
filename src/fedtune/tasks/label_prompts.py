"""Classification as text for a causal LM: each row's prompt, the label words, answers parsed back.

Generative classification (``data.task = "generative_classification"``) puts a row's text into
``data.prompt_template`` and teaches the model to answer with the label's name. Two renderings
(``data.prompt_format``):

- **chat** (``"chat"``, or ``"auto"`` with a tokenizer that has a chat template, e.g. SmolLM2):
  the filled-in template is the user's turn and the label's name the assistant's, rendered by the
  model's own chat template; the loss is on the assistant's tokens (the name and the template's
  end-of-turn marker). Default template: :data:`CHAT_TEMPLATE`.
- **plain** (otherwise, a base model): BOS + the filled-in template, continued by ``" " + name``
  and EOS; the loss on those. Default template: :data:`PLAIN_TEMPLATE`.

``{text}`` (and ``{text_pair}``) are the row's texts and ``{labels}`` the label names joined by
", ". A row is fitted to ``data.max_length`` by cutting its text, never the instruction around it
or the answer.

Two predictions, reported side by side by the task:

- **constrained**: the label whose tokens have the highest length-normalized log-likelihood after
  the prompt (the answer is always a label);
- **generative** (``eval.generative``): a greedy answer, parsed by :meth:`LabelPrompts.parse` to the
  label name that occurs first in it (case-insensitive, as a whole word; at one position the longer
  name wins); an answer naming no label is *unparsed* and counted wrong.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from fedtune.batching import bounded_text
from fedtune.tasks.causal_lm import IGNORE_INDEX, Instruction, _ids, candidate_ids
from fedtune.tasks.prompt_format import PromptFormat, PromptFormatError, PromptFormatName

PLAIN_TEMPLATE = "{text}\nLabel:"
"""The prompt of a base model when ``data.prompt_template`` is empty."""
CHAT_TEMPLATE = "{text}\n\nAnswer with one of: {labels}."
"""The user's turn of a chat model when ``data.prompt_template`` is empty."""


def default_template(chat: bool) -> str:
    """The template used when ``data.prompt_template`` is empty."""
    return CHAT_TEMPLATE if chat else PLAIN_TEMPLATE


class LabelPrompts:
    """One tokenizer's rendering of classification rows: prompt ids, answer tokens, candidates, parsing."""

    def __init__(self, tokenizer, label_names: Sequence[str], *, template: str = "",
                 prompt_format: PromptFormatName = "auto",
                 max_length: int) -> None:
        self.tokenizer, self.label_names, self.max_length = tokenizer, list(label_names), max_length
        self.format = PromptFormat(tokenizer, prompt_format)
        self.chat = self.format.chat
        self.template = template or default_template(self.chat)
        self.tails = [self._tail(i) for i in range(len(self.label_names))]
        """Each label's training continuation: (ids, labels) after the prompt."""
        self.candidates = self._candidates()
        """Each label's answer tokens as they follow the prompt, without the end marker (the constrained
        prediction's continuations)."""
        self.longest = max(len(ids) for ids, _ in self.tails)
        bare = len(self._prompt_ids("", ""))
        if bare + self.longest >= max_length:
            raise PromptFormatError(f"data.prompt_template renders {bare} tokens without any text and the longest "
                                    f"answer takes {self.longest}: no room for the text within data.max_length = "
                                    f"{max_length}; raise data.max_length or shorten the template")
        self._patterns = [re.compile(r"(?<!\w)" + re.escape(n.strip().lower()) + r"(?!\w)") for n in self.label_names]

    @property
    def format_name(self) -> str:
        """``"chat"`` or ``"alpaca"`` (plain): the resolved ``data.prompt_format``, as the model's metadata records it."""
        return self.format.name

    # ------------------------------------------------------------------ prompts

    def fill(self, text: str, text_pair: str = "") -> str:
        """The template filled in with one row's texts (the user's turn when chat)."""
        return self.template.format(text=text, text_pair=text_pair, labels=", ".join(self.label_names))

    def prompt_text(self, text: str, text_pair: str = "") -> str:
        """The whole prompt as text (chat: rendered with the generation prompt), before fitting."""
        filled = self.fill(text, text_pair)
        return self.format.prompt_text(Instruction(filled, "", "")) if self.chat else filled

    def _prompt_ids(self, text: str, text_pair: str) -> list[int]:
        if self.chat:
            return self.format.prompt_ids(Instruction(self.fill(text, text_pair), "", ""))
        return _ids(self.tokenizer, self.fill(text, text_pair), bos=True)

    def prompt_ids(self, text: str, text_pair: str = "") -> list[int]:
        """Token ids of one row's prompt, its text cut so the prompt and the longest answer fit ``max_length``."""
        text = bounded_text(self.tokenizer, text, self.max_length)
        text_pair = bounded_text(self.tokenizer, text_pair, self.max_length)
        ids = self._prompt_ids(text, text_pair)
        for _ in range(8):  # cutting tokens from the text shortens the prompt by about as many
            over = len(ids) + self.longest - self.max_length
            if over <= 0:
                return ids
            text, text_pair = self._cut(text, text_pair, over)
            ids = self._prompt_ids(text, text_pair)
        return self._prompt_ids("", "") if len(ids) + self.longest > self.max_length else ids

    def _cut(self, text: str, text_pair: str, tokens: int) -> tuple[str, str]:
        """Both texts, the longer one shorter by ``tokens`` tokens."""
        enc = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in (text, text_pair)]
        k = 0 if len(enc[0]) >= len(enc[1]) else 1
        kept = self.tokenizer.decode(enc[k][: max(0, len(enc[k]) - tokens)], skip_special_tokens=True)
        return (kept, text_pair) if k == 0 else (text, kept)

    # ------------------------------------------------------------------ training rows

    def _candidates(self) -> list[list[int]]:
        if not self.chat:
            return [ids[:-1] for ids, _ in self.tails]
        end = self._tail(None)[0]  # what an empty answer renders: the end of the turn alone
        return [ids[: len(ids) - len(end)] if end and ids[len(ids) - len(end):] == end else ids
                for ids, _ in self.tails]

    def _tail(self, label: int | None) -> tuple[list[int], list[int]]:
        """The tokens after the prompt for ``label``: the answer and its end (EOS, or the chat end-of-turn)."""
        if not self.chat:
            if label is None:  # (only a chat template renders an empty answer: _candidates asks for it there)
                raise ValueError("a plain prompt format has no empty answer (its answers end with EOS)")
            ids = candidate_ids(self.tokenizer, [" " + self.label_names[label]])[0] + [self.tokenizer.eos_token_id]
            return ids, list(ids)
        answer = "" if label is None else self.label_names[label]
        example = Instruction(self.fill("x"), "", answer)
        prompt = self.format.prompt_ids(example)
        enc = self.format.encode([example], 1 << 30)
        ids, labels = enc.input_ids[0], enc.labels[0]
        if ids[: len(prompt)] != prompt or (answer and all(t == IGNORE_INDEX for t in labels[len(prompt):])):
            raise PromptFormatError("the tokenizer's chat template does not tokenize a conversation as its prompt "
                                    "followed by the answer; use data.prompt_format = 'alpaca'")
        return ids[len(prompt):], labels[len(prompt):]

    def row(self, text: str, text_pair: str, label: int) -> tuple[list[int], list[int]]:
        """A training row: the fitted prompt and the label's answer; the loss on the answer only."""
        prompt = self.prompt_ids(text, text_pair)
        ids, labels = self.tails[label]
        return prompt + ids, [IGNORE_INDEX] * len(prompt) + labels

    # ------------------------------------------------------------------ answers

    def parse(self, answer: str) -> int | None:
        """The label a generated answer names: the name occurring first (whole word, any case), or None."""
        low = answer.lower()
        found = [(m.start(), -len(self.label_names[i]), i) for i, p in enumerate(self._patterns)
                 if (m := p.search(low)) is not None]
        return min(found)[2] if found else None
