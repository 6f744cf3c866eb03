"""Metrics go through one small interface, so the loop never knows where they land.

``TensorBoardTracker`` writes TensorBoard event files with the ``tensorboard``
package alone (its protobufs and ``EventFileWriter``; no TensorFlow), including
weight histograms. ``NullTracker`` is for non-zero processes and tests.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class NullTracker:
    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        pass

    def histogram(self, step: int, tag: str, values: np.ndarray) -> None:
        pass

    def text(self, step: int, tag: str, value: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(NullTracker):
    """Scalars, histograms and text in ``log_dir`` (open it with ``tensorboard --logdir``)."""

    def __init__(self, log_dir: str | Path):
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(log_dir))

    def _write(self, step: int, values: list) -> None:
        event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values))
        self._writer.add_event(event)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self._write(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])

    def histogram(self, step: int, tag: str, values: np.ndarray) -> None:
        """Integer-valued histogram: one bucket per distinct int8 value present."""
        flat = np.asarray(values).astype(np.int64).ravel()
        counts = np.bincount(flat + 128, minlength=256)
        present = np.nonzero(counts)[0]
        hist = summary_pb2.HistogramProto(
            min=float(flat.min()), max=float(flat.max()), num=float(flat.size),
            sum=float(flat.sum()), sum_squares=float((flat * flat).sum()),
            bucket_limit=[float(i - 128) + 0.5 for i in present], bucket=[float(counts[i]) for i in present])
        self._write(step, [summary_pb2.Summary.Value(tag=tag, histo=hist)])

    def text(self, step: int, tag: str, value: str) -> None:
        tensor = tensor_pb2.TensorProto(dtype=7, string_val=[value.encode()],  # DT_STRING
                                        tensor_shape=tensor_shape_pb2.TensorShapeProto())
        meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
        self._write(step, [summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=meta)])

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Read every scalar back with TensorBoard's own reader: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
