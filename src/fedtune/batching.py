"""Tokenize once, then cut padded batches: the data side of training and evaluation."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from fedtune.token_rows import TokenRowsBuilder, row_lengths, take_rows

IGNORE_INDEX = -100
"""Per-token label that the loss skips (prompt tokens, padding)."""


@dataclass(frozen=True)
class EncodedDataset:
    """Token ids of every example (unpadded) and their targets, whatever the task.

    ``labels`` holds one row per example: a class id or float (classification, regression), a
    0/1 vector (multi-label) or several columns that ``label_keys`` names one by one (extractive
    QA: ``("start_positions", "end_positions")``). Causal language modelling has per-token
    targets instead, in ``token_labels`` (unpadded, ``IGNORE_INDEX`` where no loss is taken).
    """

    input_ids: Sequence[list[int]]
    """One row of ids per example: a :class:`~fedtune.token_rows.TokenRows` (compact) or a list of lists."""
    token_type_ids: Sequence[list[int]] | None
    labels: torch.Tensor
    label_keys: tuple[str, ...] = ("labels",)
    """Model keyword(s) the label columns are passed as (one key: the whole row)."""
    token_labels: Sequence[list[int]] | None = None
    example_ids: torch.Tensor | None = None
    """Which source example each row was cut from, when several rows share one (extractive QA's windows)."""

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, indices: Sequence[int]) -> "EncodedDataset":
        """The examples at ``indices``, in that order."""
        idx = list(indices)
        return EncodedDataset(
            input_ids=take_rows(self.input_ids, idx),
            token_type_ids=None if self.token_type_ids is None else take_rows(self.token_type_ids, idx),
            labels=self.labels[torch.as_tensor(idx, dtype=torch.long)] if idx else self.labels[:0],
            label_keys=self.label_keys,
            token_labels=None if self.token_labels is None else take_rows(self.token_labels, idx),
            example_ids=None if self.example_ids is None else self.example_ids[torch.as_tensor(idx, dtype=torch.long)],
        )

    @property
    def is_single_label(self) -> bool:
        """One class id (or regression float) per example: what the batched multi-client trainer handles."""
        return self.token_labels is None and self.label_keys == ("labels",) and self.labels.dim() == 1


CHARS_PER_TOKEN = 100
"""A token of the supported tokenizers spans at most this many characters of a word (WordPiece's
``max_input_chars_per_word``); used to cut overlong texts before tokenizing them."""


def bounded_text(tokenizer, text: str, max_length: int) -> str:
    """``text``, or a prefix of it that tokenizes to the same first ``max_length`` tokens.

    Tokenizing a 50 MB cell to keep 64 of its tokens costs gigabytes; a text longer than
    ``max_length * CHARS_PER_TOKEN`` characters is cut at the last whitespace before that bound
    (a word boundary, so its tokens are a prefix of the whole text's), and kept only if the cut
    still holds more than ``max_length`` tokens (otherwise the whole text is used: exactness first).
    """
    bound = max_length * CHARS_PER_TOKEN
    if len(text) <= bound:
        return text
    cut = text.rfind(" ", 0, bound)
    head = text[: cut if cut > 0 else bound]
    if len(tokenizer(head, add_special_tokens=False)["input_ids"]) > max_length:
        return head
    return text


ENCODE_CHUNK = 1024
"""Texts tokenized per call of the tokenizer: its Python lists of ids exist for one chunk at a time,
then the rows are packed into :class:`~fedtune.token_rows.TokenRows`."""


def encode_texts(
    tokenizer, texts: Sequence[str], text_pairs: Sequence[str] | None, labels, max_length: int, regression: bool
) -> EncodedDataset:
    """Tokenize (truncating to ``max_length``) without padding; padding happens per batch.

    Texts (and the second texts of pairs) longer than the bound of :func:`bounded_text` are cut
    first, so memory follows ``max_length``, not the input (a tokenizer keeps the overflow of both
    halves of a pair: two long halves cost it far more than one). The ids are those of the whole
    texts: a cut keeps more than ``max_length`` tokens, and pair truncation (``longest_first``)
    keeps the same prefixes of two texts when one of them is longer than ``max_length``, whatever
    its length beyond that. One exception: when *both* halves of a pair are beyond the bound, an odd
    budget's last token goes to whichever cut is longer, which may be the other half than with the
    whole texts (which half is longer is not known without tokenizing both whole).

    The rows are tokenized :data:`ENCODE_CHUNK` texts at a time and kept as compact
    :class:`~fedtune.token_rows.TokenRows` (int32), not as Python lists.
    """
    ids, types = TokenRowsBuilder(), TokenRowsBuilder()
    has_types = False
    for start in range(0, len(texts), ENCODE_CHUNK):  # the tokenizer's lists live one chunk at a time
        chunk = [bounded_text(tokenizer, t, max_length) for t in texts[start:start + ENCODE_CHUNK]]
        pairs = None
        if text_pairs is not None:
            pairs = [bounded_text(tokenizer, t, max_length) for t in text_pairs[start:start + ENCODE_CHUNK]]
        enc = tokenizer(chunk, pairs, truncation=True, max_length=max_length, padding=False)
        ids.extend(enc["input_ids"])
        if "token_type_ids" in enc:
            has_types = True
            types.extend(enc["token_type_ids"])
    dtype = torch.float32 if regression else torch.long
    return EncodedDataset(
        input_ids=ids.build(),
        token_type_ids=types.build() if has_types else None,
        labels=torch.as_tensor(list(labels), dtype=dtype),
    )


def collate(ds: EncodedDataset, indices: Sequence[int], pad_id: int, pad_to: int = 0,
            pad_multiple: int = 1, pad_limit: int = 0) -> dict[str, torch.Tensor]:
    """A batch padded to ``pad_to`` when set, else to its longest example rounded up to a multiple of
    ``pad_multiple`` but not beyond ``pad_limit`` (the rows' token limit; 0 = none) or the longest row."""
    rows = [ds.input_ids[i] for i in indices]
    longest = max(len(r) for r in rows)
    if pad_to:
        width = max(pad_to, longest)
    elif pad_multiple > 1:
        width = -(-longest // pad_multiple) * pad_multiple
        if pad_limit:
            width = max(longest, min(width, pad_limit))
    else:
        width = longest
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[j, : len(r)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if ds.token_type_ids is not None:
        tt = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(indices):
            t = ds.token_type_ids[i]
            tt[j, : len(t)] = torch.as_tensor(t, dtype=torch.long)
        batch["token_type_ids"] = tt
    if ds.token_labels is not None:
        targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for j, i in enumerate(indices):
            t = ds.token_labels[i]
            targets[j, : len(t)] = torch.as_tensor(t, dtype=torch.long)
        batch["labels"] = targets
        return batch
    picked = ds.labels[torch.as_tensor(list(indices), dtype=torch.long)]
    if len(ds.label_keys) == 1:
        batch[ds.label_keys[0]] = picked
    else:
        for j, key in enumerate(ds.label_keys):
            batch[key] = picked[:, j]
    return batch


BUCKET_BATCHES = 16
"""Length bucketing: one bucket holds this many batches' worth of examples."""


def epoch_batches(
    ds: EncodedDataset, batch_size: int, generator: torch.Generator | None = None, bucketing: bool = False
) -> list[list[int]]:
    """The batches (lists of example indices) of one pass over ``ds``; every example exactly once.

    Plain: a permutation drawn from ``generator`` (in order when None), cut into batches.
    ``bucketing``: that permutation is cut into buckets of ``BUCKET_BATCHES * batch_size``
    examples, each bucket is sorted by length (ties keep the random order) and cut into batches,
    and the order of all the batches is shuffled with ``generator``: similar lengths share a
    batch, so dynamic padding wastes little, while batch order and bucket contents stay random.
    Buckets are whole multiples of ``batch_size``, so the number of batches is unchanged.
    """
    n = len(ds)
    order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
    if not bucketing:
        return [order[start : start + batch_size] for start in range(0, n, batch_size)]
    size = BUCKET_BATCHES * batch_size
    lengths = row_lengths(ds.input_ids)
    batches: list[list[int]] = []
    for b in range(0, n, size):
        bucket = sorted(order[b : b + size], key=lengths.__getitem__)  # stable
        batches.extend(bucket[start : start + batch_size] for start in range(0, len(bucket), batch_size))
    if generator is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def iterate_batches(
    ds: EncodedDataset,
    batch_size: int,
    pad_id: int,
    generator: torch.Generator | None = None,
    pad_to: int = 0,
    bucketing: bool = False,
    pad_multiple: int = 1,
    pad_limit: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over ``ds``: shuffled with ``generator`` when given, in order otherwise.

    Batches are padded to their longest example (rounded up to a multiple of ``pad_multiple``, at most
    ``pad_limit``), or to ``pad_to`` when set; ``bucketing`` groups
    examples of similar length (see :func:`epoch_batches`).
    """
    for indices in epoch_batches(ds, batch_size, generator, bucketing):
        yield collate(ds, indices, pad_id, pad_to, pad_multiple, pad_limit)
