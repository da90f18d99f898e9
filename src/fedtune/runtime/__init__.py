"""Transports under the round loop: the in-process simulation (and Flower, later)."""
