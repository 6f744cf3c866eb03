"""int_lm/logging.py: what the trackers write is what TensorBoard's own reader reads back
(scalars, exact integer histograms, text), a resumed run's restart marker hides the
interrupted process's later events, and a failing tracker warns once and never raises.
(The trainer's curves end to end: tests/test_trainer.py; a full disk: tests/test_errors.py.)"""
import errno

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from int_lm import logging as L


def accumulator(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_scalars_histograms_and_text_read_back(tmp_path):
    rng = np.random.default_rng(0)
    weights = rng.integers(-128, 128, (64, 33)).astype(np.int8)
    weights[0, :3] = (-128, 127, 0)
    tb = L.TensorBoardTracker(tmp_path)
    for step in (1, 2, 3):
        tb.scalars(step, {"val/bits_per_byte": 4.0 - step / 8, "perf/step_s": 0.25})
    tb.histogram(3, "weights/head", weights)
    tb.text(3, "samples/val_prompt", "to be, or n\u00f6t \u4e2d")
    tb.close()

    assert L.read_scalars(tmp_path) == {"val/bits_per_byte": [(1, 3.875), (2, 3.75), (3, 3.625)],
                                        "perf/step_s": [(1, 0.25), (2, 0.25), (3, 0.25)]}
    acc = accumulator(tmp_path)
    (h,) = acc.Histograms("weights/head")
    flat = weights.astype(np.int64).ravel()
    values, counts = np.unique(flat, return_counts=True)
    hist = h.histogram_value
    assert (h.step, hist.min, hist.max, hist.num) == (3, -128, 127, flat.size)
    assert (hist.sum, hist.sum_squares) == (flat.sum(), (flat * flat).sum())
    assert hist.bucket_limit == [v + 0.5 for v in values.tolist()]          # one bucket per value present
    assert hist.bucket == counts.tolist()
    (t,) = acc.Tensors("samples/val_prompt")
    assert t.step == 3 and t.tensor_proto.string_val[0].decode() == "to be, or n\u00f6t \u4e2d"


def test_a_restart_marker_hides_what_the_interrupted_process_logged_after_the_checkpoint(tmp_path):
    first = L.TensorBoardTracker(tmp_path)
    for step in range(1, 11):                      # the interrupted run logged to step 10 ...
        first.scalars(step, {"train/loss": float(step)})
    first.close()
    resumed = L.TensorBoardTracker(tmp_path)       # ... its last checkpoint was step 5
    resumed.mark_restart(5)
    for step in range(6, 9):
        resumed.scalars(step, {"train/loss": 100.0 + step})
    resumed.close()
    assert L.read_scalars(tmp_path)["train/loss"] == [(s, float(s)) for s in range(1, 6)] + \
        [(s, 100.0 + s) for s in range(6, 9)]


class Failing(L.NullTracker):
    """A tracker whose writes fail from call ``fail_at`` on, as on a full disk."""

    def __init__(self, fail_at: int, code=errno.ENOSPC):
        self.calls, self.fail_at, self.code, self.closed = 0, fail_at, code, 0

    def scalars(self, step, values):
        self.calls += 1
        if self.calls >= self.fail_at:
            raise OSError(self.code, "No space left on device" if self.code == errno.ENOSPC else "gone")

    def close(self):
        self.closed += 1
        raise OSError(self.code, "again")


def test_a_failed_write_warns_once_and_switches_the_tracker_off(capsys):
    inner = Failing(fail_at=3)
    t = L.TolerantTracker(lambda: inner, "TensorBoard curves")
    for step in range(1, 8):
        t.scalars(step, {"x": 1.0})
        t.histogram(step, "w", np.zeros(4, np.int8))
        t.text(step, "s", "x")
    t.mark_restart(7)
    t.flush()
    t.close()
    err = capsys.readouterr().err
    assert err == "warning: cannot write TensorBoard curves (no space left on device); training and " \
                  "checkpoints go on without them\n"
    assert inner.calls == 3 and inner.closed == 1           # closed once when it broke, never written again
    assert isinstance(t.failed, OSError) and t.failed.errno == errno.ENOSPC


@pytest.mark.parametrize("code,why", [(errno.ENOENT, "gone"), (errno.EDQUOT, "no space left on device")])
def test_a_tracker_that_cannot_open_is_off_from_the_start(capsys, code, why):
    def cannot_open():
        raise OSError(code, "gone")

    t = L.TolerantTracker(cannot_open, "metrics")
    t.scalars(1, {"x": 1.0})
    t.close()
    assert capsys.readouterr().err == f"warning: cannot write metrics ({why}); training and checkpoints go on " \
                                      f"without them\n"
