"""The learning benchmark (benchmarks/learning.py) and its backprop baseline (benchmarks/backprop.py).

The float twin is checked against the integer model without optax: with floors at the
integer model's rounding points it reproduces the integer logits exactly (so every op
maps as its docstring says), and the plain real-number function used for training
stays within the rounding's reach. The end-to-end run needs the ``bench`` extra.
"""
import json
import random
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from int_lm import intmath
from int_lm import model as M

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import backprop as BP  # noqa: E402
import learning  # noqa: E402


def random_int_params(shape: M.ModelShape, seed: int) -> dict:
    """Every parameter uniform int8 in [-127, 127]: norms and biases too, unlike the init."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, s, _ in M.param_leaves(shape):
        M.set_leaf(out, path, jnp.asarray(rng.integers(-127, 128, s).astype(np.int8)))
    return out


def both_forwards(shape, int_params, rows=6, length=40, seed=0, floors=False):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, shape.vocab_size, (rows, length + 1)).astype(np.int32)
    toks[:, 0] = rng.integers(1, shape.vocab_size, rows)
    toks[0, length // 2] = shape.boundary_token                 # a reset inside a row
    inputs, targets = jnp.asarray(toks[:, :-1]), jnp.asarray(toks[:, 1:])
    _, int_states, int_logits = M.forward(int_params, M.init_state(shape, rows), inputs, targets,
                                          shape.boundary_token, return_logits=True)
    f_logits, f_states = BP.forward(BP.from_int(int_params), BP.zero_state(shape, rows), inputs,
                                    shape.boundary_token, floors=floors)
    return (np.asarray(int_logits, np.float64), np.asarray(int_states, np.float64), np.asarray(f_logits, np.float64),
            np.asarray(f_states, np.float64), toks[:, 1:])


@pytest.mark.parametrize("layers,width,vocab,params", [(2, 32, 256, "init"), (1, 48, 100, "random"),
                                                       (2, 64, 256, "random")])
def test_float_twin_with_floors_is_the_integer_model(layers, width, vocab, params):
    """Rounding down to 1/16 where the integer model rounds gives its logits and states exactly:
    the float twin is the same function, op for op (widths 48: isqrt(48) = 6 is no power of two)."""
    shape = M.ModelShape(vocab, width, layers, 0)
    ip = M.init_params(shape, 3) if params == "init" else random_int_params(shape, 3)
    il, ist, fl, fst, _ = both_forwards(shape, ip, floors=True)
    np.testing.assert_array_equal(il / 16, fl)
    np.testing.assert_array_equal(ist / 16, fst)


def test_float_twin_without_floors_is_close_to_the_integer_model():
    """The function backprop trains (no floors) against the integer model, same init weights.

    Each rounding point (matmul, layer-norm mean and quotient, the gate products) floors
    by less than 1/16, and the floored layer-norm mean changes its output by up to a
    relative 1/mean|u| (~8% at init, mean|u| ~ 13 in int8 units); through a layer and the
    recurrence that measured 0.17-0.25 mean |difference| in logits (real units) against
    a logit spread of ~1.3 (std), on 1-2 layers x 32-128. Bounds with margin: mean |d|
    < 0.35 (under 6 int8 units), correlation > 0.95, bits/token within 0.1.
    """
    for layers, width in ((1, 32), (2, 64)):
        shape = M.ModelShape(256, width, layers, 0)
        il, _, fl, _, targets = both_forwards(shape, M.init_params(shape, 0), rows=8, length=64)
        il = il / 16
        assert np.abs(il - fl).mean() < 0.35
        assert np.corrcoef(il.ravel(), fl.ravel())[0, 1] > 0.95
        int_bits = intmath.bits_per_token_f64(il * 16, targets).mean()
        float_bits = float(np.asarray(BP.bits_per_token(jnp.asarray(fl), jnp.asarray(targets))).mean())
        assert abs(int_bits - float_bits) < 0.1


def test_quantised_float_weights_round_trip():
    shape = M.ModelShape(64, 16, 1, 0)
    ip = random_int_params(shape, 1)
    back = BP.to_int(BP.from_int(ip))
    for (path, _, _) in M.param_leaves(shape):
        np.testing.assert_array_equal(np.asarray(M.get_leaf(back, path)), np.asarray(M.get_leaf(ip, path)))


def curve(pairs):
    return [{"time_s": t, "step": i + 1, "val_bits_per_byte": v} for i, (t, v) in enumerate(pairs)]


def fake_report(budget=600.0):
    return {
        "budget_s": budget, "reach": [3.6, 3.4], "marks_s": None, "placement": "test",
        "machine": {"cpu": "test cpu", "cpus": 2, "cpu_flags": ["avx2"]},
        "runs": [
            {"name": "sign", "kind": "es", "steps": 700, "tokens_per_s": 500000.0, "notes": [],
             "baselines": {"unigram": 4.8, "bigram": 3.575, "compressor": 2.73},
             "curve": curve([(44, 4.3), (170, 3.86), (590, 3.58), (610, 3.55)])},
            {"name": "slow", "kind": "es", "steps": 10, "tokens_per_s": 1000.0, "notes": ["a note"],
             "baselines": {"unigram": 4.8, "bigram": 3.575, "compressor": 2.73}, "curve": curve([(300, 4.5)])},
            {"name": "backprop", "kind": "backprop", "steps": 9000, "tokens_per_s": 80000.0, "notes": [],
             "baselines": {"unigram": 4.8, "bigram": 3.575, "compressor": 2.73},
             "curve": curve([(5, 3.9), (10, 3.5), (20, 3.3), (60, 2.5), (595, 2.2)])},
        ],
    }


def table_rows(md: str) -> dict[str, str]:
    """{run name: its table line} of a learning.md table."""
    return {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| ")}


def test_curve_reading_and_table():
    r = fake_report()
    assert learning.marks_for(600) == [60, 180, 600]
    assert learning.marks_for(100) == [60, 100]
    assert learning.marks_for(20) == [20]
    sign = r["runs"][0]["curve"]
    assert learning.value_at(sign, 600)["val_bits_per_byte"] == 3.58      # 610 s is past the budget
    assert learning.value_at(sign, 43) is None
    assert learning.time_to_reach(sign, 3.6, 600) == 590
    assert learning.time_to_reach(sign, 3.4, 600) is None
    md = learning.table(r)
    lines = table_rows(md)
    assert "| run | method | 1 min | 3 min | 10 min | steps | tokens/s | s to <= 3.6 |" in md
    # sign: 3.6 in 590 s vs backprop's 10 s -> 59x; 3.4 not reached: at least 600 / 20 = 30x
    assert "| 590 | 59.0 | not in 600 | > 30.0 |" in lines["sign"]
    assert "| 4.300 | 3.860 | 3.580 | 700 | 500,000 |" in lines["sign"]
    assert "| - | - | 4.500 |" in lines["slow"]
    assert lines["backprop"].endswith("| 10 | 1 | 20 | 1 |")
    assert "bigram 3.575" in md and "slow: a note" in md


def test_a_shorter_backprop_budget_shows_no_values_past_it():
    """--bp_seconds: backprop's cells after its own budget are "-", not its last value repeated."""
    r = fake_report()
    bp = r["runs"][2]
    bp["budget_s"] = 100.0
    bp["curve"] = [p for p in bp["curve"] if p["time_s"] <= 100]
    lines = table_rows(learning.table(r))
    assert "| 2.500 | - | - | 9000 |" in lines["backprop"]                  # 1 min, then past 100 s
    assert "| 590 | 59.0 | not in 600 | > 30.0 |" in lines["sign"]           # ratios use its own run
    assert "backprop ran for 1.7 min" in learning.table(r)
    del bp["budget_s"]
    bp["settings"] = {"seconds": 100.0}                                     # reports written before the key
    assert "| 2.500 | - | - | 9000 |" in learning.table(r)


def test_a_shorter_es_budget_bounds_its_own_ratios():
    """--run NAME@SECONDS: a threshold the run never reached is bounded by its own budget, not the longest."""
    r = fake_report(budget=3600.0)
    r["runs"][0]["budget_s"] = 600.0
    lines = table_rows(learning.table(r))
    assert "| 590 | 59.0 | not in 600 | > 30.0 |" in lines["sign"]          # 600 / 20, not 3600 / 20
    r["runs"][2]["budget_s"] = 8.0                                          # backprop: 3.6 not within 8 s
    r["runs"][2]["curve"] = r["runs"][2]["curve"][:1]
    lines = table_rows(learning.table(r))
    assert "| 590 | < 74 |" in lines["sign"]                                 # 590 / 8, not 590 / 3600


def seeded_report() -> dict:
    """Two ES runs over three seeds, backprop over the same three (as ``--seeds 0 1 2`` writes it)."""
    r = fake_report()
    base = dict(r["runs"][0])
    runs = []
    for name, points in (("mom", [[(60, 3.9), (100, 3.59)], [(60, 3.8), (130, 3.58)], [(60, 4.0), (590, 3.7)]]),
                         ("sign", [[(60, 4.3), (300, 3.6)], [(60, 4.2), (500, 3.5)], [(60, 4.4), (590, 3.9)]])):
        for seed, pts in enumerate(points):
            runs.append({**base, "name": f"{name}-s{seed}", "group": name, "seed": seed, "curve": curve(pts)})
    for seed, t in enumerate((10, 20, 30)):
        runs.append({**r["runs"][2], "name": f"backprop-s{seed}", "group": "backprop", "seed": seed,
                     "curve": curve([(t, 3.5), (595, 2.2)])})
    r["runs"] = runs
    return r


def test_runs_over_seeds_get_a_median_and_range_table():
    """--seeds: median [min-max] by run; a seed that never got there counts as later than the rest."""
    r = seeded_report()
    md = learning.table(r)
    lines = table_rows(md)
    assert "Over seeds: median [min-max]" in md
    # per seed, ratios against backprop of the same seed: mom-s1 130 s / 20 s
    assert "| 130 | 6.5 |" in lines["mom-s1"]
    # 1 min: 3.9 [3.8-4.0]; 3.6: 100, 130, never -> median 130 [100-not in]; backprop's median 20 -> 6.5
    assert lines["mom"].startswith("| mom | 0, 1, 2 | 3.900 [3.800-4.000] |")
    assert "| 130 [100-not in] | 6.5 |" in lines["mom"]
    # 3.4: no seed got there
    assert lines["mom"].endswith("| not in 600 | - |")
    # sign 3.6: 300, 500, never -> 500; 3.4: never for two of three -> "> 600"
    assert "| 500 [300-not in] | 25.0 |" in lines["sign"]
    assert "| backprop | 0, 1, 2 |" in md
    lone = fake_report()
    assert "Over seeds" not in learning.table(lone)       # no run repeated: no second table


def test_seeds_expand_every_run_and_backprop(tmp_path, monkeypatch):
    """--seeds 0 3: NAME-s0, NAME-s3 with --train.seed, backprop-s0/-s3 with --seed; refused with --bp_seed."""
    started = []
    monkeypatch.setattr(learning.Job, "run", lambda self, *a, **k: started.append(self))
    learning.main(["--run", "mom=configs/tiny.toml --es.lr 0.5", "--backprop", "--seeds", "0", "3",
                   "--seconds", "5", "--out", str(tmp_path / "o")])
    assert [(j.name, j.group, j.seed) for j in started] == [
        ("mom-s0", "mom", 0), ("mom-s3", "mom", 3), ("backprop-s0", "backprop", 0), ("backprop-s3", "backprop", 3)]
    assert started[1].cmd[-5:-2] == ["--es.lr", "0.5", "--train.seed=3"]     # after the run's own overrides
    assert started[1].cmd[-2] == f"--train.run_dir={tmp_path / 'o' / 'mom-s3'}"
    assert started[3].cmd[-2:] == ["--seed", "3"] and str(tmp_path / "o" / "backprop-s3") in " ".join(started[3].cmd)
    for bad in (["--seeds", "1", "1"], ["--seeds", "0", "--bp_seed", "2"]):
        with pytest.raises(SystemExit):
            learning.main(["--run", "mom=configs/tiny.toml", "--backprop", *bad, "--out", str(tmp_path / "p")])


def test_run_specs_with_and_without_their_own_budget():
    assert learning.parse_run("sign=configs/tiny.toml --es.lr 0.5") == (
        "sign", "configs/tiny.toml", ["--es.lr", "0.5"], None)
    assert learning.parse_run("sign@1200=configs/tiny.toml") == ("sign", "configs/tiny.toml", [], 1200.0)
    assert learning.parse_run("configs/tiny.toml") == ("tiny", "configs/tiny.toml", [], None)
    for bad in ("sign@=configs/tiny.toml", "sign@ten=configs/tiny.toml", "sign@-5=configs/tiny.toml"):
        with pytest.raises(SystemExit, match="seconds > 0"):
            learning.parse_run(bad)


def test_replot_rewrites_table_and_json(tmp_path):
    (tmp_path / learning.JSON_NAME).write_text(json.dumps(fake_report()))
    assert learning.main(["--replot", str(tmp_path), "--reach", "3.0"]) == 0
    md = (tmp_path / learning.TABLE_NAME).read_text()
    assert "s to <= 3 |" in md and "s to <= 3.6" not in md
    assert json.loads((tmp_path / learning.JSON_NAME).read_text())["reach"] == [3.0]


WORDS = ["abc", "de", "fgh", "ij", "klmno", "pq"]


def test_learning_benchmark_end_to_end(tmp_path):
    """A few seconds of one ES run (configs/tiny.toml) and the backprop baseline, side by side."""
    pytest.importorskip("optax", reason="the backprop baseline needs optax: pip install -e '.[bench]'")
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib: pip install -e '.[bench]'")
    corpus = tmp_path / "words"
    corpus.mkdir()
    rng = random.Random(0)
    for i in range(40):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(100, 200))) + "\n"
        (corpus / f"doc{i:03d}.txt").write_text(text)
    out = tmp_path / "out"
    proc = subprocess.run(
        # as `python benchmarks/learning.py ... &` from a script: SIGINT ignored, and so in its runs
        ["sh", "-c", 'trap "" INT; exec "$0" "$@"',
         sys.executable, str(ROOT / "benchmarks" / "learning.py"), "--corpus", str(corpus),
         "--data.cache_dir", str(tmp_path / "cache"), "--run", "tiny@5=configs/tiny.toml --train.eval_every 1",
         "--backprop", "--bp-batch", "4", "--bp-seq-len", "16", "--bp-eval-every-s", "1",
         "--seconds", "6", "--jobs", "2", "--reach", "5", "--stop-timeout", "60", "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "learning.json").read_text())
    assert [(r["name"], r["kind"]) for r in report["runs"]] == [("tiny", "es"), ("backprop", "backprop")]
    assert [r["budget_s"] for r in report["runs"]] == [5.0, 6.0]      # tiny@5: its own budget
    for r in report["runs"]:
        assert r["curve"], r
        assert r["notes"] == [], r["notes"]            # stopped at its budget, not killed after the timeout
        assert all(0 < p["val_bits_per_byte"] < 16 and p["time_s"] > 0 for p in r["curve"])
        assert set(r["baselines"]) >= {"unigram", "bigram"}
    assert report["runs"][0]["baselines"] == report["runs"][1]["baselines"]   # same corpus, split, rule
    md = (out / "learning.md").read_text()
    assert "| tiny | EGGROLL (int8) |" in md and "| backprop | backprop (Adam, float32) |" in md
    assert "alongside" in report["placement"]
    assert (out / "learning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "tiny" / "history.jsonl").is_file() and (out / "logs" / "backprop.log").is_file()
