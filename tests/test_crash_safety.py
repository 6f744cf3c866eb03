"""Crash safety: SIGKILL at several moments, including in the middle of a checkpoint save,
never corrupts or removes the last good checkpoint, and the resumed run continues
bit-exactly (int8 weights, every member's recurrent state, the update rule's state, data
cursor, logged metrics).

A checkpoint save is detected from the outside: orbax writes into
``checkpoints/<step>.orbax-checkpoint-tmp-*`` and renames it when complete (40-200 ms
at the tiny size), so polling every millisecond sees every save in flight, and the
training process is SIGKILLed then, or a few milliseconds later (files half-written).
Training goes through the real entry point (``python train.py``) at the tiny size, with
the update rule users get by default (``configs/default.toml``: the momentum rule, whose
int32 momentum and int16 master weights are saved beside the int8 weights).
tests/test_checkpoint.py covers SIGINT, SIGKILL between saves and a full disk; the slow
test here kills ten times at seeded random moments.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from int_lm import checkpoint as CK
from conftest import assert_same_checkpoint, checkpoint_state

# Its tests share costly module fixtures: one worker runs them all (pyproject.toml: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_crash_safety")

ROOT = Path(__file__).resolve().parent.parent
STEPS = 30
EVERY = 2
RULE = ("--es.optimizer", "momentum", "--es.fitness_levels", "3")     # the default's rule, with state
WITH_STATE = ("params", "states", "opt.momentum", "opt.master")     # the arrays its checkpoints hold


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("crash_env")
    e = dict(os.environ)
    e.update(JAX_PLATFORMS="cpu", XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1",
             JAX_COMPILATION_CACHE_DIR=str(base / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return {"env": e, "cache": str(base / "data_cache")}


def args(env, run_dir, *extra) -> list[str]:
    return [sys.executable, "train.py", "--config", "configs/tiny.toml", "--data.max_docs", "40",
            "--data.val_tokens", "512", "--data.cache_dir", env["cache"], "--train.checkpoint_every", str(EVERY),
            "--train.eval_every", "3", "--train.keep_checkpoints", "3", "--train.progress", "false",
            "--train.run_dir", str(run_dir), *RULE, *map(str, extra)]


def run(env, cmd) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=ROOT, env=env["env"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


def start(env, cmd, log: Path) -> subprocess.Popen:
    started = time.time_ns() - 10_000_000     # 10 ms of slack for the file system's clock
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env["env"], stdout=open(log, "a"), stderr=subprocess.STDOUT)
    proc.started_ns = started
    return proc


def saving(run_dir: Path, since_ns: int = 0) -> list[str]:
    """Orbax temporary directories (saves in flight, or left by a kill) created after ``since_ns``."""
    root = CK.checkpoint_dir(run_dir)
    out = []
    try:
        for n in os.listdir(root):
            if "tmp" in n and os.stat(root / n).st_ctime_ns >= since_ns:
                out.append(n)
    except FileNotFoundError:
        pass
    return out


def kill_during_save(proc: subprocess.Popen, run_dir: Path, after_step: int, delay_s: float,
                     timeout=300) -> list[str]:
    """SIGKILL ``delay_s`` after a save of a step > ``after_step`` is seen in flight; returns its tmp dirs.

    A killed save leaves ``<step>.orbax-checkpoint-tmp`` behind under the same name until the
    next save cleans it up: only directories created after ``proc`` started count.
    """
    t0 = time.monotonic()
    while True:
        tmp = [n for n in saving(run_dir, proc.started_ns) if int(n.split(".")[0]) > after_step]
        if tmp:
            break
        assert proc.poll() is None, f"training exited early ({proc.returncode})"
        assert time.monotonic() - t0 < timeout, "no save seen"
        time.sleep(0.001)
    if delay_s:
        time.sleep(delay_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return tmp


def logged(run_dir) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k == "step" or k.startswith(("train/", "update/"))}
            for line in (Path(run_dir) / "history.jsonl").read_text().splitlines()]


def check_after_kill(run_dir: Path, before: list[int]) -> int:
    """The last checkpoint committed before the kill is still there and verifies; so does every other."""
    after = CK.list_steps(run_dir)
    assert before and after and after[-1] >= before[-1], (before, after)
    # removed only by garbage collection once train.keep_checkpoints (3) newer ones committed
    assert before[-1] in after or len([s for s in after if s > before[-1]]) >= 3, (before, after)
    for s in after:
        CK.restore(run_dir, s)          # shapes, int8, sha256 of every array
    return after[-1]


@pytest.fixture(scope="module")
def straight(env, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    run(env, args(env, run_dir, "--train.steps", STEPS))
    return run_dir


def test_sigkill_during_saves_keeps_the_last_checkpoint_and_resumes_bit_exactly(env, straight, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log"
    resumed_from = []

    # 1. killed the moment the first save is seen (before any checkpoint has committed)
    proc = start(env, args(env, run_dir, "--train.steps", 1000), log)
    try:
        tmp = kill_during_save(proc, run_dir, 0, 0.0)
    finally:
        proc.kill()
    committed = CK.list_steps(run_dir)
    assert tmp and int(tmp[0].split(".")[0]) not in committed, (tmp, committed)
    if not committed:      # nothing committed: the next run starts afresh (and cleans the tmp dir)
        proc = start(env, args(env, run_dir, "--train.steps", 1000), log)
        try:
            tmp = kill_during_save(proc, run_dir, EVERY, 0.0)  # while the second save is in flight
        finally:
            proc.kill()
        committed = CK.list_steps(run_dir)
    last = check_after_kill(run_dir, committed)

    # 2. resumed, killed a few milliseconds into a later save (files half-written)
    for delay in (0.005, 0.03):
        before = CK.list_steps(run_dir)
        proc = start(env, args(env, run_dir), log)          # the saved config: still 1000 steps
        try:
            kill_during_save(proc, run_dir, before[-1], delay)
        finally:
            proc.kill()
        resumed_from.append(before[-1])
        last = check_after_kill(run_dir, before)
    assert last < STEPS, f"ran past the reference's {STEPS} steps; lower the kill points"

    # 3. killed during start-up, just after it restored the checkpoint (and logged the resume)
    before = CK.list_steps(run_dir)
    n_lines = len(log.read_text().splitlines())
    proc = start(env, args(env, run_dir), log)
    try:
        t0 = time.monotonic()
        while "resuming" not in "".join(log.read_text().splitlines()[n_lines:]) and time.monotonic() - t0 < 300:
            assert proc.poll() is None
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    resumed_from.append(before[-1])
    assert CK.list_steps(run_dir) == before
    check_after_kill(run_dir, before)

    # 4. resumed, killed between saves (right after a step's history was logged)
    before = CK.list_steps(run_dir)
    proc = start(env, args(env, run_dir), log)
    try:
        t0 = time.monotonic()
        while CK.list_steps(run_dir)[-1] == before[-1] and time.monotonic() - t0 < 300:
            assert proc.poll() is None
            time.sleep(0.005)
        time.sleep(random.Random(0).uniform(0, 0.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    resumed_from.append(before[-1])
    last = check_after_kill(run_dir, CK.list_steps(run_dir))
    assert last < STEPS

    # 5. finish: bit-identical to the run that was never interrupted
    p = run(env, args(env, run_dir, "--train.steps", STEPS))
    resumed_from.append(last)
    assert f"from checkpoint step {last}" in p.stdout
    assert not saving(run_dir), "a half-written save was left behind"
    assert_same_checkpoint(checkpoint_state(straight), checkpoint_state(run_dir), WITH_STATE)
    assert logged(run_dir) == logged(straight) and [h["step"] for h in logged(run_dir)] == list(range(1, STEPS + 1))
    log_steps = [json.loads(line)["resumed_from_step"] for line in (run_dir / CK.RESUME_LOG).read_text().splitlines()]
    assert log_steps == resumed_from


@pytest.mark.slow
def test_sigkill_at_random_moments(env, tmp_path):
    """Ten SIGKILLs at seeded random moments (start-up, mid-save, between saves), then bit-exact to the end."""
    steps = 150
    straight = tmp_path / "straight"
    run(env, args(env, straight, "--train.steps", steps))
    run_dir, log = tmp_path / "run", tmp_path / "log"
    rng = random.Random(1234)
    kinds = []
    for _ in range(10):
        before = CK.list_steps(run_dir)
        proc = start(env, args(env, run_dir, "--train.steps", steps), log)
        kind = rng.choice(["time", "save", "step"])
        try:
            if kind == "time":
                time.sleep(rng.uniform(0.2, 3.0))
            elif kind == "save":
                kill_during_save(proc, run_dir, before[-1] if before else 0, rng.uniform(0.0, 0.1))
            else:
                t0 = time.monotonic()
                while CK.list_steps(run_dir)[-1:] == before[-1:] and time.monotonic() - t0 < 300:
                    assert proc.poll() is None
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            proc.kill()
        kinds.append(kind)
        if before:
            check_after_kill(run_dir, before)
        assert not CK.list_steps(run_dir) or CK.list_steps(run_dir)[-1] < steps, "finished before the kills"
    run(env, args(env, run_dir, "--train.steps", steps))
    assert not saving(run_dir)
    assert_same_checkpoint(checkpoint_state(straight), checkpoint_state(run_dir), WITH_STATE)
    assert logged(run_dir) == logged(straight) and len(logged(run_dir)) == steps
    assert set(kinds) == {"time", "save", "step"}


def test_old_checkpoints_are_deleted_atomically(straight, tmp_path):
    """Garbage collection renames a step to ``<step>.deleting`` before removing it: a kill mid-way
    leaves a directory that is never listed as a checkpoint, and the next collection removes it."""
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    steps = CK.list_steps(run_dir)
    assert len(steps) == 3
    root = CK.checkpoint_dir(run_dir)
    os.replace(root / str(steps[0]), root / f"{steps[0]}.deleting")      # killed while deleting it:
    shutil.rmtree(root / f"{steps[0]}.deleting" / "meta")                # half removed
    assert CK.list_steps(run_dir) == steps[1:]
    for s in steps[1:]:
        CK.restore(run_dir, s)
    ck = CK.Checkpointer(run_dir, keep=1, resume_step=steps[-1])
    ck._collect_garbage()
    assert CK.list_steps(run_dir) == steps[-1:] and sorted(os.listdir(root)) == [str(steps[-1])]
    assert_same_checkpoint(checkpoint_state(straight), checkpoint_state(run_dir), WITH_STATE)
