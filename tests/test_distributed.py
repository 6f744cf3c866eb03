"""Scale-out: the population over several devices and processes is bit-identical to one device.

End-to-end runs go through ``train.py`` in subprocesses (the device count and
``jax.distributed`` must be set before JAX starts): one single-device reference
run, then the same training on 4 and 2 virtual CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count``) and on two real
processes joined by ``jax.distributed.initialize`` on localhost (gloo CPU
collectives). Weights and recurrent states (from the checkpoints) and every
logged loss/update statistic must match bit for bit.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from int_lm import checkpoint as CK
from int_lm import config as C
from int_lm import distributed as DIST
from int_lm import eggroll as E

# Its tests share costly module fixtures: one worker runs them all (pyproject.toml: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_distributed")

REPO = Path(__file__).resolve().parent.parent
STEPS = 3          # multi-device runs; the reference and the resumed run go on to STEPS + 1
TIMEOUT = 600


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def _env(devices: int | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_"))}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("XLA_FLAGS", None)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _args(cache: Path, run: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "--config", "tiny",
            "--data.max_docs", "40", "--data.cache_dir", str(cache), "--train.run_dir", str(run),
            "--train.steps", str(steps), "--train.eval_every", "1", "--train.checkpoint_every", str(STEPS),
            "--train.keep_checkpoints", "5", "--train.progress", "false", *extra]


def _check(proc: subprocess.CompletedProcess | subprocess.Popen, out: str, what: str) -> None:
    assert proc.returncode == 0, f"{what} failed (rc {proc.returncode}):\n{out[-4000:]}"


def train_subprocess(cache: Path, run: Path, steps: int, *extra: str, devices: int | None = None) -> str:
    proc = subprocess.run(_args(cache, run, steps, *extra), cwd=REPO, env=_env(devices), capture_output=True,
                          text=True, timeout=TIMEOUT)
    _check(proc, proc.stdout + proc.stderr, f"train.py {' '.join(extra)} on {devices or 1} device(s)")
    return proc.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_processes(cache: Path, run: Path, steps: int, n: int = 2, devices: int | None = None,
                    extra: tuple = ()) -> list[str]:
    """``n`` processes of train.py joined through dist.* keys on a free localhost port."""
    port = free_port()
    procs = [subprocess.Popen(_args(cache, run, steps, "--dist.coordinator_address", f"127.0.0.1:{port}",
                                    "--dist.num_processes", str(n), "--dist.process_id", str(i), *extra),
                              cwd=REPO, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for i in range(n)]
    outs = []
    try:
        for i, p in enumerate(procs):
            out, _ = p.communicate(timeout=TIMEOUT)
            outs.append(out)
            _check(p, out, f"process {i} of {n}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


def losses(run: Path, upto: int | None = None) -> list[dict]:
    """The logged history without wall-clock fields: every loss, update statistic and validation."""
    out = []
    for line in (run / "history.jsonl").read_text().splitlines():
        h = json.loads(line)
        if upto is None or h["step"] <= upto:
            out.append({k: v for k, v in h.items() if not k.startswith("perf/") and k != "time_s"})
    return out


def assert_same_state(run: Path, ref: Path, step: int) -> None:
    a, b = CK.restore(run, step), CK.restore(ref, step)
    assert a.cursor == b.cursor
    # weights, member states and the update rule's state (momentum rule: int32 momentum, int16 master)
    fa, fb = CK.state_arrays(a), CK.state_arrays(b)
    assert set(fa) == set(fb)
    for k in fb:
        assert fa[k].dtype == fb[k].dtype and fa[k].tobytes() == fb[k].tobytes(), k


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("dist_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """Single device, single process: STEPS + 1 steps with a checkpoint at STEPS."""
    run = tmp_path_factory.mktemp("dist_ref") / "run"
    out = train_subprocess(cache, run, STEPS + 1)
    assert "cpu x1" in out
    assert CK.list_steps(run) == [STEPS, STEPS + 1]
    return run


# ---------------------------------------------------------------------------
# Exactness of the cross-device vote sum; settings; layout checks
# ---------------------------------------------------------------------------

def _split(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (z >> E.CARRY_BITS).astype(np.int32), (z & ((1 << E.CARRY_BITS) - 1)).astype(np.int32)


@pytest.mark.parametrize("devices", [2, 4, 64, DIST.MAX_DEVICES])
def test_combine_votes_is_the_exact_sum(devices):
    """psum of (hi, lo) then renormalise == the unique (hi, lo) of the exact total, at the lo bound too."""
    rng = np.random.default_rng(devices)
    z = rng.integers(-2 ** 29, 2 ** 29, size=(devices, 5), dtype=np.int64)
    z[:, 0] = (1 << E.CARRY_BITS) - 1           # every low part at its maximum: sum lo = D (2^20 - 1)
    z[:, 1] = -1                                # hi = -1, lo = 2^20 - 1 everywhere
    hi, lo = _split(z)
    acc = {("w",): (jnp.asarray(hi), jnp.asarray(lo))}
    out = jax.vmap(lambda a: DIST.combine_votes(a, "d"), axis_name="d")(acc)
    want_hi, want_lo = _split(z.sum(axis=0))
    for d in (0, devices - 1):                  # every "device" holds the same, exact result
        np.testing.assert_array_equal(np.asarray(out[("w",)][0][d]), want_hi)
        np.testing.assert_array_equal(np.asarray(out[("w",)][1][d]), want_lo)
    assert devices * ((1 << E.CARRY_BITS) - 1) < 2 ** 31


def test_too_many_devices_refused():
    with pytest.raises(DIST.DistributedError, match="at most"):
        DIST.check_split(2 * (DIST.MAX_DEVICES + 1), 2, 0, DIST.MAX_DEVICES + 1)


@pytest.mark.parametrize("population,group,chunk,devices,match", [
    (32, 2, 0, 3, "es.population=32"),
    (32, 8, 0, 8, "es.group_size=8"),
    (48, 2, 16, 2, "es.chunk_size=16"),
])
def test_population_must_split_evenly(population, group, chunk, devices, match):
    with pytest.raises(DIST.DistributedError, match=match):
        DIST.check_split(population, group, chunk, devices)


def test_split_sizes():
    assert DIST.check_split(32, 2, 0, 4) == 8
    assert DIST.check_split(32, 2, 16, 4) == 8       # a chunk larger than the share: one chunk per device
    assert DIST.check_split(64, 4, 8, 2) == 32


def _dist(addr="", n=1, pid=0):
    return SimpleNamespace(coordinator_address=addr, num_processes=n, process_id=pid)


def test_process_settings_sources():
    assert DIST.process_settings(_dist(), {}) is None
    s = DIST.process_settings(_dist("10.0.0.1:1234", 4, 3), {"JAX_NUM_PROCESSES": "8"})
    assert (s.coordinator_address, s.num_processes, s.process_id, s.source) == ("10.0.0.1:1234", 4, 3, "config")
    env = {"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    s = DIST.process_settings(_dist(), env)
    assert (s.coordinator_address, s.num_processes, s.process_id, s.source) == ("h:9", 2, 1, "env")
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
             "SLURM_LOCALID": "0"}
    assert DIST.process_settings(_dist(), slurm).source == "slurm"
    assert DIST.process_settings(_dist(), {**slurm, "SLURM_NTASKS": "1"}) is None   # one task: one process
    assert DIST.process_settings(_dist(), {**env, "JAX_NUM_PROCESSES": "1"}) is None


@pytest.mark.parametrize("dist,env,match", [
    (_dist("", 2, 0), {}, "dist.coordinator_address"),
    (_dist("h:1", 2, 2), {}, "dist.process_id"),
    (_dist(), {"JAX_NUM_PROCESSES": "2"}, "JAX_COORDINATOR_ADDRESS and JAX_PROCESS_ID"),
    (_dist(), {"JAX_NUM_PROCESSES": "two"}, "not an integer"),
])
def test_process_settings_errors(dist, env, match):
    with pytest.raises(DIST.DistributedError, match=match):
        DIST.process_settings(dist, env)


def test_one_device_layout_is_the_plain_path():
    spec = E.EggrollSpec.from_config(C.load_file("tiny"))
    layout = DIST.Layout.create(spec, devices=jax.devices()[:1])
    assert layout.mesh is None and layout.row_range == (0, spec.population // spec.group_size)
    x = np.arange(6, dtype=np.int32).reshape(2, 3)
    assert layout.all_rows(x) is x and layout.local(x) is x
    assert layout.agree_stop(True) is True


# ---------------------------------------------------------------------------
# Several devices, one process
# ---------------------------------------------------------------------------

def test_four_devices_bit_identical(tmp_path, cache, reference):
    run = tmp_path / "run4"
    out = train_subprocess(cache, run, STEPS, devices=4)
    assert "cpu x4 (4 devices over 1 process(es), 8 members per device" in out
    assert_same_state(run, reference, STEPS)
    assert losses(run) == losses(reference, STEPS)


@pytest.mark.slow
def test_two_devices_with_per_device_chunks_bit_identical(tmp_path, cache, reference):
    """2 devices x 16 members, evaluated in chunks of 8 on each device (es.chunk_size applies per device)."""
    run = tmp_path / "run2"
    out = train_subprocess(cache, run, STEPS, "--es.chunk_size", "8", devices=2)
    assert "cpu x2 (2 devices over 1 process(es), 16 members per device" in out
    assert_same_state(run, reference, STEPS)
    assert losses(run) == losses(reference, STEPS)


RANKED_MOMENTUM = ("--es.optimizer", "momentum", "--es.fitness_levels", "7")


@pytest.fixture(scope="module")
def reference_momentum(tmp_path_factory, cache):
    """Single device: the momentum rule with ranked fitness (ranks need every device's scores)."""
    run = tmp_path_factory.mktemp("dist_ref_momentum") / "run"
    train_subprocess(cache, run, STEPS, *RANKED_MOMENTUM)
    assert CK.restore(run, STEPS).opt_state
    return run


def test_four_devices_bit_identical_with_momentum_and_ranked_fitness(tmp_path, cache, reference_momentum):
    run = tmp_path / "run4m"
    train_subprocess(cache, run, STEPS, *RANKED_MOMENTUM, devices=4)
    assert_same_state(run, reference_momentum, STEPS)
    assert losses(run) == losses(reference_momentum)


@pytest.mark.slow
def test_two_processes_bit_identical_with_momentum_and_ranked_fitness(tmp_path, cache, reference_momentum):
    run = tmp_path / "run2pm"
    train_processes(cache, run, STEPS, extra=RANKED_MOMENTUM)
    assert_same_state(run, reference_momentum, STEPS)
    assert losses(run) == losses(reference_momentum)


# ---------------------------------------------------------------------------
# Two real processes on localhost
# ---------------------------------------------------------------------------

def test_two_processes_bit_identical_written_once_resumable_on_one(tmp_path, cache, reference):
    run = tmp_path / "run2p"
    outs = train_processes(cache, run, STEPS)
    assert "int_lm: done" in outs[0] and "int_lm: done" not in outs[1]       # process 0 logs
    assert_same_state(run, reference, STEPS)
    assert losses(run) == losses(reference, STEPS)
    # Written once: one history line per step, one TensorBoard file, arrays from process 0 only.
    assert [h["step"] for h in losses(run)] == list(range(1, STEPS + 1))
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1
    written = sorted(p.name for p in (CK.checkpoint_dir(run) / str(STEPS) / "state").glob("ocdbt.process_*"))
    assert written == ["ocdbt.process_0"]
    assert CK.list_steps(run) == [STEPS]
    # Resumed by one process: continues exactly like the single-process run.
    out = train_subprocess(cache, run, STEPS + 1)
    assert f"resuming {run} from checkpoint step {STEPS}" in out
    assert_same_state(run, reference, STEPS + 1)
    assert losses(run) == losses(reference)


@pytest.mark.slow
def test_two_processes_of_two_devices_resume_a_single_device_checkpoint(tmp_path, cache, reference):
    """4 devices over 2 processes, resumed from the one-device run's checkpoint at STEPS: identical."""
    import shutil
    run = tmp_path / "run2x2"
    shutil.copytree(reference, run)
    shutil.rmtree(CK.checkpoint_dir(run) / str(STEPS + 1))
    outs = train_processes(cache, run, STEPS + 1, devices=2)
    assert "4 devices over 2 process(es), 8 members per device" in outs[0]
    assert_same_state(run, reference, STEPS + 1)
    assert losses(run) == losses(reference)


def test_joining_after_jax_started_is_refused():
    jax.devices()   # the backend is up
    assert DIST.initialize(_dist(), environ={}) is False
    with pytest.raises(DIST.DistributedError, match="before JAX starts"):
        DIST.initialize(_dist("127.0.0.1:1", 2, 1), environ={})
