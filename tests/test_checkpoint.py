"""Checkpoints: exact resume (plain, after SIGINT, after SIGKILL), refusals, corruption, export.

Training runs go through the real entry point (``python train.py``) in
subprocesses at the tiny size (configs/tiny.toml, 40 stdlib documents). A
straight run of STEPS steps (tests/conftest.py, shared with tests/test_stopping.py)
is the reference every resumed run must equal bit for bit: int8 weights, every
member's recurrent state, the data cursor, and every logged train/update metric.
JAX's persistent compilation cache (one per test session) keeps each subprocess
to a few seconds.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from int_lm import checkpoint as CK
from int_lm import config as C
from int_lm import data as D
from int_lm.errors import UserError

import reference as ref
from conftest import DEFAULT_SIGNALS, TINY_EVERY, TINY_STEPS, assert_same_checkpoint, checkpoint_state, tiny_args

# Its tests share costly module fixtures: one worker runs them all (pyproject.toml: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_checkpoint")

ROOT = Path(__file__).resolve().parent.parent
STEPS = TINY_STEPS  # the straight reference run (30 steps); checkpoints every 3 steps, keep 3
EVERY = TINY_EVERY


@pytest.fixture(scope="module")
def env(tiny_env):
    return tiny_env          # tests/conftest.py: shared with tests/test_stopping.py


def base_args(env) -> list[str]:
    return tiny_args(env)


def train_cmd(run_dir, *args) -> list[str]:
    return [sys.executable, "train.py", "--train.run_dir", str(run_dir), *map(str, args)]


def run(cmd, env, expect=0, timeout=600) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=ROOT, env=env["env"], capture_output=True, text=True, timeout=timeout)
    assert p.returncode == expect, f"exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    return p


def start(cmd, env, log: Path) -> subprocess.Popen:
    """``python ARGS`` (cmd[0] is sys.executable) with the stop signals at their defaults (conftest)."""
    f = open(log, "w")
    return subprocess.Popen(DEFAULT_SIGNALS + cmd[1:], cwd=ROOT, env=env["env"], stdout=f, stderr=subprocess.STDOUT)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout=300) -> None:
    t0 = time.monotonic()
    while not any(s >= step for s in CK.list_steps(run_dir)):
        assert proc.poll() is None, f"training exited early ({proc.returncode})"
        assert time.monotonic() - t0 < timeout, "no checkpoint appeared"
        time.sleep(0.02)


def logged(run_dir) -> list[dict]:
    """Every logged train/update metric per step (val only appears on eval steps; timings vary)."""
    lines = (Path(run_dir) / "history.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(l).items() if k == "step" or k.startswith(("train/", "update/"))}
            for l in lines]


def assert_same_history(a, b) -> None:
    ha, hb = logged(a), logged(b)
    assert [h["step"] for h in hb] == list(range(1, STEPS + 1))
    assert ha == hb


@pytest.fixture(scope="module")
def straight(tiny_straight):
    """The reference: STEPS steps through train.py with base_args (tests/conftest.py, shared)."""
    assert CK.list_steps(tiny_straight) == [STEPS - 2 * EVERY, STEPS - EVERY, STEPS]   # keep_checkpoints = 3
    return tiny_straight


# ---------------------------------------------------------------------------
# Exact resume
# ---------------------------------------------------------------------------

def test_stop_and_resume_is_bit_exact(env, straight, tmp_path):
    run_dir = tmp_path / "run"
    run(train_cmd(run_dir, *base_args(env), "--train.steps", 14), env)
    assert CK.list_steps(run_dir) == [9, 12, 14]                   # every 3 steps and at the end
    p = run(train_cmd(run_dir, "--train.steps", STEPS), env)        # saved config wins; steps may change
    assert f"resuming {run_dir} from checkpoint step 14" in p.stdout
    assert "train.steps 14 -> 30" in p.stdout
    assert_same_checkpoint(checkpoint_state(straight), checkpoint_state(run_dir))
    assert_same_history(straight, run_dir)
    log = [json.loads(l) for l in (run_dir / CK.RESUME_LOG).read_text().splitlines()]
    assert log[-1]["resumed_from_step"] == 14 and log[-1]["changes"] == {"train.steps": [14, 30]}
    assert (run_dir / "config.toml").read_text().count("steps = 30") == 1


def test_sigint_mid_step_then_sigkill_then_resume(env, straight, tmp_path):
    """Ctrl-C during a step saves that step; SIGKILL loses only the steps since the last checkpoint."""
    run_dir = tmp_path / "run"
    proc = start(train_cmd(run_dir, *base_args(env), "--train.steps", 1000), env, tmp_path / "log1")
    try:
        wait_for_step(run_dir, EVERY, proc)      # step EVERY + 1 is being computed now
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=300) == 128 + signal.SIGINT
    finally:
        proc.kill()
    out = (tmp_path / "log1").read_text()
    assert "stopping after this step" in out and "(stopped by SIGINT)" in out
    stopped = CK.list_steps(run_dir)[-1]                # the final save on Ctrl-C
    assert EVERY <= stopped < STEPS - 2 * EVERY, out

    proc = start(train_cmd(run_dir), env, tmp_path / "log2")   # resumes, still aiming at 1000 steps
    try:
        wait_for_step(run_dir, stopped + EVERY, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert f"from checkpoint step {stopped}" in (tmp_path / "log2").read_text()
    last = CK.list_steps(run_dir)[-1]
    assert stopped < last < STEPS and last % EVERY == 0

    p = run(train_cmd(run_dir, "--train.steps", STEPS), env)
    assert f"from checkpoint step {last}" in p.stdout
    assert not list((run_dir / CK.CHECKPOINTS).glob("*tmp*"))     # a half-written save is not kept
    assert_same_checkpoint(checkpoint_state(straight), checkpoint_state(run_dir))
    assert_same_history(straight, run_dir)
    log = [json.loads(l)["resumed_from_step"] for l in (run_dir / CK.RESUME_LOG).read_text().splitlines()]
    assert log == [stopped, last]


# ---------------------------------------------------------------------------
# What a resume may change
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, words", [
    ("model.width", "64", "model's shape"),
    ("model.layers", "2", "model's shape"),
    ("data.tokenizer", "cl100k_base", "tokenizer"),
    ("data.bpe_merges", "300", "tokenizer"),
    ("data.source", "/some/other/corpus", "training data"),
    ("data.max_docs", "50", "training data"),
    ("es.population", "64", "population"),
    ("es.group_size", "4", "population"),
    ("es.rank", "2", "population"),
    ("es.tokens_per_update", "16", "population"),
    ("es.sigma_shift", "5", "noise"),
    ("train.seed", "1", "noise"),
    ("model.head_init_std", "4", "initial weights"),
    ("model.embed_init_std", "4", "initial weights"),
])
def test_resume_refuses_identity_changes(straight, key, value, words):
    section, name = key.split(".")
    cfg = C.load_file(ROOT / "configs" / "tiny.toml")
    cfg = C.apply_values(cfg, {"train": {"run_dir": str(straight)}}, "test")
    with pytest.raises(CK.CheckpointError) as err:
        asked = {"train": {"run_dir": str(straight)}}
        asked.setdefault(section, {})[name] = value
        CK.plan_resume(cfg, asked)
    msg = str(err.value)
    assert f"cannot change {key}" in msg and words in msg and "--train.run_dir" in msg


def test_resume_allows_and_records_schedule_changes(straight):
    asked = {"train": {"run_dir": str(straight), "steps": "50", "eval_every": "7", "checkpoint_every": "9"},
             "es": {"alpha_horizon": "200", "chunk_size": "8"},
             "model": {"width": "32"}}            # equal to the saved value: not a change
    plan = CK.plan_resume(C.apply_values(C.Config(), asked, "the command line"), asked)
    assert plan.step == STEPS
    assert plan.changes == {"train.steps": (STEPS, 50), "train.eval_every": (4, 7),
                            "train.checkpoint_every": (3, 9), "es.alpha_horizon": (100, 200),
                            "es.chunk_size": (0, 8)}
    assert plan.config.model.width == 32 and plan.config.es.population == 32   # the saved config wins
    # programmatic use: the whole config is "asked"; identity keys must match the checkpoint
    saved = CK.restore(straight).config
    ok = CK.plan_resume(C.apply_values(saved, {"train": {"steps": "40"}}, "test"), None)
    assert ok.changes == {"train.steps": (STEPS, 40)}
    with pytest.raises(CK.CheckpointError, match="es.population"):
        CK.plan_resume(C.apply_values(saved, {"es": {"population": "64"}}, "test"), None)


def test_cli_refusal_is_one_line_and_touches_nothing(env, straight):
    before = sorted(p.relative_to(straight) for p in straight.rglob("*"))
    p = run(train_cmd(straight, "--model.width", "64"), env, expect=2)
    assert p.stderr.startswith("error: cannot change model.width") and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert sorted(q.relative_to(straight) for q in straight.rglob("*")) == before


def test_resume_from_missing_step_is_refused(straight, tmp_path):
    cfg = C.apply_values(C.Config(), {"train": {"run_dir": str(straight), "resume_from": "5"}}, "test")
    with pytest.raises(CK.CheckpointError, match="available: 24, 27, 30"):
        CK.plan_resume(cfg, {"train": {"resume_from": "5"}})
    cfg = C.apply_values(C.Config(), {"train": {"run_dir": str(tmp_path), "resume_from": "5"}}, "test")
    with pytest.raises(CK.CheckpointError, match="no checkpoints"):
        CK.plan_resume(cfg, {})


# ---------------------------------------------------------------------------
# Corrupt or truncated checkpoints
# ---------------------------------------------------------------------------

def _biggest_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _damage(step_dir: Path, how: str) -> None:
    if how == "truncate":
        f = _biggest_file(step_dir)
        os.truncate(f, f.stat().st_size // 2)
    elif how == "flip":
        f = _biggest_file(step_dir)
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0xFF
        f.write_bytes(b)
    elif how == "meta":
        f = step_dir / "meta" / "metadata"
        os.truncate(f, f.stat().st_size // 3)
    elif how == "manifest":
        (step_dir / "state" / "manifest.ocdbt").unlink()


@pytest.mark.parametrize("how", ["truncate", "flip", "meta", "manifest"])
def test_damaged_checkpoint_is_refused_clearly(straight, tmp_path, how):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    _damage(run_dir / CK.CHECKPOINTS / str(STEPS), how)
    with pytest.raises(CK.CheckpointError) as err:
        CK.load_model(run_dir)
    msg = str(err.value)
    assert f"checkpoint step {STEPS}" in msg and ("corrupted" in msg or "truncated" in msg)
    assert f"--train.resume_from {STEPS - EVERY}" in msg and "nothing was deleted" in msg
    assert CK.list_steps(run_dir) == CK.list_steps(straight)            # a failed restore deletes nothing
    assert CK.load_model(run_dir, step=STEPS - EVERY).step == STEPS - EVERY


def test_corrupt_latest_refused_then_explicit_fallback(env, straight, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    _damage(run_dir / CK.CHECKPOINTS / str(STEPS), "truncate")
    p = run(train_cmd(run_dir), env, expect=2)
    assert p.stderr.startswith(f"error: checkpoint step {STEPS}") and "Traceback" not in p.stderr
    assert f"--train.resume_from {STEPS - EVERY}" in p.stderr
    assert CK.list_steps(run_dir)[-1] == STEPS                           # still there
    p = run(train_cmd(run_dir, "--train.resume_from", STEPS - EVERY), env)
    assert f"from checkpoint step {STEPS - EVERY}" in p.stdout
    moved = list((run_dir / CK.SUPERSEDED).glob(f"*/{STEPS}"))
    assert len(moved) == 1                                               # moved aside, not deleted
    assert_same_checkpoint(checkpoint_state(straight), checkpoint_state(run_dir))        # retrained bit-exactly
    assert_same_history(straight, run_dir)


@pytest.fixture
def small_checkpoint_disk(tmp_path):
    """RUN_DIR/checkpoints on a 400 KB tmpfs, so only checkpoint saves hit ENOSPC (needs root and mount)."""
    run_dir = tmp_path / "run"
    mnt = run_dir / CK.CHECKPOINTS
    mnt.mkdir(parents=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield run_dir
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_during_save_keeps_checkpoints_then_resumes(env, straight, small_checkpoint_disk):
    run_dir = small_checkpoint_disk
    p = run(train_cmd(run_dir, *base_args(env), "--train.steps", 60, "--train.keep_checkpoints", 100), env,
            expect=2)
    assert p.stderr.startswith("error: saving the checkpoint at step") and "no space left on device" in p.stderr, \
        p.stderr
    assert "earlier checkpoints are kept" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    kept = CK.list_steps(run_dir)
    assert kept and kept == list(range(EVERY, kept[-1] + 1, EVERY)) and kept[-1] < STEPS
    for s in kept:                                   # every committed checkpoint still restores
        CK.restore(run_dir, s)
    subprocess.run(["mount", "-o", "remount,size=8m", str(run_dir / CK.CHECKPOINTS)], check=True)  # free space
    p = run(train_cmd(run_dir, "--train.steps", STEPS), env)
    assert f"from checkpoint step {kept[-1]}" in p.stdout
    assert not list((run_dir / CK.CHECKPOINTS).glob("*tmp*"))     # the half-written save was cleaned up
    assert_same_checkpoint(checkpoint_state(straight), checkpoint_state(run_dir))
    assert_same_history(straight, run_dir)


def test_restore_asserts_int8(straight, tmp_path):
    """A checkpoint holding a non-int8 array is refused, never cast."""
    import orbax.checkpoint as ocp
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    good = CK.restore(run_dir)
    meta = CK.read_meta(run_dir, STEPS)
    meta["step"] = STEPS + 1
    tree = {"params": good.params, "states": good.states.astype(np.int16)}
    mngr = ocp.CheckpointManager((run_dir / CK.CHECKPOINTS).resolve(), item_names=("state", "meta"),
                                 options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
    mngr.save(STEPS + 1, args=ocp.args.Composite(state=ocp.args.PyTreeSave(tree), meta=ocp.args.JsonSave(meta)))
    mngr.close()
    with pytest.raises(CK.CheckpointError, match="states has dtype int16, expected int8"):
        CK.restore(run_dir)


def test_checkpoint_records_no_device_placement(straight):
    """Host NumPy arrays in, host NumPy arrays out: a GPU-saved checkpoint restores on a CPU and back."""
    tree = json.loads((straight / CK.CHECKPOINTS / str(STEPS) / "state" / "_METADATA").read_text())
    values = [v["value_metadata"] for v in tree["tree_metadata"].values()]
    assert values and all(v["value_type"] == "np.ndarray" for v in values)
    assert "sharding" not in json.dumps(tree).lower()
    r = CK.restore(straight)
    assert all(type(a) is np.ndarray for a in CK.flatten({"p": r.params, "s": r.states}).values())


class _FakeState:
    def __init__(self, step):
        self.step, self.cursor, self.seed = step, {"step": step}, 0
        self.params = {"w": np.full((4, 4), step, np.int8)}
        self.states = np.zeros((1, 2, 4), np.int8)


def test_failed_save_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    ck = CK.Checkpointer(tmp_path, keep=2)
    for s in (1, 2, 3):
        ck.save(_FakeState(s), {"config": {}})
    ck._wait()
    assert CK.list_steps(tmp_path) == [2, 3]

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck._manager(), "save", disk_full)
    with pytest.raises(CK.CheckpointError, match="earlier checkpoints are kept"):
        ck.save(_FakeState(4), {"config": {}})
    ck.close()
    assert CK.list_steps(tmp_path) == [2, 3]
    with pytest.raises(CK.CheckpointError, match="int8 only"):
        bad = _FakeState(5)
        bad.states = bad.states.astype(np.float32)
        CK.Checkpointer(tmp_path, keep=2).save(bad, {})


# ---------------------------------------------------------------------------
# Load and export
# ---------------------------------------------------------------------------

def _validation_bpb_by_reference(params: dict, cfg: C.Config) -> float:
    """The trainer's validation slice (same rows/length rule), run through tests/reference.py.

    Scored the way ``trainer.make_validator`` scores it: exact float64 bits from
    the integer logits if it uses ``intmath.bits_per_token_f64``, else the
    integer log-likelihood.
    """
    import inspect
    from int_lm import intmath, trainer
    tok = D.make_tokenizer(cfg.data)
    corpus = D.load_corpus(cfg.data, tok, progress=False)
    val = corpus.split("validation")
    rows = max(1, min(16, cfg.data.val_tokens // 256))
    length = max(1, min(cfg.data.val_tokens // rows, (len(val) - 1) // rows))
    block = D.eval_slice(val, rows, length)
    num_bytes = D.eval_slice_bytes(val, rows, length)
    r = ref.Reference(params, cfg.model.boundary_token)
    outs = [r.run(row[:-1], row[1:]) for row in block]
    if "bits_per_token_f64" in inspect.getsource(trainer.make_validator):
        logits = np.stack([o[1] for o in outs])
        return float(intmath.bits_per_token_f64(logits, block[:, 1:]).sum()) / num_bytes
    return -sum(int(o[0].sum()) for o in outs) / 16.0 / num_bytes


def test_export_reproduces_validation_bpb_through_numpy_reference(env, straight, tmp_path, monkeypatch):
    out = tmp_path / "model.safetensors"
    p = run([sys.executable, "-m", "int_lm.checkpoint", "export", str(straight), str(out)], env)
    assert f"exported step {STEPS}" in p.stdout

    # plain NumPy through safetensors: int8 arrays and a JSON header, no int_lm code involved
    from safetensors import safe_open
    from safetensors.numpy import load_file
    arrays = load_file(str(out))
    with safe_open(str(out), framework="numpy") as f:
        header = f.metadata()
    assert header["format"] == CK.EXPORT_FORMAT and int(header["step"]) == STEPS
    assert json.loads(header["tokenizer"])["name"] == "bytes"
    config = json.loads(header["config"])
    assert config["model"]["width"] == 32
    assert all(a.dtype == np.int8 for a in arrays.values())
    params = {"layers": {}}
    for name, a in arrays.items():
        if name.startswith("layers."):
            params["layers"][name[len("layers."):]] = a
        else:
            params[name] = a

    # loading never unpickles anything
    def no_pickle(*a, **k):
        raise AssertionError("pickle used while loading")
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    from_run, from_file = CK.load_model(straight), CK.load_model(out)
    monkeypatch.undo()
    assert from_file.kind == "export" and from_file.step == from_run.step == STEPS
    assert from_file.config == from_run.config
    assert from_file.metadata["tokenizer"] == from_run.metadata["tokenizer"]
    assert from_file.metadata["corpus"]["fingerprint"] == from_run.metadata["corpus"]["fingerprint"]
    for k, v in CK.flatten(from_run.params).items():
        np.testing.assert_array_equal(CK.flatten(from_file.params)[k], v)
        np.testing.assert_array_equal(arrays[k], v)

    logged_val = [json.loads(l) for l in (straight / "history.jsonl").read_text().splitlines()][-1]
    assert logged_val["step"] == STEPS
    assert _validation_bpb_by_reference(params, C.from_dict(config)) == logged_val["val/bits_per_byte"]


def test_load_model_rejects_non_models(tmp_path):
    with pytest.raises(CK.CheckpointError, match="does not exist"):
        CK.load_model(tmp_path / "nope")
    with pytest.raises(CK.CheckpointError, match="no checkpoints"):
        CK.load_model(tmp_path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(CK.CheckpointError, match="not a readable exported model"):
        CK.load_model(junk)
    assert issubclass(CK.CheckpointError, UserError)
