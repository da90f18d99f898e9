"""Ragged rows of token ids held compactly: one flat int32 array and the rows' offsets.

A Python list of token ids costs about 36 bytes a token (an 8-byte pointer plus a 28-byte int
object for every id above 256); a tokenized training set of 40,000 rows at length 64 held that
way is about 100 MB more than the same rows as int32 (256 bytes a row). :class:`TokenRows` is a
read-only sequence of rows that stores them as one flat ``int32`` NumPy array plus ``int64``
offsets, so a population of tens of thousands of clients keeps its rows at their real size.

Indexing a row gives a fresh ``list[int]`` (what the collators and tests already take); a slice
or :meth:`TokenRows.take` gives another :class:`TokenRows` (a copy of just those rows), and a
``TokenRows`` equals any sequence of the same rows, so it drops in wherever a list of lists was.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np


class TokenRows(Sequence):
    """Rows of token ids in one flat int32 array (``flat``) with ``offsets[i]:offsets[i + 1]`` per row."""

    __slots__ = ("flat", "offsets")

    def __init__(self, flat: np.ndarray, offsets: np.ndarray) -> None:
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(flat):
            raise ValueError(f"offsets must run from 0 to {len(flat)}; got {len(offsets)} offsets")
        self.flat = flat
        self.offsets = offsets

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence[int]]) -> "TokenRows":
        """Pack ``rows`` (lists, arrays or another TokenRows) into one array."""
        if isinstance(rows, TokenRows):
            return rows
        builder = TokenRowsBuilder()
        builder.extend(rows)
        return builder.build()

    @classmethod
    def from_lengths(cls, flat: np.ndarray, lengths: Sequence[int] | np.ndarray) -> "TokenRows":
        """Rows cut from ``flat`` by their ``lengths`` (the layout of the encoding cache's files)."""
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(np.asarray(lengths, dtype=np.int64), out=offsets[1:])
        return cls(np.ascontiguousarray(flat, dtype=np.int32), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(range(*index.indices(len(self))))
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"row {index} of {n}")
        return self.flat[self.offsets[index]:self.offsets[index + 1]].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        flat, offsets = self.flat, self.offsets.tolist()
        for i in range(len(offsets) - 1):
            yield flat[offsets[i]:offsets[i + 1]].tolist()

    def __eq__(self, other) -> bool:
        if isinstance(other, TokenRows):
            return np.array_equal(self.offsets, other.offsets) and np.array_equal(self.flat, other.flat)
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)) or len(other) != len(self):
            return False
        return all(list(a) == list(b) for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside: not hashable, like a list

    def __repr__(self) -> str:
        return f"TokenRows({len(self)} rows, {len(self.flat)} tokens)"

    def lengths(self) -> np.ndarray:
        """Every row's length, as an int64 array."""
        return np.diff(self.offsets)

    def take(self, indices: Iterable[int]) -> "TokenRows":
        """The rows at ``indices``, in that order, as a new (compact) TokenRows."""
        idx = np.asarray(list(indices), dtype=np.int64)
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        idx = np.where(idx < 0, idx + len(self), idx)
        starts = self.offsets[idx]
        lengths = self.offsets[idx + 1] - starts
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if len(idx) == 0:
            return TokenRows(np.zeros(0, dtype=np.int32), offsets)
        # positions of every kept token in ``flat``: each row's start, then consecutive
        within = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lengths)
        return TokenRows(self.flat[np.repeat(starts, lengths) + within], offsets)

    @property
    def nbytes(self) -> int:
        """Bytes held by the ids and offsets."""
        return int(self.flat.nbytes + self.offsets.nbytes)


class TokenRowsBuilder:
    """Appends rows chunk by chunk (a tokenizer's output per chunk), then packs them once."""

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []
        self._lengths: list[np.ndarray] = []

    def extend(self, rows: Iterable[Sequence[int]]) -> None:
        """Append ``rows`` (each a sequence of ints)."""
        if isinstance(rows, TokenRows):
            self._chunks.append(rows.flat)
            self._lengths.append(rows.lengths())
            return
        rows = list(rows)
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        flat = np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(lengths.sum()))
        self._chunks.append(flat)
        self._lengths.append(lengths)

    def build(self) -> TokenRows:
        """All appended rows, packed."""
        flat = np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.int32)
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int64)
        return TokenRows.from_lengths(flat, lengths)


def row_lengths(rows: Sequence[Sequence[int]]) -> list[int]:
    """The length of every row (fast for :class:`TokenRows`, one ``len`` each otherwise)."""
    if isinstance(rows, TokenRows):
        return rows.lengths().tolist()
    return [len(r) for r in rows]


def length_order(rows: Sequence[Sequence[int]]) -> list[int]:
    """Row indices from shortest to longest (ties in order): batches of similar length pad little."""
    return sorted(range(len(rows)), key=row_lengths(rows).__getitem__)


def take_rows(rows: Sequence[Sequence[int]], indices: Sequence[int]):
    """The rows at ``indices``: a TokenRows stays compact, a list stays a list."""
    if isinstance(rows, TokenRows):
        return rows.take(indices)
    return [rows[i] for i in indices]
