"""The client runtime: local training driven by the RoundPlan's typed data (:mod:`fedtune.client.train`)
and the contract of client-side kinds (:mod:`fedtune.client.kinds`).

The names below are read from :mod:`fedtune.client.train` on first use, so importing
:mod:`fedtune.client.kinds` (as every strategy file does) does not import torch.
"""

__all__ = ["PERSONAL_STATE_KEY", "local_train", "planned_steps"]


def __getattr__(name: str):
    """The training entry points, imported from :mod:`fedtune.client.train` when first asked for."""
    if name in __all__:
        from fedtune.client import train

        return getattr(train, name)
    raise AttributeError(f"module 'fedtune.client' has no attribute {name!r}")
