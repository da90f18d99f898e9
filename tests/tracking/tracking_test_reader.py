"""Read a TensorBoard run's HParams session status back (EventAccumulator), for the tracking tests."""

from __future__ import annotations

from pathlib import Path


def session_status(log_dir: Path) -> str:
    """The HParams session-end status name of the run in ``log_dir`` (e.g. ``STATUS_SUCCESS``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    events = EventAccumulator(str(log_dir))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_end_info"]
    return api_pb2.Status.Name(plugin_data_pb2.HParamsPluginData.FromString(content).session_end_info.status)
