"""The client runtime: local training driven by the RoundPlan's typed data (:mod:`fedtune.client.train`)
and the contract of client-side kinds (:mod:`fedtune.client.kinds`)."""

from fedtune.client.train import PERSONAL_STATE_KEY, local_train, planned_steps

__all__ = ["PERSONAL_STATE_KEY", "local_train", "planned_steps"]
