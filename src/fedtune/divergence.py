"""Client divergence: how far the clients' models spread around their mean, streamed.

For client models w_i = w + d_i (d_i the client's delta) the divergence of a round is the
root-mean-square L2 distance of the clients from their unweighted mean,

    sqrt( (1/n) * sum_i ||w_i - mean_j w_j||^2 )  =  sqrt( (1/n) * sum_i ||d_i||^2 - ||mean_j d_j||^2 ),

which the right-hand form computes in one pass with one running sum: memory does not grow
with the number of clients. (The mean of the distances would need every delta at once; the RMS
is never smaller than it and equals it when all distances are equal.) Only torch is imported.
"""

from __future__ import annotations

import math

import torch

from fedtune.types import TensorDict


class Divergence:
    """Streaming RMS distance of client models from their mean."""

    def __init__(self) -> None:
        self._sum: TensorDict | None = None
        self._sq = 0.0
        self.count = 0

    def add(self, delta: TensorDict) -> None:
        """Fold in one client's delta."""
        if self._sum is None:
            self._sum = {k: v.detach().to(torch.float64).clone() for k, v in delta.items()}
        else:
            for k, v in delta.items():
                self._sum[k].add_(v.detach().to(torch.float64))
        self._sq += sum(float(v.detach().to(torch.float64).pow(2).sum()) for v in delta.values())
        self.count += 1

    def result(self) -> float | None:
        """The RMS distance, or None with fewer than two clients."""
        if self.count < 2 or self._sum is None:
            return None
        mean_sq = sum(float((v / self.count).pow(2).sum()) for v in self._sum.values())
        return math.sqrt(max(self._sq / self.count - mean_sq, 0.0))
