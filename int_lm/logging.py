"""Metrics go through one small interface, so the loop never knows where they land.

``TensorBoardTracker`` writes TensorBoard event files with the ``tensorboard``
package alone (its protobufs and ``EventFileWriter``; no TensorFlow), including
weight histograms. ``NullTracker`` is for non-zero processes and tests.
``TolerantTracker`` wraps either for a training run: metrics are a record of the
run, never a reason to stop it, so a failed write (disk full, directory gone)
warns once and switches the tracker off while training and checkpoints go on.
"""
from __future__ import annotations

import errno
import threading
import time
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter, _AsyncWriterThread

from int_lm.cli import warn


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
    thread gets the same error on its next write or flush (and a TolerantTracker warns once)."""
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

    A failed write (disk full, directory removed) raises the OSError, here or on a
    later call (the writer thread's); wrap it in a :class:`TolerantTracker` to go on without it.
    """

    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        _quiet_writer_threads()
        self.log_dir.mkdir(parents=True, exist_ok=True)
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

    def mark_restart(self, step: int) -> None:
        """Tell TensorBoard to drop events logged after ``step`` (by an interrupted process); on resume."""
        start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        self._writer.add_event(event_pb2.Event(step=int(step) + 1, session_log=start))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class TolerantTracker(NullTracker):
    """A tracker whose first failed write (an OSError: disk full, directory gone, while
    opening it too) warns once, to wherever still works, and switches it off for the rest of
    the run; nothing it does ever raises an OSError to the caller.

    ``open_tracker``: makes the tracker (called here, guarded); ``what``: its name in the warning.
    """

    def __init__(self, open_tracker: Callable[[], NullTracker], what: str = "metrics"):
        self.what = what
        self.failed: OSError | None = None
        self._tracker: NullTracker = NullTracker()
        self._tracker = self._guard(open_tracker) or NullTracker()

    def _guard(self, call):
        if self.failed is not None:
            return None
        try:
            return call()
        except OSError as err:
            self.failed = err
            broken, self._tracker = self._tracker, NullTracker()
            try:
                broken.close()
            except Exception:       # the same failure again: already reported
                pass
            why = "no space left on device" if err.errno in (errno.ENOSPC, errno.EDQUOT) else \
                (err.strerror or str(err) or type(err).__name__)
            warn(f"cannot write {self.what} ({why}); training and checkpoints go on without them")
            return None

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self._guard(lambda: self._tracker.scalars(step, values))

    def histogram(self, step: int, tag: str, values: np.ndarray) -> None:
        self._guard(lambda: self._tracker.histogram(step, tag, values))

    def text(self, step: int, tag: str, value: str) -> None:
        self._guard(lambda: self._tracker.text(step, tag, value))

    def mark_restart(self, step: int) -> None:
        self._guard(lambda: self._tracker.mark_restart(step))

    def flush(self) -> None:
        self._guard(self._tracker.flush)

    def close(self) -> None:
        self._guard(self._tracker.close)


def read_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Read every scalar back with TensorBoard's own reader: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
