"""Text samples at each evaluation, and run files and exports others can read.

The trainer's sample (train.sample_tokens) must leave training bit-identical, land in
TensorBoard's text tab (read back here with TensorBoard's own reader), in samples.jsonl
(history.jsonl refers to it by step only) and in the log when there is no progress bar;
a resume cuts samples.jsonl back like history.jsonl; a failed write only warns. Exports
and run files get the mode a new file gets under the umask (0644 under 022), not 0600.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from int_lm import checkpoint as CK
from int_lm import config as C
from int_lm import generate as G
from int_lm import model as M
from int_lm.trainer import SAMPLE_TAG, train

# Its tests share costly module fixtures: one worker runs them all (pyproject.toml: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_samples")

STEPS, EVERY, NEW = 6, 3, 40


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny run without samples and with them (its log kept)."""
    base = tmp_path_factory.mktemp("samples")
    out = {}
    for name, tokens in (("off", 0), ("on", NEW)):
        cfg = C.validate(C.apply_values(C.load_file("tiny"), {
            "data": {"max_docs": 40, "val_tokens": 512, "cache_dir": str(base / "cache")},
            "train": {"run_dir": str(base / name), "steps": STEPS, "eval_every": EVERY, "checkpoint_every": 0,
                      "progress": False, "sample_tokens": tokens}}, "test"))
        log: list[str] = []
        compiled = G._generate._cache_size()
        summary = train(cfg, log=lambda *a: log.append(" ".join(map(str, a))))
        out[name] = {"dir": base / name, "summary": summary, "log": log,
                     "compiled": G._generate._cache_size() - compiled}
    return out


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sampling_leaves_training_bit_identical(runs):
    off, on = runs["off"]["summary"], runs["on"]["summary"]
    keep = ("train/", "update/", "val/")
    assert [{k: v for k, v in h.items() if k.startswith(keep) or k == "step"} for h in off["history"]] == \
           [{k: v for k, v in h.items() if k.startswith(keep) or k == "step"} for h in on["history"]]
    for a, b in zip(jax.tree_util.tree_leaves(off["state"].params), jax.tree_util.tree_leaves(on["state"].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not (runs["off"]["dir"] / "samples.jsonl").exists()
    assert not any(l.startswith("sample at step") for l in runs["off"]["log"])


def test_samples_reach_tensorboard_samples_jsonl_and_the_log(runs):
    run = runs["on"]
    samples = read_jsonl(run["dir"] / "samples.jsonl")
    assert [s["step"] for s in samples] == list(range(EVERY, STEPS + 1, EVERY))
    assert len({s["prompt"] for s in samples}) == 1 and samples[0]["prompt"]      # a fixed prompt
    assert all(s["text"] for s in samples)
    # history.jsonl refers to samples by step only; the eval steps carry the sample's cost
    history = read_jsonl(run["dir"] / "history.jsonl")
    assert all(SAMPLE_TAG not in h and "text" not in h for h in history)
    assert [h["step"] for h in history if "perf/sample_s" in h] == [s["step"] for s in samples]
    assert run["compiled"] <= 1                                    # fixed shapes: compiled once at most
    # TensorBoard's text tab: read back with TensorBoard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run["dir"] / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    assert SAMPLE_TAG in acc.Tags()["tensors"]
    events = acc.Tensors(SAMPLE_TAG)
    assert [e.step for e in events] == [s["step"] for s in samples]
    assert acc.SummaryMetadata(SAMPLE_TAG).plugin_data.plugin_name == "text"
    for event, sample in zip(events, samples):
        shown = event.tensor_proto.string_val[0].decode()
        assert "\n".join("    " + line for line in sample["text"].split("\n")) in shown
        assert "\n".join("    " + line for line in sample["prompt"].split("\n")) in shown
    # one line in the log per sample (no progress bar)
    lines = [l for l in run["log"] if l.startswith("sample at step")]
    assert [l.split(":")[0] for l in lines] == [f"sample at step {s['step']}" for s in samples]
    assert all("\n" not in l for l in lines)


def test_the_prompt_starts_a_line_and_the_sample_is_seeded(runs):
    decode = lambda ids: bytes(int(i) for i in ids)                          # noqa: E731
    tokens = np.frombuffer(b"half a line\nWhole line one.\nAnd two.\x00next document", np.uint8)
    assert decode(G.line_start_prompt(tokens, 0, decode)) == b"Whole line one.\nAnd two."  # cut at a document end
    assert decode(G.line_start_prompt(tokens[:8], 0, decode)) == b"half a l"      # no line end: from the start
    # The last sample (after the last step) again from the final weights: the same text.
    run = runs["on"]
    last = read_jsonl(run["dir"] / "samples.jsonl")[-1]
    shape = M.ModelShape.from_config(C.load_file("tiny").model)          # bytes: V = 256, boundary 0
    sampler = G.FixedPromptSampler(shape, tuple(last["prompt"].encode()), decode, NEW)
    assert sampler.prompt == last["prompt"]
    assert sampler(run["summary"]["state"].params) == last["text"]


def test_resume_cuts_samples_back_and_a_failed_write_only_warns(tmp_path, capsys):
    run_dir = tmp_path / "run"
    ck = CK.Checkpointer(run_dir, 3)
    history = [{"step": s} for s in range(1, 10)]
    ck.append_history(history)
    for s in (3, 6, 9):
        ck.append_sample({"step": s, "prompt": "p", "text": f"t{s}"})
    resumed = CK.Checkpointer(run_dir, 3, resume_step=6)
    assert [h["step"] for h in resumed.history_until(6)] == list(range(1, 7))
    assert [s["step"] for s in read_jsonl(run_dir / "samples.jsonl")] == [3, 6]    # no orphan step 9
    CK.Checkpointer(run_dir, 3)                                                     # a fresh run: fresh samples
    assert (run_dir / "samples.jsonl").read_text() == ""
    (run_dir / "samples.jsonl").unlink()
    (run_dir / "samples.jsonl").mkdir()                                             # cannot be written
    capsys.readouterr()
    ck.append_sample({"step": 1, "prompt": "p", "text": "t"})
    ck.append_sample({"step": 2, "prompt": "p", "text": "t"})
    err = capsys.readouterr().err
    assert err.count("warning: cannot append to") == 1 and "training goes on" in err


def test_run_files_get_the_umask_mode(runs):
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("config.toml", "metadata.json", "history.jsonl", "samples.jsonl"):
        assert (runs["on"]["dir"] / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert not list(runs["on"]["dir"].glob("*.tmp"))
    meta = json.loads((runs["on"]["dir"] / "metadata.json").read_text())
    assert {"model", "arch", "flags"} <= set(meta["cpu"])                           # the CPU flags recorded


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_export_mode_follows_the_umask(tmp_path, umask, mode):
    cfg = C.validate(C.apply_values(C.Config(), {"model": {"width": 32, "layers": 1}}, "test"))
    shape = M.ModelShape.from_config(cfg.model)
    params = jax.tree_util.tree_map(np.asarray, M.init_params(shape, 0))
    loaded = CK.LoadedModel(params=params, config=cfg, metadata={}, step=3)
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"an older file")
    os.chmod(out, 0o600)
    old = os.umask(umask)
    try:
        CK.export_model(loaded, out)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == mode
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]               # atomic: no temporary left
    again = CK.load_model(out)
    assert again.step == 3
    np.testing.assert_array_equal(again.params["embed"], params["embed"])
