"""SecAgg+ secure aggregation on fedtune's Flower runtime, with Flower's own protocol code on both ends.

With ``runtime.secagg = true`` a round's updates reach the server only as their example-weighted
mean: every client's delta is quantized, masked with pairwise and private masks and summed on
the server, which learns nothing but the sum (Bell et al. 2020, SecAgg+). Both ends are Flower's:

- server: :class:`flwr.server.workflow.SecAggPlusWorkflow` runs the protocol's four stages
  (setup, share keys, collect masked vectors, unmask) over the ServerApp's ``Grid``. It is a
  legacy-API workflow (it needs a ``LegacyContext`` holding a legacy ``Strategy``); fedtune drives
  it once per round through a small adapter (:class:`_RoundAdapter`) that only names the round's
  nodes and catches the unmasked mean, and hands each node fedtune's own train request as the
  stage-2 content (:class:`_FedtuneSecAggPlus`).
- client: :func:`flwr.client.mod.secaggplus_mod` wraps the ClientApp's train handler
  (:func:`client_mod`); the handler answers a SecAgg+ round with its delta in Flower's ``FitRes``
  layout (:func:`encode_reply`), which the mod masks and strips of every plain array before
  anything leaves the node.

Only the weighted mean is secret-shared: fedavg and fedprox (``strategy.name``) without
``[privacy]``, LoRA-aware rules or ``federation.codec_up`` (:func:`check_experiment`). Client
metrics (train loss) and example counts travel in clear, as in Flower's protocol. The server
gets one update per round (``clients_aggregated`` = 1, no ``divergence``); its client id lists
the clients in the sum.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Parameters, Scalar, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common.recorddict_compat import fitres_to_recorddict
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from fedtune.config import RuntimeConfig
from fedtune.types import ClientUpdate, TensorDict

log = logging.getLogger(__name__)


class SecAggError(RuntimeError):
    """A SecAgg+ round could not produce the aggregate (too few clients stayed to unmask it)."""


def _shares(value: float) -> int | float:
    """Flower's convention: an int > 2 is a count, a float in (0, 1] a fraction of the round's clients."""
    return int(value) if value > 1 else float(value)


def workflow_for(runtime: RuntimeConfig, requests: dict[int, RecordDict]) -> "_FedtuneSecAggPlus":
    """The round's SecAgg+ workflow from ``[runtime] secagg_*``; ``requests`` maps node id -> train request."""
    return _FedtuneSecAggPlus(
        requests, _shares(runtime.secagg_num_shares), _shares(runtime.secagg_reconstruction_threshold),
        max_weight=runtime.secagg_max_weight, clipping_range=runtime.secagg_clipping_range,
        quantization_range=runtime.secagg_quantization_range, timeout=runtime.round_timeout,
    )


class _FedtuneSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, sending fedtune's train request (not a legacy FitIns) at stage 2."""

    def __init__(self, requests: dict[int, RecordDict], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests = requests

    def setup_stage(self, grid, context, state) -> bool:  # noqa: ANN001 (Flower's signature)
        """Flower's setup stage; then the stage-2 content of each node becomes its fedtune train request."""
        ok = super().setup_stage(grid, context, state)
        state.nid_to_fitins = {nid: self.requests[nid] for nid in state.nid_to_fitins}
        return ok


class _Proxy(ClientProxy):
    """A node id, as the legacy workflow wants it (it never calls the proxy)."""

    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def _unused(self, *_: Any, **__: Any) -> Any:
        raise NotImplementedError("SecAgg+ proxies only carry a node id")

    get_properties = get_parameters = fit = evaluate = reconnect = _unused


class _RoundAdapter(LegacyStrategy):
    """The legacy Strategy the workflow calls: samples exactly the round's nodes, keeps the unmasked mean."""

    def __init__(self, node_ids: Sequence[int]) -> None:
        self.node_ids = list(node_ids)
        self.mean: list[np.ndarray] | None = None
        self.results: list[tuple[int, FitRes]] = []
        self.failures: list[Any] = []

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: ANN001, D102
        return [(_Proxy(n), FitIns(Parameters([], ""), {})) for n in self.node_ids]

    def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001, D102
        self.results = [(proxy.node_id, res) for proxy, res in results]
        self.failures = list(failures)
        if results:  # the workflow puts the unmasked weighted mean into every result
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def initialize_parameters(self, client_manager):  # noqa: ANN001, D102
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: ANN001, D102
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: ANN001, D102
        return None, {}

    def evaluate(self, server_round, parameters):  # noqa: ANN001, D102
        return None


def aggregate_round(grid: Any, runtime: RuntimeConfig, rnd: int, names: Sequence[str],
                    requests: dict[int, RecordDict], client_of: dict[int, str]) -> tuple[ClientUpdate, list[str]]:
    """Run SecAgg+ for one round over ``grid``; return the weighted mean as one ClientUpdate, and its clients.

    ``names`` are the tensor names in the order clients send them; ``client_of`` maps node id to
    client id. The update's delta is sum(n_i d_i) / sum(n_i) over the clients that completed the
    protocol, its ``num_examples`` sum(n_i), its metrics the example-weighted client metrics.
    """
    adapter = _RoundAdapter(list(requests))
    state = RecordDict()
    state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
    state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    nodes = SimpleClientManager()  # the round's nodes (the workflow logs "sampled K clients (out of N)")
    for node_id in requests:
        nodes.register(_Proxy(node_id))
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
                            strategy=adapter, client_manager=nodes)
    workflow_for(runtime, requests)(grid, context)
    if adapter.mean is None:
        failed = ", ".join(_failure(f, client_of) for f in adapter.failures) or "no client replied"
        raise SecAggError(
            f"round {rnd}: SecAgg+ halted before unmasking: fewer clients completed it than "
            f"runtime.secagg_reconstruction_threshold = {runtime.secagg_reconstruction_threshold:g} needs, "
            f"or a client failed ({failed})"
        )
    if len(adapter.mean) != len(names):
        raise SecAggError(f"round {rnd}: the SecAgg+ aggregate has {len(adapter.mean)} tensors, expected {len(names)}")
    total = sum(res.num_examples for _, res in adapter.results)
    metrics: dict[str, float] = {}
    for _, res in adapter.results:
        for k, v in res.metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                metrics[k] = metrics.get(k, 0.0) + res.num_examples * float(v) / total
    clients = sorted(client_of.get(n, str(n)) for n, _ in adapter.results)
    log.info("round %d: SecAgg+ aggregated %d clients (%s), %d examples", rnd, len(clients), ", ".join(clients), total)
    delta = {k: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for k, a in zip(names, adapter.mean, strict=True)}
    return ClientUpdate(f"secagg+[{','.join(clients)}]", delta, total, metrics), clients


def _failure(failure: Any, client_of: dict[int, str]) -> str:
    """A legacy workflow failure (a ``(proxy, FitRes)`` pair or an exception) as "client: reason"."""
    if isinstance(failure, tuple) and len(failure) == 2:
        proxy, res = failure
        name = client_of.get(getattr(proxy, "node_id", -1), str(getattr(proxy, "cid", "?")))
        return f"{name}: {getattr(getattr(res, 'status', None), 'message', '') or res}"
    return f"{type(failure).__name__}: {failure}"


# ----------------------------------------------------------------------------- client side


def seed_rounding(seed: int) -> None:
    """Seed the stochastic rounding of this client's SecAgg+ vector, so that SecAgg+ runs reproduce exactly.

    Flower's ``quantize`` draws its rounding noise from NumPy's global generator; ``secaggplus_mod``
    quantizes the reply right after the train handler returns, in the same process, so seeding it
    here (from the experiment's seed, the round and the client id) fixes every rounding. The masks
    stay cryptographically random: they cancel exactly in the sum, so they never change the result.
    """
    np.random.seed(seed % 2**32)


def is_secagg(content: RecordDict) -> bool:
    """Whether a train message belongs to a SecAgg+ round (it carries the protocol's config record)."""
    return RECORD_KEY_CONFIGS in content.config_records


def client_mod(msg: Message, context: Context, call_next) -> Message:  # noqa: ANN001 (Flower's Mod signature)
    """Flower's ``secaggplus_mod`` for SecAgg+ rounds; any other message goes straight to the handler."""
    if not is_secagg(msg.content):
        return call_next(msg, context)
    return secaggplus_mod(msg, context, call_next)


def encode_reply(update: ClientUpdate, names: Iterable[str]) -> RecordDict:
    """The client's answer in a SecAgg+ round: its delta (float32, in ``names`` order) as a Flower FitRes.

    ``secaggplus_mod`` masks these arrays and deletes them from the reply; only the masked vector leaves.
    """
    arrays = []
    for k in names:
        t = update.delta[k].detach().to(torch.float32).cpu()
        arrays.append(t.numpy())
    metrics: dict[str, Scalar] = {k: float(v) for k, v in update.metrics.items()}
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), update.num_examples, metrics)
    return fitres_to_recorddict(fitres, keep_input=False)


def delta_names(params: TensorDict) -> list[str]:
    """The order both ends use for the tensors of a SecAgg+ vector (sorted names: codecs may reorder dicts)."""
    return sorted(params)
