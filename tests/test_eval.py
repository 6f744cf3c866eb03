"""eval.py / int_lm.evaluate: exact bits against the NumPy reference, CLI, refusals, TensorBoard."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from int_lm import config as C
from int_lm import data as D
from int_lm import evaluate as EV
from int_lm import intmath as im
from int_lm import model as M
from int_lm.data.batches import eval_cuts
from int_lm.errors import UserError
from reference import Reference

# Its tests share costly module fixtures: one worker runs them all (pyproject.toml: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_eval")

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(tmp: Path, **train) -> C.Config:
    cfg = C.load_file(ROOT / "configs" / "tiny.toml")
    values = {"data": {"max_docs": 20, "cache_dir": str(tmp / "cache")},
              "train": {"run_dir": str(tmp / "run"), "steps": 3, "eval_every": 3, "checkpoint_every": 3,
                        "progress": False, **train}}
    return C.validate(C.apply_values(cfg, values, "test"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for 3 steps, with a real run directory (checkpoint) on disk."""
    from int_lm.trainer import train

    tmp = tmp_path_factory.mktemp("evalrun")
    cfg = tiny_config(tmp)
    train(cfg, log=lambda *a, **k: None)
    from int_lm.checkpoint import load_model

    loaded = load_model(cfg.train.run_dir)
    tok = D.make_tokenizer(loaded.config.data)
    corpus = D.load_corpus(loaded.config.data, tok, progress=False)
    return {"tmp": tmp, "cfg": cfg, "loaded": loaded, "tok": tok, "corpus": corpus,
            "shape": M.ModelShape.from_config(loaded.config.model)}


def reference_bits(ref: Reference, inputs, targets):
    """Exact float64 bits (written independently from the logits) and integer ll of one sequence."""
    ll, logits, _ = ref.run(inputs, targets)
    z = logits.astype(np.float64) / 16.0
    zmax = z.max(axis=1)
    lse = zmax + np.log2(np.exp2(z - zmax[:, None]).sum(axis=1))
    bits = lse - z[np.arange(len(targets)), np.asarray(targets)]
    return float(bits.sum()), int(ll.sum())


@pytest.mark.parametrize("rows", [1, 3])
def test_eval_equals_numpy_reference(trained, rows):
    split = trained["corpus"].split("validation")
    loaded, shape = trained["loaded"], trained["shape"]
    m = 700
    res = EV.evaluate_split(loaded.params, shape, split, max_tokens=m, rows=rows, length=64)
    ext = np.concatenate([[shape.boundary_token], np.asarray(split.tokens[:m])]).astype(np.int64)
    ref = Reference({k: v for k, v in loaded.params.items()}, shape.boundary_token)
    bits, ll = 0.0, 0
    cuts = eval_cuts(split, rows, m)
    for a, b in zip(cuts[:-1], cuts[1:]):  # row i: inputs ext[a:b], targets ext[a+1:b+1], fresh state
        rb, rl = reference_bits(ref, ext[a:b], ext[a + 1:b + 1])
        bits += rb
        ll += rl
    assert res.tokens == m
    assert res.bytes == split.bytes_between(0, m)
    assert res.integer_bits == -ll / 16.0          # the integer estimate is bit-exact
    assert res.bits == pytest.approx(bits, rel=1e-12)


def test_block_length_and_layout_do_not_change_a_single_row(trained):
    split = trained["corpus"].split("validation")
    loaded, shape = trained["loaded"], trained["shape"]
    a = EV.evaluate_split(loaded.params, shape, split, max_tokens=500, rows=1, length=7)
    b = EV.evaluate_split(loaded.params, shape, split, max_tokens=500, rows=1, length=500)
    assert a.blocks == 72 and b.blocks == 1
    assert (a.bits, a.integer_bits, a.tokens, a.bytes) == pytest.approx((b.bits, b.integer_bits, b.tokens, b.bytes),
                                                                        rel=1e-13)


@pytest.mark.parametrize("vocab", [5, 256, 4099])
def test_exact_stats_equal_float64_bits(vocab):
    rng = np.random.default_rng(vocab)
    logits = rng.integers(-127, 128, (64, vocab)).astype(np.int8)
    logits[0] = 127
    logits[1] = -127
    logits[2, ::2] = 127
    targets = rng.integers(0, vocab, 64)
    y_t, s = EV.exact_stats(logits, targets)
    got = EV.exact_bits(np.asarray(y_t), np.asarray(s))
    np.testing.assert_allclose(got, im.bits_per_token_f64(logits, targets), rtol=1e-13, atol=1e-12)


def test_exact_stats_do_not_overflow_at_the_largest_vocabulary():
    logits = np.full((1, C.MAX_VOCAB), 127, np.int8)
    _, s = EV.exact_stats(logits, np.zeros(1, np.int64))
    assert int(np.asarray(s)[0, 15]) == C.MAX_VOCAB * 2**15 == 2**31
    assert EV.exact_bits(np.array([255]), np.asarray(s))[0] == pytest.approx(16.0, abs=1e-12)


def test_tokens_for_bytes_is_the_smallest_covering_prefix(trained):
    split = trained["corpus"].split("test")
    for want in (1, 10, 999, 5000):
        m = EV.tokens_for_bytes(split, want)
        assert split.bytes_between(0, m) >= want > split.bytes_between(0, m - 1)
    assert EV.tokens_for_bytes(split, split.num_bytes + 5) == len(split)


def test_evaluate_report_transfer_and_prefix_baselines(trained, tmp_path):
    loaded = trained["loaded"]
    text = ("The quick brown fox jumps over the lazy dog. " * 40 + "\n") * 6
    (tmp_path / "other.txt").write_text(text)
    data_cfg = dataclasses.replace(loaded.config.data, source=str(tmp_path / "other.txt"), max_docs=0,
                                   cache_dir=str(trained["tmp"] / "cache"))
    rep = EV.evaluate(loaded, data_cfg, split="validation", max_bytes=300)
    assert rep["transfer"] is True and rep["prefix"] is True
    assert rep["bytes"] >= 300 and rep["tokens"] == EV.tokens_for_bytes(
        D.load_corpus(data_cfg, trained["tok"], progress=False).split("validation"), 300)
    assert {"unigram", "bigram", "compressor"} <= set(rep["baselines"])
    assert rep["perplexity"] == pytest.approx(2 ** rep["bits_per_token"])
    own = EV.evaluate(loaded, loaded.config.data, split="validation")
    assert own["transfer"] is False and own["prefix"] is False
    whole = D.baselines(trained["corpus"], trained["tok"])
    assert own["baselines"]["bigram"] == whole["bigram"]["validation"]
    assert "eval/validation/bits_per_byte" in [f"{EV.tb_prefix(own)}/bits_per_byte"]
    assert EV.tb_prefix(rep) == "transfer/other.txt/validation_prefix"
    assert "int_lm eval" in EV.format_report(own)


def test_tokenizer_mismatch_refused_in_process(trained):
    ident = dict(trained["tok"].identity())
    EV.check_tokenizer(ident, trained["tok"], trained["shape"])
    with pytest.raises(UserError, match="tokenizer"):
        EV.check_tokenizer({**ident, "sha256": "0" * 64}, trained["tok"])
    bpe = D.make_tokenizer(C.DataConfig(tokenizer="cl100k_base", bpe_merges=300))
    with pytest.raises(UserError, match="trained with tokenizer bytes"):
        EV.check_tokenizer(ident, bpe, trained["shape"])


def run_eval(*args, cwd=ROOT):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def test_cli_json_keys_tensorboard_and_equal_to_in_process(trained):
    from int_lm.logging import read_scalars

    run = trained["cfg"].train.run_dir
    p = run_eval(run, "--json", "--max_bytes", 2000, "--split", "test")
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    for key in ("bits_per_byte", "bits_per_token", "perplexity", "tokens", "bytes", "baselines",
                "integer_bits_per_byte", "perplexity_per_byte", "tokens_per_s", "step"):
        assert key in rep
    assert set(rep["baselines"]) >= {"unigram", "bigram", "compressor"}
    inproc = EV.evaluate(trained["loaded"], trained["loaded"].config.data, split="test", max_bytes=2000)
    assert rep["bits_per_byte"] == pytest.approx(inproc["bits_per_byte"], rel=1e-12)
    assert rep["tokens"] == inproc["tokens"] and rep["bytes"] == inproc["bytes"] >= 2000
    scalars = read_scalars(Path(run) / "tb")
    tag = "eval/test_prefix/bits_per_byte"
    assert scalars[tag][-1][0] == trained["loaded"].step
    assert scalars[tag][-1][1] == pytest.approx(rep["bits_per_byte"], rel=1e-6)


def test_cli_refusals_are_one_line_errors(trained, tmp_path):
    run = trained["cfg"].train.run_dir
    p = run_eval(run, "--data.tokenizer", "cl100k_base", "--data.bpe_merges", "300", "--json")
    assert p.returncode == 2
    assert p.stderr.startswith("error: the checkpoint was trained with tokenizer bytes"), p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
    (tmp_path / "empty").mkdir()
    p = run_eval(tmp_path / "empty")
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr, p.stderr
    p = run_eval(run, "--es.population", "8")
    assert p.returncode == 2 and "only --data.KEY overrides" in p.stderr


@pytest.mark.slow
def test_eval_is_faster_than_training_per_text_token(tmp_path):
    """The CPU default model: eval tokens/s >= training's text tokens/s (population / group size)."""
    from int_lm.trainer import train

    cfg = C.load_file(ROOT / "configs" / "default.toml")
    cfg = C.validate(C.apply_values(cfg, {
        "data": {"max_docs": 1500, "cache_dir": str(tmp_path / "cache")},
        "train": {"run_dir": str(tmp_path / "run"), "steps": 6, "eval_every": 6, "checkpoint_every": 6,
                  "progress": False}}, "test"))
    summary = train(cfg, log=lambda *a, **k: None)
    train_text_tps = summary["population_tokens_per_s"] / cfg.es.group_size
    from int_lm.checkpoint import load_model

    loaded = load_model(cfg.train.run_dir)
    rep = EV.evaluate(loaded, loaded.config.data, split="test")
    assert rep["tokens"] > 50_000
    assert rep["steady_tokens_per_s"] >= train_text_tps, (rep["steady_tokens_per_s"], train_text_tps)
