"""The in-process clients' own state, kept on disk with a bounded cache in memory.

A simulation holds every client's state across rounds (SCAFFOLD's control variate ``c_i``, an
uplink codec's error-feedback residual, FedPer's personal head, FedDyn's gradient state). At
10,000 clients of one adapter each that is gigabytes if it stays on the heap. A
:class:`ClientStateStore` is the transport's ``client_states`` mapping: the last ``cache_size``
clients used are in memory, the others in one safetensors file each under the run folder's
``client_states/``, read back when the client is next sampled.

Files are never overwritten. A state leaving the cache is written as a new *generation*
(``<client>.g<N>.safetensors``); :meth:`ClientStateStore.commit` writes every state still in
memory the same way and returns the index ``{client: generation}`` that a checkpoint records.
Files that no committed index names are deleted by :meth:`ClientStateStore.collect`, called
after the checkpoint that supersedes them is on disk, so a run killed at any moment resumes from
its last checkpoint with exactly the client states of that round (:meth:`ClientStateStore.restore`).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path

from fedtune.errors import CheckpointError
from fedtune.types import ClientState

STORE_DIR = "client_states"
"""Folder of the run's output directory holding the clients' state files."""
_FILE_RE = re.compile(r"^(?P<slug>.+)\.g(?P<gen>\d+)\.safetensors$")


def _slug(client_id: str) -> str:
    """A file-name-safe, collision-free form of ``client_id`` (hex-escaped where not [A-Za-z0-9_-])."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "_-") else f"~{ord(c):x}~" for c in client_id)


class ClientStateStore(MutableMapping[str, ClientState]):
    """``client id -> ClientState``, at most ``cache_size`` states in memory, the rest in ``folder``.

    A state with no tensors is not written: it reads as absent, which is what a client without state is.
    A state handed out by ``[]``/``get``/``setdefault`` may be changed in place by its caller (the
    trainers do), so every state taken from the cache counts as changed and is written when it
    leaves it. The caller must be done with a state before ``cache_size`` other clients are used
    (the batched trainer holds ``simulation.parallel_clients`` at once: the cache is at least that).
    """

    def __init__(self, folder: str | Path, cache_size: int = 16) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.folder = Path(folder)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, ClientState] = OrderedDict()
        self._dirty: set[str] = set()
        self._on_disk: dict[str, int] = {}
        """The latest generation written of each client that has a file."""
        self._committed: dict[str, int] = {}
        self._next_gen = 1
        self.reads = 0
        """States read back from disk (for the tests and the scale benchmark)."""
        self.writes = 0

    # -- the mapping ------------------------------------------------------------------------------
    def __getitem__(self, client_id: str) -> ClientState:
        if client_id in self._cache:
            self._cache.move_to_end(client_id)
        elif client_id in self._on_disk:
            self._cache[client_id] = self._read(client_id, self._on_disk[client_id])
            self._evict()
        else:
            raise KeyError(client_id)
        self._dirty.add(client_id)
        return self._cache[client_id]

    def __setitem__(self, client_id: str, state: ClientState) -> None:
        self._cache[client_id] = state
        self._cache.move_to_end(client_id)
        self._dirty.add(client_id)
        self._evict()

    def __delitem__(self, client_id: str) -> None:
        if client_id not in self._cache and client_id not in self._on_disk:
            raise KeyError(client_id)
        self._cache.pop(client_id, None)
        self._on_disk.pop(client_id, None)
        self._dirty.discard(client_id)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(set(self._cache) | set(self._on_disk)))

    def __len__(self) -> int:
        return len(set(self._cache) | set(self._on_disk))

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._cache or client_id in self._on_disk

    @property
    def in_memory(self) -> int:
        """How many states are in the cache now."""
        return len(self._cache)

    # -- disk -------------------------------------------------------------------------------------
    def _path(self, client_id: str, gen: int) -> Path:
        return self.folder / f"{_slug(client_id)}.g{gen}.safetensors"

    def _read(self, client_id: str, gen: int) -> ClientState:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self._path(client_id, gen)
        try:
            flat = load_file(path)
        except (OSError, ValueError, SafetensorError) as exc:  # a missing or damaged file: the state is gone, say which
            raise CheckpointError(f"client {client_id!r}: its state file {path} cannot be read ({exc}); the run's "
                                  f"{STORE_DIR}/ folder was changed outside fedtune") from None
        state: ClientState = {}
        for key, tensor in flat.items():
            purpose, name = json.loads(key)
            state.setdefault(purpose, {})[name] = tensor
        self.reads += 1
        return state

    def _write(self, client_id: str, state: ClientState) -> None:
        from safetensors.torch import save_file

        if not any(state.values()):  # nothing to keep (FedAvg's clients): no file; the client reads as absent
            self._drop_uncommitted(client_id, self._on_disk.pop(client_id, None))
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        gen = self._next_gen
        self._next_gen += 1
        flat = {json.dumps([p, n]): t.detach().cpu().contiguous() for p, td in state.items() for n, t in td.items()}
        path = self._path(client_id, gen)
        tmp = path.with_name(path.name + ".tmp")
        save_file(flat, str(tmp))
        tmp.replace(path)
        previous = self._on_disk.get(client_id)
        self._on_disk[client_id] = gen
        self._drop_uncommitted(client_id, previous)
        self.writes += 1

    def _drop_uncommitted(self, client_id: str, gen: int | None) -> None:
        """Delete generation ``gen`` of ``client_id`` if no checkpoint names it (written since the last commit)."""
        if gen is not None and gen != self._committed.get(client_id):
            self._path(client_id, gen).unlink(missing_ok=True)

    def _evict(self) -> None:
        while len(self._cache) > self.cache_size:
            client_id, state = self._cache.popitem(last=False)
            if client_id in self._dirty:
                self._write(client_id, state)
                self._dirty.discard(client_id)

    # -- checkpoints ------------------------------------------------------------------------------
    def commit(self) -> dict[str, int]:
        """Write every changed state still in memory; the index ``{client: generation}`` of all states now."""
        for client_id in list(self._dirty):
            self._write(client_id, self._cache[client_id])
        self._dirty.clear()
        return dict(self._on_disk)

    def collect(self, index: Mapping[str, int]) -> None:
        """``index`` is now the checkpoint's: delete every state file it does not name."""
        self._committed = dict(index)
        if not self.folder.is_dir():
            return
        keep = {self._path(c, g).name for c, g in index.items()} | {self._path(c, g).name for c, g in
                                                                     self._on_disk.items()}
        for path in self.folder.iterdir():
            if path.name not in keep and (_FILE_RE.match(path.name) or path.name.endswith(".tmp")):
                path.unlink(missing_ok=True)

    def restore(self, index: Mapping[str, int], states: Mapping[str, ClientState] | None = None) -> None:
        """Make the store hold exactly a checkpoint's states: ``index`` (files of this folder) plus ``states``.

        ``states`` are inline client states of an older checkpoint format. A file ``index`` names that
        is missing is a CheckpointError naming the client, raised here rather than rounds later.
        """
        for client_id, gen in index.items():
            if not self._path(client_id, gen).is_file():
                raise CheckpointError(f"client {client_id!r}: the checkpoint names its state file "
                                      f"{self._path(client_id, gen)}, which is missing")
        self._cache.clear()
        self._dirty.clear()
        self._on_disk = dict(index)
        self._committed = dict(index)
        self._next_gen = max(index.values(), default=0) + 1
        for client_id, state in dict(states or {}).items():
            self[client_id] = state
        self.collect(index)  # (files of the killed run's unfinished round)
