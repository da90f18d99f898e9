"""How an instruction becomes tokens: the model's own chat template, or the Alpaca template.

``data.prompt_format``:

- ``"chat"``: the tokenizer's chat template (``apply_chat_template``, e.g. SmolLM2's ChatML). The
  conversation (optional system message, earlier turns, the instruction as the last user turn) is
  rendered once; the loss is on every assistant turn's tokens (the reply and the template's
  end-of-turn marker) and nowhere else.
- ``"alpaca"``: ``### Instruction: ... ### Response:`` (:data:`fedtune.tasks.causal_lm.ALPACA_TEMPLATE`),
  BOS first, the response and EOS after it; the loss is on the response and EOS. For base models.
- ``"auto"`` (default): ``chat`` when the tokenizer has a chat template, else ``alpaca``.

Assistant tokens are found by character offsets: each assistant turn's span in the rendered text
is where the rendering of the conversation up to that turn (with the generation prompt) ends and
the rendering including the turn ends; the tokens whose characters fall in a span carry the loss.
A template that does not render a conversation as a prefix of its continuation is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from fedtune.batching import bounded_text
from fedtune.tasks.causal_lm import IGNORE_INDEX, EncodedLM, Instruction, _ids, encode_instructions

PromptFormatName = Literal["auto", "chat", "alpaca"]


class PromptFormatError(ValueError):
    """The prompt format cannot render these instructions with this tokenizer."""


class PromptFormat:
    """Renders :class:`Instruction` rows for one tokenizer: training ids + labels, and generation prompts."""

    def __init__(self, tokenizer, name: PromptFormatName = "auto") -> None:
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if name == "chat" and not has_template:
            raise PromptFormatError("data.prompt_format = 'chat' needs a tokenizer with a chat template; this model "
                                    "has none (a base model): use 'alpaca' or 'auto'")
        if name not in ("auto", "chat", "alpaca"):
            raise PromptFormatError(f"data.prompt_format must be auto, chat or alpaca, got {name!r}")
        self.tokenizer = tokenizer
        self.chat = name == "chat" or (name == "auto" and has_template)
        self.name = "chat" if self.chat else "alpaca"

    # ------------------------------------------------------------------ generation prompts

    def prompt_text(self, ex: Instruction) -> str:
        """The text a model continues to answer ``ex`` (the chat template with its generation prompt)."""
        if not self.chat:
            self._single_turn(ex)
            return ex.prompt()
        return self._render(ex.messages()[:-1], generation_prompt=True)

    def prompt_ids(self, ex: Instruction) -> list[int]:
        """Token ids of :meth:`prompt_text` (Alpaca: BOS first; chat: the template's own special tokens)."""
        if not self.chat:
            return _ids(self.tokenizer, self.prompt_text(ex), bos=True)
        return self._tokenize(self.prompt_text(ex))

    # ------------------------------------------------------------------ training rows

    def encode(self, examples: Sequence[Instruction], max_length: int) -> EncodedLM:
        """Ids truncated to ``max_length``, with labels on the answer tokens only (-100 elsewhere).

        Overlong texts are cut before rendering (:func:`fedtune.batching.bounded_text`), so memory
        follows ``max_length``, not the input.
        """
        if not self.chat:
            for ex in examples:
                self._single_turn(ex)
            return encode_instructions(self.tokenizer, examples, max_length)
        ids_all, labels_all = [], []
        for ex in examples:
            ids, labels = self._encode_chat(ex, max_length)
            ids_all.append(ids[:max_length])
            labels_all.append(labels[:max_length])
        return EncodedLM(ids_all, labels_all)

    def _encode_chat(self, ex: Instruction, max_length: int) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        messages = [{**m, "content": bounded_text(tok, m["content"], max_length)} for m in ex.messages()]
        text = self._render(messages, generation_prompt=False)
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render(messages[:k], generation_prompt=True)
            through = self._render(messages[: k + 1], generation_prompt=False)
            if not (through.startswith(before) and text.startswith(through)):
                raise PromptFormatError("the tokenizer's chat template does not render a conversation as a prefix "
                                        "of its continuation, so the assistant's tokens cannot be located; use "
                                        "data.prompt_format = 'alpaca'")
            spans.append((len(before), len(through)))
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [t if any(a <= s < b for a, b in spans) else IGNORE_INDEX
                  for t, (s, _) in zip(ids, enc["offset_mapping"], strict=True)]
        return ids, labels

    # ------------------------------------------------------------------ helpers

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @staticmethod
    def _single_turn(ex: Instruction) -> None:
        if ex.history or ex.system:
            raise PromptFormatError("a conversation with a system message or earlier turns needs a chat template "
                                    "(data.prompt_format = 'chat' with a model that has one); the Alpaca template "
                                    "renders one instruction and its response")
