"""The server side: the one round loop (:mod:`fedtune.server.loop`) and the one server run
(:mod:`fedtune.server.run`: prepare, loop, finish), whatever transport reaches the clients."""

from fedtune.server.loop import RoundCallback, Transport, clients_per_round, run_rounds, sample_clients

__all__ = ["RoundCallback", "Transport", "clients_per_round", "run_rounds", "sample_clients"]
