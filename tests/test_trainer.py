"""The training loop end to end: it learns, deterministically, and logs what it promises."""
import dataclasses
import json
import random

import jax
import numpy as np
import pytest

from int_lm import config as C
from int_lm.logging import read_scalars
from int_lm.trainer import train

WORDS = ["abc", "de", "fgh", "ij"]


@pytest.fixture(scope="module")
def word_corpus(tmp_path_factory):
    """A tiny corpus with structure a model can learn fast: random words, fixed spellings."""
    root = tmp_path_factory.mktemp("words")
    rng = random.Random(0)
    for i in range(100):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 80))) + "\n"
        (root / f"doc{i:03d}.txt").write_text(text)
    return root


def tiny_config(tmp_path, corpus, **train_overrides):
    cfg = C.load_file("tiny")
    cfg = C.apply_values(cfg, {
        "model": {"layers": 1, "width": 32},
        "es": {"population": 128, "tokens_per_update": 32, "sigma_shift": 3, "alpha": 0.5},
        "data": {"source": str(corpus), "cache_dir": str(tmp_path / "cache"), "val_tokens": 2048},
        "train": {"run_dir": str(tmp_path / "run"), "steps": 60, "eval_every": 20,
                  "checkpoint_every": 0, "progress": False, **train_overrides},
    }, "test")
    return C.validate(cfg)


def test_tiny_model_learns_below_unigram(tmp_path, word_corpus):
    summary = train(tiny_config(tmp_path, word_corpus), log=lambda *a: None)
    unigram = summary["baselines"]["unigram"]
    history = [h for h in summary["history"] if "val/bits_per_byte" in h]
    first, last = history[0]["val/bits_per_byte"], history[-1]["val/bits_per_byte"]
    assert last < 0.85 * unigram, (last, unigram)
    assert last < first
    # Every promised scalar is in the TensorBoard event file (read with tensorboard's reader).
    scalars = read_scalars(tmp_path / "run" / "tb")
    for tag in ["train/bits_per_byte_mean", "train/bits_per_byte_min", "train/bits_per_byte_max",
                "update/moved_matrix_fraction", "update/moved_vector_fraction", "update/saturated_fraction",
                "update/alpha", "update/threshold_matrix", "update/threshold_vector",
                "perf/population_tokens_per_s", "perf/forward_s", "perf/update_s",
                "val/bits_per_byte", "val/baseline_unigram", "val/baseline_bigram"]:
        assert tag in scalars, tag
    assert [s for s, _ in scalars["train/bits_per_byte_mean"]] == list(range(1, 61))
    assert len(scalars["val/bits_per_byte"]) == 3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"histograms": 0})
    acc.Reload()
    assert "weights/embed" in acc.Tags()["histograms"]
    hist = acc.Histograms("weights/embed")[-1].histogram_value
    assert hist.num == 256 * 32 and -127 <= hist.min <= hist.max <= 127
    meta = json.loads((tmp_path / "run" / "metadata.json").read_text())
    assert meta["param_count"] > 0 and meta["tokenizer"]["name"] == "bytes" and meta["corpus"]


def test_training_is_deterministic(tmp_path, word_corpus):
    runs = []
    for name in ("a", "b"):
        cfg = tiny_config(tmp_path / name, word_corpus, steps=4, eval_every=2)
        runs.append(train(cfg, log=lambda *a: None))
    for a, b in zip(jax.tree_util.tree_leaves(runs[0]["state"].params),
                    jax.tree_util.tree_leaves(runs[1]["state"].params)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(runs[0]["state"].states, runs[1]["state"].states)
    key = "train/bits_per_byte_mean"
    assert [h[key] for h in runs[0]["history"]] == [h[key] for h in runs[1]["history"]]


RULES = {
    "sign": {"optimizer": "sign"},
    "sign_ranked": {"optimizer": "sign", "fitness_levels": 7},
    "momentum": {"optimizer": "momentum", "fitness_levels": 7, "momentum_shift": 2, "lr": 0.4},
}


@pytest.mark.parametrize("rule", ["sign_ranked", "momentum", "momentum_tied_head"])
def test_tiny_model_learns_below_unigram_with_each_rule(tmp_path, word_corpus, rule):
    """(The sign rule: test_tiny_model_learns_below_unigram.) Tied: the head is the embedding table."""
    cfg = tiny_config(tmp_path, word_corpus)
    tied = rule.endswith("_tied_head")
    rule = rule.removesuffix("_tied_head")
    cfg = C.validate(C.apply_values(cfg, {"es": RULES[rule], "model": {"tie_head": tied}}, "test"))
    summary = train(cfg, log=lambda *a: None)
    unigram = summary["baselines"]["unigram"]
    history = [h for h in summary["history"] if "val/bits_per_byte" in h]
    assert history[-1]["val/bits_per_byte"] < 0.85 * unigram, (history[-1]["val/bits_per_byte"], unigram)
    if rule == "momentum":   # its schedule is logged
        assert {"update/lr", "update/eta_matrix", "update/eta_vector"} <= set(summary["history"][-1])


@pytest.mark.parametrize("tie_head", [False, True])
def test_resume_with_optimiser_state_is_bit_exact(tmp_path, word_corpus, tie_head):
    """k steps, a checkpoint, k more (a new process would read the same files) == 2k straight,
    optimiser state (int32 momentum, int16 master weights) included; a tied model saves no head."""
    straight = C.validate(C.apply_values(tiny_config(tmp_path / "a", word_corpus, steps=6, eval_every=3,
                                                     checkpoint_every=3),
                                         {"es": RULES["momentum"], "model": {"tie_head": tie_head}}, "test"))
    ref = train(straight, log=lambda *a: None)
    half = C.validate(C.apply_values(straight, {"train": {"run_dir": str(tmp_path / "b" / "run"), "steps": 3}},
                                     "test"))
    train(half, log=lambda *a: None)
    from int_lm import checkpoint as CK
    saved = CK.restore(tmp_path / "b" / "run", 3)
    assert ("head" in saved.params) == (not tie_head) == ("head" in saved.opt_state["master"])
    assert saved.opt_state["master"]["embed"].dtype == np.int16
    assert saved.opt_state["momentum"]["layers"]["Wf"].dtype == np.int32
    resumed = train(C.validate(C.apply_values(half, {"train": {"steps": 6}}, "test")), log=lambda *a: None)
    for a, b in zip(jax.tree_util.tree_leaves((ref["state"].params, ref["state"].opt_state, ref["state"].states)),
                    jax.tree_util.tree_leaves((resumed["state"].params, resumed["state"].opt_state,
                                               resumed["state"].states))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    key = "train/bits_per_byte_mean"
    assert [h[key] for h in ref["history"]] == [h[key] for h in resumed["history"]]


def test_rule_screen_rebuilds_the_momentum_rule(tmp_path, word_corpus, monkeypatch):
    """benchmarks/rule_screen.py's family contains the shipped rule: its linear, beta-2, 8-fraction-bit
    variant moves the weights exactly as es.optimizer = "momentum" (no clipping is reached here), so
    the screening rows and the shipped rule are measured on the same footing."""
    import importlib.util
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    from int_lm import optim
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "rule_screen.py"
    spec = importlib.util.spec_from_file_location("rule_screen", path)
    screen = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec.loader.exec_module(screen)
    rule = screen.parse_rule('{"beta": 2, "mode": "linear", "fine": 8, "lr": 0.4}')
    monkeypatch.setitem(optim.RULES, "screen", SimpleNamespace(make=screen.make_screen_rule(rule)))
    runs = {}
    for name in ("momentum", "screen"):
        cfg = tiny_config(tmp_path / name, word_corpus, steps=5, eval_every=5)
        es = {**RULES["momentum"], "optimizer": name}
        runs[name] = train(C.validate(C.apply_values(cfg, {"es": es}, "test")), log=lambda *a: None)
    moved = [h["update/moved_matrix_fraction"] for h in runs["momentum"]["history"]]
    assert max(moved) > 0, "the rule never moved a weight: the comparison would be empty"
    for a, b in zip(jax.tree_util.tree_leaves(runs["momentum"]["state"].params),
                    jax.tree_util.tree_leaves(runs["screen"]["state"].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(Exception, match="unknown keys"):
        screen.parse_rule('{"betta": 2}')


def test_one_trainer_per_run_dir_and_a_finished_run_reports_its_last_evaluation(tmp_path, word_corpus):
    import os
    import signal
    import subprocess
    import sys

    from int_lm import checkpoint

    cfg = tiny_config(tmp_path, word_corpus, steps=20, eval_every=10, checkpoint_every=10)
    run_dir = tmp_path / "run"
    first = train(cfg, log=lambda *a: None)
    lines = []
    again = train(cfg, log=lines.append)            # already at train.steps: trains nothing
    assert again["steps"] == 20 and again["val_bits_per_byte"] == first["val_bits_per_byte"]
    assert f"{first['val_bits_per_byte']:.4f}" in "\n".join(lines)

    saved = checkpoint.list_steps(run_dir)
    with checkpoint.lock_run_dir(run_dir):          # another trainer (here: this process) holds the directory
        with pytest.raises(checkpoint.RunDirBusy, match=f"process {os.getpid()}.*--train.run_dir"):
            train(C.apply_values(cfg, {"train": {"steps": 30}}, "test"), log=lambda *a: None)
    assert checkpoint.list_steps(run_dir) == saved

    # A holder that dies without cleaning up (SIGKILL) leaves no lock behind.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom int_lm import checkpoint\n"
                               f"lock = checkpoint.lock_run_dir({str(run_dir)!r})\nprint('held', flush=True)\n"
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(checkpoint.RunDirBusy, match=f"process {holder.pid}"):
        checkpoint.lock_run_dir(run_dir)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    resumed = train(C.apply_values(cfg, {"train": {"steps": 30}}, "test"), log=lambda *a: None)
    assert resumed["steps"] == 30 and not resumed["interrupted"]
