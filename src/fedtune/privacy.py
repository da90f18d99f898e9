"""Central differential privacy (DP-FedAvg, McMahan et al. 2018): clipping, Gaussian noise, accountant.

The server clips every client delta to L2 norm ``clip``, sums the clipped deltas, adds Gaussian
noise N(0, (noise_multiplier * clip)^2) to every coordinate of the sum, and divides by a fixed
denominator (the expected number of clients per round), so one client changes the released mean by
at most ``clip / denominator`` whatever the others send.

Privacy is accounted with ``dp_accounting``'s RDP accountant: each round is a
``PoissonSampledDpEvent(q, GaussianDpEvent(noise_multiplier))`` with q = clients_per_round /
num_clients, composed over rounds. Caveat: fedtune samples a fixed number of clients without
replacement, not Poisson; the Poisson figure is the customary approximation (exact when q = 1).
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fedtune import tensors
from fedtune.types import TensorDict


def check_dp_params(*, clip: float, noise_multiplier: float, delta: float) -> None:
    """Raise ValueError naming the field when a DP setting is invalid."""
    if not (isinstance(clip, (int, float)) and clip > 0 and math.isfinite(clip)):
        raise ValueError(f"privacy clip must be > 0, got {clip}")
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"privacy noise_multiplier must be >= 0, got {noise_multiplier}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"privacy delta must be in (0, 1), got {delta}")


@dataclass
class ClippedSum:
    """Streaming sum of L2-clipped TensorDicts (memory: one TensorDict)."""

    clip: float
    total: TensorDict | None = None
    count: int = 0
    clipped: int = 0
    """How many of the added items were longer than ``clip`` and scaled down."""

    def add(self, x: TensorDict) -> None:
        """Clip ``x`` to norm ``clip`` and add it to the sum."""
        n = tensors.norm(x)
        if n > self.clip:
            self.clipped += 1
        c = tensors.clip_by_norm(x, self.clip)
        if self.total is None:
            self.total = {k: v.detach().to(torch.float32).clone() for k, v in c.items()}
        else:
            tensors.add_scaled_(self.total, c, 1.0)
        self.count += 1


def gaussian_noise_like(a: TensorDict, std: float, generator: torch.Generator) -> TensorDict:
    """Independent N(0, std^2) per coordinate, shaped like ``a`` (float32), drawn from ``generator``."""
    return {k: torch.randn(v.shape, generator=generator, dtype=torch.float32) * std for k, v in a.items()}


def private_mean(total: TensorDict, *, clip: float, noise_multiplier: float, denominator: float,
                 generator: torch.Generator) -> TensorDict:
    """(sum of clipped deltas + N(0, (noise_multiplier * clip)^2)) / denominator."""
    if not denominator > 0:
        raise ValueError(f"denominator must be > 0, got {denominator}")
    noise = gaussian_noise_like(total, noise_multiplier * clip, generator)
    return {k: (total[k] + noise[k].to(total[k].device)) / denominator for k in total}


@contextmanager
def _quiet_absl():
    # dp_accounting logs a warning for every fractional RDP order whose series fails to converge
    # (it then drops that order, which is safe); keep those out of the run's log.
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def dp_epsilon(*, noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """Epsilon at ``delta`` after ``rounds`` Poisson-sampled Gaussian rounds (dp_accounting RDP accountant).

    Infinite when ``noise_multiplier`` is 0; 0 before any round.
    """
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    if not 0.0 < sampling_rate <= 1.0:
        raise ValueError(f"sampling rate must be in (0, 1], got {sampling_rate}")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    accountant = RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    with _quiet_absl():  # (compose computes the RDP series too: its warnings are the bulk)
        accountant.compose(event, rounds)
        return float(accountant.get_epsilon(delta))
