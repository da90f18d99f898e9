"""fedtune on Flower: a ServerApp running fedtune's round loop and a ClientApp running local_train.

- :mod:`.messages`: the one typed (de)serializer between RoundPlan/ClientUpdate and Flower records.
- :mod:`.node`: what a SuperNode's node config means (its client id and its own data).
- :mod:`.client_app`: the ClientApp (local training on the node's data, state in ``context.state``).
- :mod:`.transport`: :class:`FlowerTransport`, the round loop's Transport over a Flower ``Grid``.
- :mod:`.server_app`: the ServerApp (``fedtune.experiment.run_experiment`` with a FlowerTransport).
- :mod:`.secagg`: SecAgg+ secure aggregation (Flower's workflow and client mod) for ``runtime.secagg``.
- :mod:`.launch`: ``fedtune run`` with ``runtime.mode = "flower"`` or ``"flower-simulation"``.
- :mod:`.credentials`: TLS certificates and SuperNode authentication keys (``python -m ...credentials``).
- :mod:`.site`: ``fedtune node`` (a site checks its data, then runs its SuperNode).
- :mod:`.node_timing`: where each message's time goes on a node (``node_timing.jsonl``).
"""
