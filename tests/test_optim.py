"""Update rules (int_lm/optim): each against a plain NumPy twin of its update, schedules, thresholds."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from int_lm import config as C
from int_lm import eggroll as E
from int_lm import model as M
from int_lm import optim as O


def sign_update(params, votes, thr_m, thr_v):
    """The sign rule's update with explicit thresholds."""
    rule = O.make(C.ESConfig(optimizer="sign"))
    return rule.update({}, params, votes, {"threshold_matrix": thr_m, "threshold_vector": thr_v})


@pytest.mark.parametrize("alpha", [0.5, 0.1, 0.01])
def test_threshold_moves_about_alpha_under_random_fitness(alpha):
    shape = M.ModelShape(64, 64, 1)
    population = 512
    spec = E.EggrollSpec(shape, population=population)
    noise = E.make_noise(spec, 0, 0, jnp.arange(population // 2, dtype=jnp.int32))
    fitness = jnp.asarray(np.random.default_rng(1).choice([-1, 1], population // 2), jnp.int32)
    acc = E.accumulate(E.zero_votes(spec), E.vote(noise, fitness))
    thr_m, thr_v = O.thresholds(alpha, population, 1)
    params = jax.tree_util.tree_map(lambda p: jnp.zeros_like(p), M.init_params(shape, 0))
    _, _, stats = sign_update(params, acc, thr_m, thr_v)
    frac = int(stats["moved_matrix"]) / stats["count_matrix"]
    assert abs(frac - alpha) < 0.25 * alpha + 0.002, (frac, alpha)
    # The moved-fraction statistic is exactly the count of changed weights.
    new, _, stats = sign_update(params, acc, thr_m, thr_v)
    changed = sum(int((np.asarray(a) != np.asarray(b)).sum()) for a, b in
                  zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(params)))
    assert changed == int(stats["moved_matrix"]) + int(stats["moved_vector"])


def test_update_clips_and_ignores_zero_votes():
    w = {"embed": jnp.array([[127, -127, 5]], jnp.int8)}
    votes = {("embed",): (jnp.zeros((1, 3), jnp.int32), jnp.array([[5000, -5000, 0]], jnp.int32))}
    new, _, stats = sign_update(w, votes, 100, 100)
    assert np.asarray(new["embed"]).tolist() == [[127, -127, 5]]


def test_alpha_schedule():
    assert O.alpha_at(0, 4.0, 1000) == 1.0
    assert abs(O.alpha_at(1000, 4.0, 1000) - 1 / 16) < 1e-12
    assert O.alpha_at(500, 0.3, 1000) == 0.3
    assert O.thresholds(1.0, 1024, 1) == (0, 0)
    thr_m, thr_v = O.thresholds(0.05, 1024, 1)
    assert thr_m == thr_v == math.ceil(1.959963984540054 * 256 * math.sqrt(512))


