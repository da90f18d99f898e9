"""Progress bars of a run (tqdm): rounds, and the clients of the current round."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    """tqdm bars for rounds and clients; silent when quiet or not on a terminal."""

    def __init__(self, quiet: bool, total_rounds: int, per_round: int, desc: str = "rounds") -> None:
        self.enabled = not quiet and sys.stderr.isatty()
        # tqdm bars (tqdm ships no type stubs): rounds is set when enabled, clients per round
        self.rounds: Any | None = None
        self.clients: Any | None = None
        self.per_round = per_round
        if self.enabled:
            from tqdm.auto import tqdm

            self._tqdm = tqdm
            self.rounds = tqdm(total=total_rounds, desc=desc, position=0)

    def client_done(self, client_id: str) -> None:
        """Advance the clients bar: ``client_id`` has returned its update."""
        if not self.enabled:
            return
        if self.clients is None:
            self.clients = self._tqdm(total=self.per_round, desc="clients", position=1, leave=False)
        self.clients.update(1)
        self.clients.set_postfix_str(client_id)

    def round_done(self, state, record: dict) -> None:
        """Advance the rounds bar and show the round's loss and eval metrics (a RoundCallback)."""
        if not self.enabled or self.rounds is None:  # (enabled always has a rounds bar)
            return
        if self.clients is not None:
            self.clients.close()
            self.clients = None
        self.rounds.update(1)
        shown = {k: v for k, v in record.items() if k in ("train_loss",) or k.startswith("eval_")}
        self.rounds.set_postfix({k: f"{v:.3f}" for k, v in shown.items() if isinstance(v, float)})

    def close(self) -> None:
        """Close the bars."""
        if self.enabled and self.rounds is not None:  # (enabled always has a rounds bar)
            self.rounds.close()
