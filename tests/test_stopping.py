"""Stopping without losing a step: every signal that ends runs, output that cannot be written,
an error in the loop, SIGKILL; and ``| head`` on the command-line tools.

Training goes through the real entry point (``python train.py``) at the tiny size, as a user
runs it: in a pseudo-terminal as the foreground job ``train.py ... 2>&1 | tee LOG`` (Ctrl-C
typed on the terminal reaches python and tee), in the background for SIGTERM / SIGHUP /
SIGUSR1 / SIGKILL, with its output into a pipe nobody reads or closed. Each interrupted run
is resumed to STEPS and must equal a run that was never interrupted (``straight``) bit for
bit: int8 weights, every member's recurrent state, data cursor, every logged train/update
metric, and ``history.jsonl`` holds each step exactly once. The error-in-the-loop and
full-disk-tracker cases run ``trainer.train`` in this process (a monkeypatched batch stream,
a tracker whose writes raise ENOSPC) with the same config as the command line.
"""
from __future__ import annotations

import errno
import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from int_lm import checkpoint as CK
from int_lm import config as C
from int_lm.stopping import SIGNALS

from conftest import (DEFAULT_SIGNALS, TINY_EVERY, TINY_STEPS, assert_same_checkpoint, checkpoint_state,
                      tiny_args)

# Its tests share costly module fixtures: one worker runs them all (pyproject.toml: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_stopping")

ROOT = Path(__file__).resolve().parent.parent
STEPS = TINY_STEPS   # the straight reference (30 steps); interrupted runs aim at 1000 steps and stop well before
EVERY = TINY_EVERY   # checkpoints every EVERY steps, keep 3


@pytest.fixture(scope="module")
def env(tiny_env):
    return tiny_env          # tests/conftest.py: shared with tests/test_checkpoint.py


@pytest.fixture(scope="module")
def straight(tiny_straight):
    return tiny_straight     # STEPS uninterrupted steps with tiny_args (tests/conftest.py)


def args(env, run_dir, steps=1000, *extra) -> list[str]:
    return [sys.executable, "train.py", "--train.run_dir", str(run_dir), *tiny_args(env), "--train.steps", str(steps),
            *map(str, extra)]


def cli_config(env, run_dir, steps) -> C.Config:
    """The config ``args`` gives train.py, for ``trainer.train`` in this process."""
    values, _ = C.parse_overrides(args(env, run_dir, steps)[2:])
    return C.validate(C.apply_values(C.load_file(ROOT / "configs" / "tiny.toml"), values, "the command line"))


def run(env, cmd, expect=0, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=ROOT, env=kw.pop("env", env["env"]), capture_output=True, text=True, timeout=600,
                       **kw)
    assert p.returncode == expect, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


def history(run_dir) -> list[int]:
    """The steps in history.jsonl, in file order."""
    path = Path(run_dir) / CK.HISTORY
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def logged(run_dir) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k == "step" or k.startswith(("train/", "update/"))}
            for line in (Path(run_dir) / CK.HISTORY).read_text().splitlines()]


def wait_for_steps(run_dir, n: int, alive, timeout=300) -> None:
    """Until history.jsonl holds ``n`` steps (it is appended every step)."""
    t0 = time.monotonic()
    while len(history(run_dir)) < n:
        assert alive(), "training exited early"
        assert time.monotonic() - t0 < timeout, f"fewer than {n} steps logged after {timeout} s"
        time.sleep(0.01)


def assert_stopped_at(run_dir, at_least: int) -> int:
    """The run stopped after a step >= ``at_least``, and that step is checkpointed: 0 steps lost."""
    steps = history(run_dir)
    last = steps[-1]
    assert steps == list(range(1, last + 1)), steps
    assert at_least <= last < STEPS, (at_least, last)
    assert CK.list_steps(run_dir)[-1] == last, (CK.list_steps(run_dir), last)
    return last


def assert_equals_straight(run_dir, straight) -> None:
    assert_same_checkpoint(checkpoint_state(straight), checkpoint_state(run_dir))
    assert history(run_dir) == list(range(1, STEPS + 1))             # each step once
    assert logged(run_dir) == logged(straight)


# ---------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------

def test_stop_signals_in_process():
    """Before defer(): a signal stops at once; after: the first one asks (a repeated SIGHUP is not
    a second signal); a signal ignored at the start (nohup's SIGHUP) stays ignored; the handlers
    are restored. (A second signal ends the process: tested in a subprocess below.)"""
    from int_lm.stopping import Interrupted, StopSignals
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}   # SIGINT: ignored under `&`
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with pytest.raises(Interrupted, match="during start-up") as err, StopSignals():
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(1)
        assert err.value.exit_status == 128 + signal.SIGUSR1
        with StopSignals() as stop:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            stop.defer()
            os.kill(os.getpid(), signal.SIGHUP)          # ignored (nohup)
            time.sleep(0.05)
            assert not stop.requested
            signal.signal(signal.SIGHUP, stop._handle)   # as if not ignored
            stop._previous[signal.SIGHUP] = signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.05)
            assert stop.requested and stop.signum == signal.SIGHUP
            os.kill(os.getpid(), signal.SIGHUP)          # the shell's hang-up after the terminal's
            time.sleep(0.2)
        assert {sig: signal.getsignal(sig) for sig in before} == before
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN and signal.set_wakeup_fd(-1) == -1
    finally:
        signal.signal(signal.SIGHUP, previous)


SPIN = """
import jax, jax.numpy as jnp
from int_lm.stopping import StopSignals
spin = jax.jit(lambda n, v: jax.lax.fori_loop(0, n, lambda i, v: v * 3 + i.astype(v.dtype), v))
spin(10, jnp.ones(256, jnp.uint32)).block_until_ready()      # compiled
with StopSignals() as stop:
    stop.defer()
    print("ready", flush=True)
    spin(2**31 - 1, jnp.ones(256, jnp.uint32)).block_until_ready()   # minutes inside XLA
print("the computation finished", flush=True)
"""


def test_a_second_signal_ends_a_long_xla_call_at_once(env):
    """Inside a long XLA computation Python's handlers cannot run: the first signal is still said at
    once, and the second ends the process at once with 128 + signal."""
    proc = subprocess.Popen([sys.executable, "-c", SPIN], cwd=ROOT, env=env["env"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.communicate(timeout=60)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None, "the first signal must not end the step"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM and took < 10, (proc.returncode, took, err)
    assert "SIGTERM: stopping after this step" in err and "stopped at once by a second signal (SIGTERM)" in err
    assert "finished" not in out


def test_a_lost_stream_goes_to_devnull_with_one_warning(monkeypatch):
    import io
    from int_lm.cli import TolerantStream
    read, write = os.pipe()
    os.close(read)
    stream = os.fdopen(write, "w")
    other = io.StringIO()
    monkeypatch.setattr(sys, "stderr", other)
    out = TolerantStream(stream, "stdout", warn_when_lost=True)
    monkeypatch.setattr(sys, "stdout", out)
    for _ in range(3):
        print("x" * 10000, file=out, flush=True)
    assert out.gone and os.path.samestat(os.fstat(write), os.stat(os.devnull))
    assert other.getvalue().count("warning:") == 1 and "Broken pipe" in other.getvalue()
    stream.close()


def test_ctrl_c_in_a_terminal_piped_to_tee(env, straight, tmp_path):
    """``train.py ... 2>&1 | tee LOG`` as a terminal's foreground job; Ctrl-C reaches python and tee,
    so every write after it meets a broken pipe: the step still finishes and is saved."""
    run_dir, log = tmp_path / "run", tmp_path / "tee.log"
    cmd = " ".join(args(env, run_dir, 1000, "--train.progress", "true")) + f" 2>&1 | tee {log}"
    with warnings.catch_warnings():   # JAX warns about fork(); the child only execs bash
        warnings.simplefilter("ignore", RuntimeWarning)
        pid, master = pty.fork()
    if pid == 0:      # the child: a new session whose controlling terminal is the pty
        try:
            for s in SIGNALS:     # as in a terminal, whatever ignored them where the suite started
                signal.signal(s, signal.SIG_DFL)
            os.chdir(ROOT)
            os.execvpe("bash", ["bash", "--norc", "--noprofile", "-c", cmd], env["env"])
        finally:
            os._exit(127)
    screen = bytearray()

    def drain():      # the terminal must be read, or tee blocks on it
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                return
            if not chunk:
                return
            screen.extend(chunk)

    status = []

    def running() -> bool:
        if not status:
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                status.append(code)
        return not status

    threading.Thread(target=drain, daemon=True).start()
    try:
        wait_for_steps(run_dir, 6, running)
        os.write(master, b"\x03")                         # Ctrl-C: SIGINT to the foreground process group
        t0 = time.monotonic()
        while running():
            assert time.monotonic() - t0 < 300, "the pipeline did not end after Ctrl-C"
            time.sleep(0.05)
    finally:
        if running():
            os.killpg(pid, signal.SIGKILL)                  # bash, python and tee: the session's one group
            os.waitpid(pid, 0)
        os.close(master)
    text = screen.decode(errors="replace")
    assert "Traceback" not in text and "Traceback" not in log.read_text(errors="replace"), text[-3000:]
    stopped = assert_stopped_at(run_dir, 6)
    p = run(env, args(env, run_dir, STEPS))                          # resume for STEPS - stopped more steps
    assert f"from checkpoint step {stopped}" in p.stdout
    assert_equals_straight(run_dir, straight)


def test_sigterm_sighup_sigusr1_then_sigkill_lose_nothing(env, straight, tmp_path):
    """Each to a background run: the step finishes, is saved, exit 128 + signal, one line says so;
    then SIGKILL: history.jsonl holds every completed step; resumed to STEPS: identical."""
    run_dir, stopped = tmp_path / "run", 0
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        proc = subprocess.Popen(DEFAULT_SIGNALS + args(env, run_dir)[1:], cwd=ROOT, env=env["env"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_steps(run_dir, stopped + 3, lambda: proc.poll() is None)
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=300)
        finally:
            proc.kill()
        assert proc.returncode == 128 + sig, f"{sig.name}: exit {proc.returncode}\n{out[-2000:]}\n{err[-2000:]}"
        if stopped:
            assert f"from checkpoint step {stopped}" in out
        stopped = assert_stopped_at(run_dir, stopped + 3)
        assert f"{sig.name}: stopping after this step" in err and "Traceback" not in err, err
        assert f"stopped by {sig.name} at step {stopped}; checkpoint {stopped} is saved" in out, out[-2000:]

    proc = subprocess.Popen(args(env, run_dir), cwd=ROOT, env=env["env"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_steps(run_dir, stopped + 3, lambda: proc.poll() is None)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    steps = history(run_dir)
    assert steps == list(range(1, len(steps) + 1)) and stopped + 3 <= len(steps) < STEPS, steps
    kept = CK.list_steps(run_dir)[-1]
    p = run(env, args(env, run_dir, STEPS))
    assert f"from checkpoint step {kept}" in p.stdout                 # history.jsonl is cut back to it
    assert_equals_straight(run_dir, straight)


# ---------------------------------------------------------------------------
# Output that cannot be written
# ---------------------------------------------------------------------------

def test_output_that_cannot_be_written_changes_nothing(env, straight, tmp_path):
    """stdout closed (``>&-``) and stderr a pipe whose reader is gone (block-buffered, as without
    PYTHONUNBUFFERED; the progress bar writes to it every step): the run trains all its steps,
    identically, and writes its final checkpoint. (Both into a broken pipe: the tee test above.)"""
    read, write = os.pipe()
    os.close(read)
    quiet_env = {k: v for k, v in env["env"].items() if k != "PYTHONUNBUFFERED"}
    cmd = " ".join(args(env, tmp_path / "run", STEPS, "--train.progress", "true"))
    try:
        p = subprocess.run(["bash", "-c", f"exec {cmd} >&- 2>&{write}"], cwd=ROOT, env=quiet_env, timeout=600,
                           pass_fds=(write,))
    finally:
        os.close(write)
    assert p.returncode == 0
    assert CK.list_steps(tmp_path / "run")[-1] == STEPS
    assert_equals_straight(tmp_path / "run", straight)


# ---------------------------------------------------------------------------
# A tracker on a full disk, an error in the loop
# ---------------------------------------------------------------------------

def test_full_disk_tracker_and_an_error_in_the_loop_lose_nothing(env, straight, tmp_path, monkeypatch, capfd):
    """In this process (``trainer.train``, the command line's config), with a tracker whose writes
    raise ENOSPC from the 4th on: it warns once and is switched off while training goes on. An
    exception after step 7 (checkpoints every 3) saves step 7 first and says so; resumed (the
    tracker still failing) the run reaches its step count, saves its final checkpoint and is
    bit-identical to the uninterrupted run."""
    from int_lm import data
    from int_lm.logging import TensorBoardTracker
    from int_lm.trainer import train

    class FullDisk(TensorBoardTracker):
        writes = 0

        def _write(self, step, values):
            FullDisk.writes += 1
            if FullDisk.writes > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            super()._write(step, values)

    real_next, calls = data.BatchStream.next, []

    def failing_next(self):
        calls.append(1)
        if len(calls) == 8:
            raise RuntimeError("the data source went away")
        return real_next(self)

    run_dir = tmp_path / "run"
    monkeypatch.setattr(data.BatchStream, "next", failing_next)
    with pytest.raises(RuntimeError, match="went away") as err:
        train(cli_config(env, run_dir, 1000), tracker=FullDisk(tmp_path / "tb"), log=lambda *a: None)
    monkeypatch.undo()
    notes = " ".join(getattr(err.value, "__notes__", []))
    assert "the state after step 7" in notes and "saved" in notes and "resume" in notes, notes
    assert CK.list_steps(run_dir)[-1] == 7 and history(run_dir) == list(range(1, 8))
    assert FullDisk.writes == 4                                  # switched off after the first failure
    warned = capfd.readouterr().err
    assert warned.count("warning:") == 1 and "no space left on device" in warned and "go on" in warned, warned

    FullDisk.writes = 3
    summary = train(cli_config(env, run_dir, STEPS), tracker=FullDisk(tmp_path / "tb2"), log=lambda *a: None)
    assert summary["steps"] == STEPS and CK.list_steps(run_dir)[-1] == STEPS
    assert capfd.readouterr().err.count("warning:") == 1
    assert_equals_straight(run_dir, straight)


# ---------------------------------------------------------------------------
# The command-line tools into `| head`
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("tool, heads", [
    (["eval.py", "{run}", "--no_tb", "--max_bytes", "4000", "--data.cache_dir", "{cache}"], ["head -n 0"]),
    (["-m", "int_lm.checkpoint", "list", "{run}"], ["head -1", "head -n 0"])], ids=["eval", "checkpoint_list"])
def test_tools_into_head_end_quietly(env, straight, tool, heads):
    """``| head -1`` may or may not close the pipe before the tool writes again; ``| head -n 0`` exits
    before reading: a sure broken pipe."""
    cmd = " ".join([sys.executable] + [t.format(run=straight, cache=env["cache"]) for t in tool])
    quiet_env = {k: v for k, v in env["env"].items() if k != "PYTHONUNBUFFERED"}
    for head in heads:
        p = subprocess.run(["bash", "-c", f"{cmd} | {head}; exit ${{PIPESTATUS[0]}}"], cwd=ROOT, env=quiet_env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode in (0, 141), f"{head}: exit {p.returncode}\n{p.stderr[-3000:]}"
        assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr, p.stderr[-3000:]
        assert head == "head -n 0" or p.stdout.strip(), p.stdout


# ---------------------------------------------------------------------------
# Several processes
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_a_signal_to_one_process_stops_all_after_the_same_step(tmp_path):
    """Two processes (jax.distributed on localhost); SIGTERM to process 1 only: both finish the same
    step, the checkpoint is saved once, both exit 143; resumed on one process it is bit-identical."""
    import test_distributed as TD
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    port = TD.free_port()
    procs = [subprocess.Popen(TD._args(cache, run_dir, 1000, "--dist.coordinator_address", f"127.0.0.1:{port}",
                                       "--dist.num_processes", "2", "--dist.process_id", str(i)),
                              cwd=ROOT, env=TD._env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        wait_for_steps(run_dir, 3, lambda: all(p.poll() is None for p in procs), timeout=TD.TIMEOUT)
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=TD.TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [143, 143], outs
    stopped = history(run_dir)[-1]
    assert history(run_dir) == list(range(1, stopped + 1)) and CK.list_steps(run_dir)[-1] == stopped
    assert f"stopped by SIGTERM at step {stopped}; checkpoint {stopped} is saved" in outs[0]
    TD.train_subprocess(cache, run_dir, stopped + 2)                      # resumed on one process
    reference = tmp_path / "reference"
    TD.train_subprocess(cache, reference, stopped + 2)
    TD.assert_same_state(run_dir, reference, stopped + 2)
    assert TD.losses(run_dir) == TD.losses(reference)
