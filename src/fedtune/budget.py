"""A run's communication budget: cumulative bytes both ways, a warning or a clean stop when passed.

``federation.comm_budget_bytes`` bounds ``bytes_down + bytes_up`` summed over the run's rounds (the
exact encoded payload sizes every record reports; a resumed run counts its earlier rounds too).
With ``budget_action = "warn"`` the round that passes it logs one warning and the run goes on; with
``"stop"`` the run ends after that round: the round is evaluated and recorded (``"stopped"`` in its
metrics.jsonl line and in summary.json), and the model is saved as for a finished run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)


class CommBudget:
    """Counts a run's bytes round by round; says when and why the run should stop (``__call__``)."""

    def __init__(self, limit: int, action: str = "warn", earlier: Iterable[dict] = ()) -> None:
        self.limit = int(limit)
        self.action = action
        self.spent = sum(int(r.get("bytes_down", 0)) + int(r.get("bytes_up", 0)) for r in earlier)
        self.warned = self.limit > 0 and self.spent > self.limit

    def __call__(self, record: dict) -> str | None:
        """Add a finished round's bytes; the reason to stop after it, or None to go on."""
        self.spent += int(record.get("bytes_down", 0)) + int(record.get("bytes_up", 0))
        if self.limit <= 0 or self.spent <= self.limit:
            return None
        reason = (f"communication budget federation.comm_budget_bytes = {self.limit:,} passed in round "
                  f"{record['round']} ({self.spent:,} bytes moved both ways)")
        if self.action == "stop":
            return reason
        if not self.warned:
            log.warning("%s; the run goes on (federation.budget_action = 'warn')", reason)
            self.warned = True
        return None
