"""Loading a checkpoint or an export never executes code; hub datasets never run remote code
unless ``data.trust_remote_code`` is set.

* Checkpoints are orbax (tensorstore arrays + JSON), exports are safetensors: restoring,
  resuming and loading them works with every pickle entry point replaced by one that fails.
* ``datasets.load_dataset`` is replaced by a recorder: ``trust_remote_code=True`` is passed
  only when the user set the flag; where the installed ``datasets`` accepts the argument it
  is always passed explicitly (datasets 2.x otherwise defaulted to running dataset scripts).
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from int_lm import checkpoint as CK
from int_lm import config as C
from int_lm.data import sources as S

# Its tests share costly module fixtures: one worker runs them all (pyproject.toml: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_no_code_execution")

ROOT = Path(__file__).resolve().parent.parent


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _forbid_pickle(monkeypatch):
    def no(*a, **k):
        raise AssertionError("pickle used while loading a model")

    class NoUnpickler:
        def __init__(self, *a, **k):
            no()

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, no)
    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    monkeypatch.setattr(pickle, "_Unpickler", NoUnpickler, raising=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("nocode")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(d / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    p = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.toml", "--data.max_docs", "40",
                        "--data.val_tokens", "512", "--data.cache_dir", str(d / "cache"), "--train.steps", "2",
                        "--train.eval_every", "0", "--train.progress", "false", "--train.run_dir", str(d / "run")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return d / "run"


def test_checkpoint_resume_and_export_load_without_pickle(run_dir, tmp_path, monkeypatch):
    out = CK.export_model(run_dir, tmp_path / "m.safetensors")
    _forbid_pickle(monkeypatch)
    r = CK.restore(run_dir)
    assert r.step == 2 and r.states.dtype == np.int8
    cfg = C.apply_values(C.Config(), {"train": {"run_dir": str(run_dir)}}, "test")
    plan = CK.plan_resume(cfg, {"train": {"run_dir": str(run_dir)}})
    assert plan.step == 2
    m = CK.load_model(out)
    assert m.kind == "export" and all(a.dtype == np.int8 for a in CK.flatten(m.params).values())
    assert CK.load_model(run_dir).kind == "checkpoint"


def test_pickled_payloads_are_refused_not_run(run_dir, tmp_path, monkeypatch):
    """A pickle put where a checkpoint or export is expected is refused as damaged, never loaded."""
    payload = pickle.dumps(Boom())
    _forbid_pickle(monkeypatch)
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(payload)
    with pytest.raises(CK.CheckpointError, match="not a readable exported model"):
        CK.load_model(fake)
    # a safetensors file whose JSON header fields carry a pickle
    from safetensors.numpy import save_file
    bad = tmp_path / "bad.safetensors"
    save_file({"embed": np.zeros((2, 2), np.int8)}, str(bad),
              metadata={"format": CK.EXPORT_FORMAT, "step": "1", "config": payload.hex(), "metadata": "{}",
                        "sha256": "{}", "tokenizer": "null"})
    with pytest.raises(CK.CheckpointError, match="damaged"):
        CK.load_model(bad)
    # a checkpoint whose metadata was replaced by a pickle
    import shutil
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / CK.CHECKPOINTS / "2" / "meta" / "metadata").write_bytes(payload)
    with pytest.raises(CK.CheckpointError, match="unreadable metadata"):
        CK.restore(copy)


# ---------------------------------------------------------------------------
# Hub datasets and remote code
# ---------------------------------------------------------------------------

class Recorder:
    def __init__(self, accepts_flag: bool):
        self.calls = []
        rec = self

        if accepts_flag:
            def load_dataset(path, name=None, *, trust_remote_code=None, **kwargs):
                rec.calls.append({"path": path, "trust_remote_code": trust_remote_code, **kwargs})
                return rec.result(kwargs)
        else:
            def load_dataset(path, name=None, **kwargs):
                rec.calls.append({"path": path, **kwargs})
                return rec.result(kwargs)
        self.load_dataset = load_dataset

    @staticmethod
    def result(kwargs):
        rows = [{"text": "hello"}]
        return rows if "split" in kwargs else {"train": rows}


@pytest.mark.parametrize("accepts_flag", [True, False], ids=["datasets-2.x", "datasets-4+"])
@pytest.mark.parametrize("trust", [False, True])
def test_hub_datasets_run_remote_code_only_when_asked(monkeypatch, accepts_flag, trust):
    import datasets
    rec = Recorder(accepts_flag)
    monkeypatch.setattr(datasets, "load_dataset", rec.load_dataset)
    monkeypatch.setattr(S, "hub_reachable", lambda timeout=3.0: True)
    cfg = C.DataConfig(source="someone/corpus", trust_remote_code=trust)
    out = S.open_stream("someone/corpus", cfg)
    assert list(out) == ["train"]
    (call,) = rec.calls
    assert call["path"] == "someone/corpus" and call["streaming"] is True
    if accepts_flag:
        assert call["trust_remote_code"] is trust            # always explicit
    else:
        assert "trust_remote_code" not in call               # datasets >= 4 runs no dataset scripts at all


def test_trust_remote_code_defaults_to_false_through_the_config():
    assert C.Config().data.trust_remote_code is False
    cfg = C.apply_values(C.Config(), {"data": {"trust_remote_code": "true"}}, "the command line")
    assert cfg.data.trust_remote_code is True
    with pytest.raises(C.ConfigError):
        C.apply_values(C.Config(), {"data": {"trust_remote_code": "perhaps"}}, "the command line")


def test_local_structured_files_never_pass_trust_remote_code(monkeypatch, tmp_path):
    import datasets
    rec = Recorder(True)
    monkeypatch.setattr(datasets, "load_dataset", rec.load_dataset)
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "hello"}\n')
    assert list(S._datasets_docs([f], "json", "text")) == [("json:0", "hello")]
    assert rec.calls and not rec.calls[0].get("trust_remote_code")


def test_export_holding_minus_128_is_refused(tmp_path):
    """int8 -128 never arises in training and the CPU workarounds rely on it: a file holding it is refused."""
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open
    from int_lm import checkpoint as CK
    from int_lm.checkpoint.arrays import _digest
    from int_lm import config as C
    from int_lm import model as M
    shape = M.ModelShape(256, 8, 1)
    cfg = C.validate(C.apply_values(C.Config(), {"model": {"layers": 1, "width": 8}}, "test"))
    params = jax_tree_to_numpy(M.init_params(shape, 0))
    good = CK.export_model(CK.LoadedModel(params=params, config=cfg, metadata={}, step=1), tmp_path / "m.safetensors")
    with safe_open(str(good), framework="numpy") as f:
        header = f.metadata()
    flat = load_file(str(good))
    flat["head"][0, 0] = -128
    digests = json.loads(header["sha256"])
    digests["head"] = _digest(flat["head"])   # a consistent file, only the value is out of range
    header["sha256"] = json.dumps(digests)
    save_file(flat, str(tmp_path / "bad.safetensors"), metadata=header)
    with pytest.raises(CK.CheckpointError, match="holds -128"):
        CK.load_model(tmp_path / "bad.safetensors")


def jax_tree_to_numpy(tree):
    import jax
    return jax.tree_util.tree_map(np.asarray, tree)
