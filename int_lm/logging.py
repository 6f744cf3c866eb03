"""Metrics go through one small interface, so the loop never knows where they land.

``TensorBoardTracker`` writes TensorBoard event files with the ``tensorboard``
package alone (its protobufs and ``EventFileWriter``; no TensorFlow), including
weight histograms. ``NullTracker`` is for non-zero processes and tests.
"""
from __future__ import annotations

import errno
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Mapping

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter, _AsyncWriterThread

from int_lm.errors import UserError


class NullTracker:
    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        pass

    def histogram(self, step: int, tag: str, values: np.ndarray) -> None:
        pass

    def text(self, step: int, tag: str, value: str) -> None:
        pass

    def mark_restart(self, step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _quiet_writer_threads() -> None:
    """TensorBoard's writer thread prints a traceback when a write fails (disk full); the main
    thread reports the same error once, as a UserError, on its next write or flush."""
    global _QUIET
    if _QUIET:
        return
    _QUIET = True
    previous = threading.excepthook

    def hook(args):
        if isinstance(args.thread, _AsyncWriterThread) and isinstance(args.exc_value, OSError):
            return
        previous(args)

    threading.excepthook = hook


_QUIET = False


class TensorBoardTracker(NullTracker):
    """Scalars, histograms and text in ``log_dir`` (open it with ``tensorboard --logdir``).

    A failed write (disk full, directory removed) raises a one-line
    :class:`~int_lm.errors.UserError`; the caller's checkpoints are unaffected.
    """

    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        _quiet_writer_threads()
        with self._errors():
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = EventFileWriter(str(log_dir))

    @contextmanager
    def _errors(self):
        try:
            yield
        except OSError as err:
            why = "no space left on device" if err.errno in (errno.ENOSPC, errno.EDQUOT) else \
                (err.strerror or str(err) or type(err).__name__)
            raise UserError(f"cannot write TensorBoard events to {self.log_dir} ({why}); checkpoints already "
                            f"saved are kept; free disk space (or fix the directory), then run the same "
                            f"command to resume") from None

    def _write(self, step: int, values: list) -> None:
        event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values))
        with self._errors():
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

    def mark_restart(self, step: int) -> None:
        """Tell TensorBoard to drop events logged after ``step`` (by an interrupted process); on resume."""
        start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        with self._errors():
            self._writer.add_event(event_pb2.Event(step=int(step) + 1, session_log=start))

    def flush(self) -> None:
        with self._errors():
            self._writer.flush()

    def close(self) -> None:
        with self._errors():
            self._writer.close()


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Read every scalar back with TensorBoard's own reader: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
