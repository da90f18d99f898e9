"""TensorBoard: one event file per run, written with TensorBoard's own (TensorFlow-free) writer.

Scalars: every numeric key of ``metrics.jsonl`` at step = round. HParams: the flattened resolved config
(the HParams dashboard's columns), the run's status at the end. Text: the resolved config as TOML.
Images: the final plots.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedtune.tracking.base import FAILED, FINISHED, KILLED, import_backend


def default_dir(exp, out_dir: Path) -> Path:
    """``tracking.tensorboard_dir``, else ``<output_dir>/tensorboard``."""
    return Path(exp.tracking.tensorboard_dir) if exp.tracking.tensorboard_dir else Path(out_dir) / "tensorboard"


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk (0, 0 when ``data`` is not a PNG)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 24:
        return 0, 0
    return struct.unpack(">II", data[16:24])


class TensorBoardTracker:
    """A run's event file under ``log_dir``."""

    name = "tensorboard"

    def __init__(self, log_dir: Path, group: str = "", config_toml: str = "") -> None:
        import_backend("tensorboard", self.name)
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(self.log_dir))
        self._group = group
        self._tags: list[str] = []
        self._hparams: dict[str, Any] = {}
        self._last_step = 0
        if config_toml:
            self._write(self._text("config", config_toml), 0)

    def _write(self, summary, step: int) -> None:
        self._writer.add_event(self._event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def _text(self, tag: str, text: str):
        from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2, types_pb2

        s = self._summary_pb2
        tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[text.encode()],
                                        tensor_shape=tensor_shape_pb2.TensorShapeProto())
        meta = s.SummaryMetadata(plugin_data=s.SummaryMetadata.PluginData(plugin_name="text"))
        return s.Summary(value=[s.Summary.Value(tag=tag, metadata=meta, tensor=tensor)])

    def _hparams_summary(self, tag: str, **plugin_data):
        from tensorboard.plugins.hparams import metadata, plugin_data_pb2

        content = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **plugin_data)
        s = self._summary_pb2
        meta = s.SummaryMetadata(plugin_data=s.SummaryMetadata.PluginData(
            plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString()))
        return s.Summary(value=[s.Summary.Value(tag=tag, metadata=meta, tensor=metadata.NULL_TENSOR)])

    def log_params(self, flat: Mapping[str, Any]) -> None:
        """The session-start record of the HParams dashboard: every config key and its value."""
        from tensorboard.plugins.hparams import metadata, plugin_data_pb2

        start = plugin_data_pb2.SessionStartInfo(group_name=self._group, start_time_secs=time.time())
        for key, value in flat.items():
            if isinstance(value, bool):
                start.hparams[key].bool_value = value
            elif isinstance(value, (int, float)):
                start.hparams[key].number_value = float(value)
            else:
                start.hparams[key].string_value = str(value)
        self._hparams = dict(flat)
        self._write(self._hparams_summary(metadata.SESSION_START_INFO_TAG, session_start_info=start), 0)

    def log_round(self, step: int, record: Mapping[str, float]) -> None:
        """One scalar per metric at ``step``."""
        s = self._summary_pb2
        values = [s.Summary.Value(tag=k, simple_value=v) for k, v in record.items()]
        for k in record:
            if k not in self._tags:
                self._tags.append(k)
        self._last_step = max(self._last_step, step)
        self._write(s.Summary(value=values), step)
        self._writer.flush()

    def log_artifacts(self, run_dir: Path, *, model: bool, plots: list[Path]) -> None:
        """The plots as images (``plots/<name>``) at the last round; the model stays in the run folder."""
        s = self._summary_pb2
        for path in plots:
            data = path.read_bytes()
            width, height = _png_size(data)
            image = s.Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=data)
            self._write(s.Summary(value=[s.Summary.Value(tag=f"plots/{path.stem}", image=image)]), self._last_step)

    def close(self, status: str) -> None:
        """Write the HParams experiment (config keys, metric tags) and the session's end status; close the file."""
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

        if self._hparams:
            infos = [api_pb2.HParamInfo(name=k, type=api_pb2.DATA_TYPE_BOOL if isinstance(v, bool) else
                                        api_pb2.DATA_TYPE_FLOAT64 if isinstance(v, (int, float)) else
                                        api_pb2.DATA_TYPE_STRING) for k, v in self._hparams.items()]
            metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t)) for t in self._tags]
            experiment = api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics, time_created_secs=time.time())
            self._write(self._hparams_summary(metadata.EXPERIMENT_TAG, experiment=experiment), 0)
        code = {FINISHED: api_pb2.STATUS_SUCCESS, FAILED: api_pb2.STATUS_FAILURE,
                KILLED: api_pb2.STATUS_FAILURE}.get(status, api_pb2.STATUS_UNKNOWN)
        end = plugin_data_pb2.SessionEndInfo(status=code, end_time_secs=time.time())
        self._write(self._hparams_summary(metadata.SESSION_END_INFO_TAG, session_end_info=end), self._last_step)
        self._writer.close()


def open_tracker(exp, out_dir: Path, run_name: str) -> TensorBoardTracker:
    """The run's TensorBoard tracker (events in :func:`default_dir`)."""
    return TensorBoardTracker(default_dir(exp, out_dir), exp.tracking.group, exp.to_toml())
