import os
import sys

# Tests are CPU-only and must not grab all host memory for XLA.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(__file__))


# ---------------------------------------------------------------------------
# Shared by tests/test_checkpoint.py and tests/test_stopping.py: one environment (JAX's persistent
# compilation cache and the data cache, so each `python train.py` subprocess takes seconds) and
# one uninterrupted reference run at the tiny size that every resumed run must equal bit for bit.
# ---------------------------------------------------------------------------

import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def import_benchmark(name: str):
    """``benchmarks/NAME.py`` as a module (the scripts import their ``common`` as a top-level name)."""
    import importlib
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


# Every array a checkpoint holds, by kind: the int8 weights and member states, the momentum rule's state.
ARRAY_DTYPES = {"params": "int8", "states": "int8", "opt.momentum": "int32", "opt.master": "int16"}


def checkpoint_state(run_dir, step=None) -> dict:
    """A checkpoint as runs are compared: step, cursor, seed and every array it holds (``state_arrays``)."""
    from int_lm import checkpoint as CK
    r = CK.restore(run_dir, step)
    return {"step": r.step, "cursor": r.cursor, "seed": r.seed, "arrays": CK.state_arrays(r)}


def assert_same_checkpoint(a: dict, b: dict, kinds=("params", "states")) -> None:
    """Two :func:`checkpoint_state` results are equal bit for bit; their arrays are exactly of ``kinds``
    (keys of ARRAY_DTYPES, each present), each with its kind's dtype."""
    assert (a["step"], a["cursor"], a["seed"]) == (b["step"], b["cursor"], b["seed"])
    assert set(a["arrays"]) == set(b["arrays"])
    of_kind = {k: next((p for p in kinds if k == p or k.startswith(p + ".")), None) for k in a["arrays"]}
    assert set(of_kind.values()) == set(kinds), of_kind     # no array of another kind, none missing
    for k, kind in of_kind.items():
        assert a["arrays"][k].dtype == b["arrays"][k].dtype == ARRAY_DTYPES[kind], k
        np.testing.assert_array_equal(a["arrays"][k], b["arrays"][k], err_msg=k)


TINY_STEPS, TINY_EVERY = 30, 3       # the reference run: 30 steps, a checkpoint every 3, validation every 4


@pytest.fixture(scope="session")
def tiny_env(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny_env")
    e = dict(os.environ)
    e.update(JAX_PLATFORMS="cpu", XLA_PYTHON_CLIENT_PREALLOCATE="false",
             JAX_COMPILATION_CACHE_DIR=str(base / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             PYTHONUNBUFFERED="1")
    return {"env": e, "cache": str(base / "data_cache")}


# A child started through this prefix has the stop signals at their default disposition, then
# execs ``python ARGS``: a run started under ``nohup`` (SIGHUP ignored) or as ``... &`` from a
# script (SIGINT ignored) keeps those ignored on purpose (int_lm/stopping.py), so tests that
# send them must not depend on how the suite itself was launched.
DEFAULT_SIGNALS = [sys.executable, "-c", "import os, signal, sys\n"
                   "from int_lm.stopping import SIGNALS\n"
                   "for s in SIGNALS:\n"
                   "    signal.signal(s, signal.SIG_DFL)\n"
                   "os.execv(sys.executable, [sys.executable] + sys.argv[1:])"]


def tiny_args(env) -> list[str]:
    """The reference run's settings (the tiny config on 40 stdlib documents)."""
    return ["--config", "configs/tiny.toml", "--data.max_docs", "40", "--data.val_tokens", "512",
            "--data.cache_dir", env["cache"], "--train.checkpoint_every", str(TINY_EVERY), "--train.eval_every", "4"]


@pytest.fixture(scope="session")
def tiny_straight(tiny_env, tmp_path_factory):
    """RUN_DIR of an uninterrupted TINY_STEPS-step run (read it, never write into it: copy it first)."""
    run_dir = tmp_path_factory.mktemp("tiny_straight") / "run"
    p = subprocess.run([sys.executable, "train.py", "--train.run_dir", str(run_dir), *tiny_args(tiny_env),
                        "--train.steps", str(TINY_STEPS)], cwd=ROOT, env=tiny_env["env"], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return run_dir
