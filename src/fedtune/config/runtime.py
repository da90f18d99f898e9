"""``[simulation]`` and ``[runtime]``: where clients train (in process, Flower simulation, real SuperNodes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fedtune.config.schema import _help
from fedtune.errors import ConfigError


@dataclass
class SimulationConfig:
    """How the in-process simulation runs the sampled clients."""

    parallel_clients: int = field(
        default=1,
        metadata=_help(
            "Train up to this many sampled clients together on one frozen base model (LoRA on sequence "
            "classification: each row goes through its own client's adapter and head, each client keeps its "
            "own optimizer, objective, data order and step count); 1 = one client after the other. "
            "Other modes fall back to one client at a time."
        ),
    )

    state_cache: int = field(
        default=16,
        metadata=_help(
            "Clients whose own state (SCAFFOLD's c_i, error-feedback residuals, personal heads) stays in memory; "
            "the others' is in the run folder's client_states/ (safetensors), read back when sampled. "
            "Results do not depend on it; memory does. At least parallel_clients."
        ),
    )

    workers: int = field(
        default=1,
        metadata=_help(
            "Worker processes training the sampled clients at once (forked from this one once the model and "
            "rows are loaded; CPU only; one thread each, so one worker per core). 1 = train in this process. "
            "On a multi-core CPU, one worker per core is faster than one process using every core. Results are "
            "the same but for float rounding of the threads' split of a sum."
        ),
    )

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"simulation.workers must be >= 1, got {self.workers}")
        if self.parallel_clients < 1:
            raise ConfigError(f"simulation.parallel_clients must be >= 1, got {self.parallel_clients}")
        if self.state_cache < self.parallel_clients:
            raise ConfigError(f"simulation.state_cache = {self.state_cache} must be >= simulation.parallel_clients = "
                              f"{self.parallel_clients} (the batched trainer holds that many clients' states at once)")


@dataclass
class RuntimeConfig:
    """Where clients train: in this process, under Flower's simulation engine, or on Flower SuperNodes."""

    mode: Literal["simulation", "flower-simulation", "flower"] = field(
        default="simulation",
        metadata=_help(
            "simulation: in-process, one resident model (fastest on one machine); flower-simulation: the same "
            "Flower ClientApp on Flower's Ray simulation engine; flower: real SuperNodes behind a SuperLink."
        ),
    )
    superlink: str = field(
        default="127.0.0.1:8000",
        metadata=_help("flower: the SuperLink's address (host:port of `flower-superlink --port`) that `fedtune run` submits to."),
    )
    insecure: bool = field(default=False, metadata=_help("flower: talk to the SuperLink without TLS (local tests only)."))
    root_certificates: str = field(
        default="", metadata=_help("flower: CA certificate (PEM) that signed the SuperLink's TLS certificate.")
    )
    min_clients: int = field(
        default=0, metadata=_help("flower: SuperNodes to wait for before round 1 (0 = partition.num_clients).")
    )
    connect_timeout: float = field(
        default=120.0, metadata=_help("flower: seconds to wait for min_clients SuperNodes to connect and identify.")
    )
    round_timeout: float = field(
        default=600.0, metadata=_help("flower: seconds to wait for the sampled clients' replies in one round.")
    )
    cpus_per_client: float = field(
        default=1.0, metadata=_help("flower-simulation: CPUs Ray reserves per ClientApp (fewer = more in parallel).")
    )
    secagg: bool = field(
        default=False,
        metadata=_help("flower, flower-simulation: SecAgg+ secure aggregation (Flower's protocol); the server sees "
                       "only the example-weighted mean of the updates. fedavg / fedprox only."),
    )
    secagg_num_shares: float = field(
        default=3.0,
        metadata=_help("SecAgg+: shares of each client's secrets; an integer > 2 is a count, a number in (0, 1] "
                       "a fraction of the round's clients."),
    )
    secagg_reconstruction_threshold: float = field(
        default=2.0,
        metadata=_help("SecAgg+: shares needed to unmask (integer < num_shares, or a fraction in (0, 1] of "
                       "num_shares); higher = more private, less tolerant of dropouts."),
    )
    secagg_clipping_range: float = field(
        default=8.0, metadata=_help("SecAgg+: each delta entry (times num_examples / max_weight) is clipped to "
                                    "[-clipping_range, clipping_range] before quantization.")
    )
    secagg_quantization_range: int = field(
        default=4194304, metadata=_help("SecAgg+: quantization levels (2**22 by default; < 2**32).")
    )
    secagg_max_weight: float = field(
        default=1000.0, metadata=_help("SecAgg+: the largest num_examples of any client (weights are scaled by it).")
    )

    def __post_init__(self) -> None:
        host, sep, port = self.superlink.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"runtime.superlink = {self.superlink!r} must be host:port (the SuperLink's --port), "
                              "e.g. '127.0.0.1:9092'")
        if self.min_clients < 0:
            raise ConfigError(f"runtime.min_clients must be >= 0, got {self.min_clients}")
        if self.connect_timeout <= 0 or self.round_timeout <= 0:
            raise ConfigError("runtime.connect_timeout and runtime.round_timeout must be > 0")
        if self.cpus_per_client <= 0:
            raise ConfigError(f"runtime.cpus_per_client must be > 0, got {self.cpus_per_client}")
        if self.secagg:
            self._check_secagg()
        if self.insecure and self.root_certificates:
            raise ConfigError("runtime.insecure = true turns TLS off, but runtime.root_certificates is set; "
                              "drop one of them")

    def _check_secagg(self) -> None:
        if self.mode == "simulation":
            raise ConfigError("runtime.secagg = true needs runtime.mode = 'flower' or 'flower-simulation' "
                              "(in-process simulation has no network to hide updates from)")
        shares, threshold = self.secagg_num_shares, self.secagg_reconstruction_threshold
        for key, value in (("secagg_num_shares", shares), ("secagg_reconstruction_threshold", threshold)):
            if not (0 < value <= 1 or (value > 1 and float(value).is_integer())):
                raise ConfigError(f"runtime.{key} must be an integer count or a fraction in (0, 1], got {value}")
        if shares > 1 and shares <= 2:
            raise ConfigError(f"runtime.secagg_num_shares as a count must be > 2, got {shares:g}")
        if shares > 1 and threshold > 1 and threshold >= shares:
            raise ConfigError(f"runtime.secagg_reconstruction_threshold ({threshold:g}) must be < "
                              f"runtime.secagg_num_shares ({shares:g})")
        if self.secagg_clipping_range <= 0 or self.secagg_max_weight <= 0:
            raise ConfigError("runtime.secagg_clipping_range and runtime.secagg_max_weight must be > 0")
        if not 0 < self.secagg_quantization_range < 2**32:
            raise ConfigError(f"runtime.secagg_quantization_range must be in (0, 2**32), "
                              f"got {self.secagg_quantization_range}")
