"""benchmarks/noise_budget.py: it scores pairs exactly as the trainer does, and its statistics are right."""
import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_args

# Its tests share costly module fixtures: one worker runs them all (pyproject.toml: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("test_noise_budget")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import noise_budget as nb  # noqa: E402

from int_lm import eggroll, model  # noqa: E402


def tiny_spec(population=16):
    return eggroll.EggrollSpec(model.ModelShape(vocab_size=32, width=16, layers=1), population, sigma_shift=3)


def test_scores_are_the_trainers_and_an_empty_block_changes_nothing():
    spec = tiny_spec()
    params = model.init_params(spec.shape, 3)
    rng = np.random.default_rng(0)
    corpus = rng.integers(1, 32, size=4000).astype(np.int32)
    texts = nb.Texts(corpus, spec.shape, warmup=5, seed=1)
    pairs = spec.population // 2
    tokens, states = texts.draw(params, pairs, 7)
    assert tokens.shape == (spec.population, 8) and states.shape == (1, spec.population, 16)
    # both members of a pair read one text from one state
    assert (np.asarray(tokens)[0::2] == np.asarray(tokens)[1::2]).all()
    noise = eggroll.make_noise(spec, 5, 9, jnp.arange(pairs, dtype=jnp.int32))
    ours = np.asarray(eggroll.member_log_likelihoods(spec, params, noise, states, tokens)[0])
    assert ours.shape == (spec.population, 7)
    _, trainer_scores, _ = eggroll.population_votes(spec, params, states, tokens[0::2], 5, 9)
    np.testing.assert_array_equal(ours.sum(axis=1), np.asarray(trainer_scores))
    ours = ours.sum(axis=1)
    # no block perturbed: both members are the unperturbed model, every difference is exactly 0
    none = np.asarray(eggroll.evaluate_members(spec, params, nb.block_noise(noise, ()), states, tokens)[0])
    assert (none[0::2] == none[1::2]).all()
    # one block perturbed: the others are untouched, so the differences are neither all 0 nor the full ones
    vec = np.asarray(eggroll.evaluate_members(spec, params, nb.block_noise(noise, nb.BLOCKS["vectors"]),
                                              states, tokens)[0])
    assert (vec[0::2] != vec[1::2]).any() and not np.array_equal(vec, ours)
    assert set(sum(nb.BLOCKS.values(), ())) == {p[-1] for p, _, _ in model.param_leaves(spec.shape)}


def test_signal_share_recovers_a_known_correlation():
    rng = np.random.default_rng(0)
    s = rng.normal(0, np.sqrt(0.2), 200_000)
    d_a = s + rng.normal(0, np.sqrt(0.8), s.size)
    d_b = s + rng.normal(0, np.sqrt(0.8), s.size)
    assert nb.signal_share(d_a, d_b) == pytest.approx(0.2, abs=0.01)
    assert nb.signal_share(np.zeros(5), np.ones(5)) == 0.0


def test_aggregations():
    diffs = np.array([[3.0, -1.0, 0.0, 10.0], [-2.0, -2.0, 1.0, 0.0]])
    np.testing.assert_array_equal(nb.aggregate("sum", diffs), [12.0, -3.0])
    np.testing.assert_array_equal(nb.aggregate("sign", diffs), [1.0, -1.0])
    c = np.quantile(np.abs(diffs), 0.5)   # 1.5
    np.testing.assert_array_equal(nb.aggregate("clip50", diffs), [c - 1 + 0 + c, -c - c + 1 + 0])


def test_sigma_bound_is_the_best_per_block_scale():
    b, rho = [100.0, 300.0, 50.0], [0.02, 0.005, 0.08]
    assert nb.sigma_bound(b, [0.03, 0.03, 0.03]) == pytest.approx(1.0)   # equal shares: nothing to gain

    def ratio(c):  # the vote's signal / noise with block k's noise scaled by c_k
        c = np.asarray(c)
        return np.sum(c * np.asarray(rho) * b) / np.sqrt(np.sum(c * c * b))

    brute = max(ratio(c) for c in np.random.default_rng(1).uniform(0, 1, (20_000, 3)))
    bound = nb.sigma_bound(b, rho)
    assert bound * ratio([1, 1, 1]) == pytest.approx(ratio(rho))       # attained at c = rho
    assert brute <= bound * ratio([1, 1, 1]) * (1 + 1e-9) and brute > 0.99 * bound * ratio([1, 1, 1])
    assert nb.sigma_bound(b, [0.02, -0.01, 0.08]) == nb.sigma_bound(b, [0.02, 0.0, 0.08])   # rho < 0 counts as 0


def test_command_line_at_a_checkpoint(tiny_env, tiny_straight, tmp_path):
    out = tmp_path / "budget.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "noise_budget.py"), *tiny_args(tiny_env),
                        "--checkpoint", str(tiny_straight), "--step", "30", "--tokens", "6", "12", "--draws", "2",
                        "--warmup", "4", "--blocks", "--aggregations", "--json", str(out)],
                       cwd=ROOT, env=tiny_env["env"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "checkpoint" in p.stdout and "step 30" in p.stdout and "Per-block sigma bound" in p.stdout, p.stdout
    report = json.loads(out.read_text())
    assert report["step"] == 30 and set(report["by_tokens"]) == {"6", "12"}
    assert set(report["by_tokens"]["6"]) == {"all", "aggregations", *nb.BLOCKS}
    aggs = report["by_tokens"]["6"]["aggregations"]
    assert set(aggs) == set(nb.AGGREGATIONS) and aggs["sum"]["rho"] == aggs["sum"]["cross"]
    assert aggs["sum"]["rho"] == report["by_tokens"]["6"]["all"]["rho"]
    for name, row in report["by_tokens"]["12"].items():
        if name == "aggregations":
            continue
        assert row["var"] > 0 and -1 <= row["rho"] <= 1 and len(row["draws"]) == 2
    assert sum(report["block_sizes"].values()) == report["weights"]


def test_a_bad_setting_is_one_error_line(tiny_env):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "noise_budget.py"), *tiny_args(tiny_env),
                        "--draws", "1"], cwd=ROOT, env=tiny_env["env"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: --draws"), p.stderr
