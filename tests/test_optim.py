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


RANDOM_POPULATION = 512


@pytest.fixture(scope="module")
def random_fitness_votes():
    """The votes of N = 512 members at 1 x 64 under random +-1 fitness (the null the thresholds assume)."""
    shape = M.ModelShape(64, 64, 1)
    spec = E.EggrollSpec(shape, population=RANDOM_POPULATION)
    fitness = jnp.asarray(np.random.default_rng(1).choice([-1, 1], RANDOM_POPULATION // 2), jnp.int32)
    votes = jax.jit(lambda f: E.accumulate(E.zero_votes(spec), E.vote(
        E.make_noise(spec, 0, 0, jnp.arange(RANDOM_POPULATION // 2, dtype=jnp.int32)), f)))
    return shape, votes(fitness)


@pytest.mark.parametrize("alpha", [0.5, 0.1, 0.01])
def test_threshold_moves_about_alpha_under_random_fitness(alpha, random_fitness_votes):
    shape, acc = random_fitness_votes
    thr_m, thr_v = O.thresholds(alpha, RANDOM_POPULATION, 1)
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




# ---------------------------------------------------------------------------
# Fitness shaping by signed ranks, and the wide vote
# ---------------------------------------------------------------------------

def np_rank_fitness(scores: np.ndarray, levels: int) -> np.ndarray:
    """Twin of eggroll.shape_fitness: sign(d) (1 + floor(L rank(|d|) / P)), ties by pair order."""
    d = scores[0::2].astype(np.int64) - scores[1::2]
    if levels == 1:
        return np.sign(d)
    p = len(d)
    rank = np.empty(p, np.int64)
    rank[np.argsort(np.abs(d), kind="stable")] = np.arange(p)
    return np.sign(d) * (1 + (rank * levels) // p)


@pytest.mark.parametrize("levels", [1, 3, 7, 15])
def test_rank_fitness_equals_numpy(levels):
    rng = np.random.default_rng(levels)
    scores = rng.integers(-40, 40, 2 * 300).astype(np.int32)   # many ties and zero differences
    got = np.asarray(E.shape_fitness(jnp.asarray(scores), levels))
    np.testing.assert_array_equal(got, np_rank_fitness(scores, levels))
    assert np.abs(got).max() <= levels
    # E[F^2] with no zero difference is what the update rules calibrate with.
    distinct = rng.permutation(600).astype(np.int32) * 3
    f = np.asarray(E.shape_fitness(jnp.asarray(distinct), levels)).astype(np.float64)
    assert np.mean(f * f) == pytest.approx(E.fitness_second_moment(300, levels))


@pytest.mark.parametrize("levels", [3, 15])
def test_wide_vote_equals_dense_sum(levels):
    """Bit planes of |F| through int8 GEMMs == the plain int64 sum_k F_k A_k B_k^T, at the extremes too."""
    shape = M.ModelShape(16, 8, 2)
    spec = E.EggrollSpec(shape, population=40, rank=2, fitness_levels=levels)
    noise = E.make_noise(spec, 3, 1, jnp.arange(20, dtype=jnp.int32))
    noise[("head",)] = (jnp.full_like(noise[("head",)][0], -127), jnp.full_like(noise[("head",)][1], 127))
    fitness = np.random.default_rng(0).integers(-levels, levels + 1, 20).astype(np.int32)
    fitness[:5] = levels
    z = E.vote(noise, jnp.asarray(fitness), levels)
    for path, (a, b) in noise.items():
        axis = E.pair_axis(path)
        a, b = np.moveaxis(np.asarray(a, np.int64), axis, 0), np.moveaxis(np.asarray(b, np.int64), axis, 0)
        if M.is_matrix(path):   # (P, [L,] r, out) x (P, [L,] r, n)
            want = np.einsum("p,p...ro,p...rn->...on", fitness.astype(np.int64), a, b)
        else:
            want = np.einsum("p,p...,p...->...", fitness.astype(np.int64), a, b)
        np.testing.assert_array_equal(np.asarray(z[path], np.int64), want, err_msg=str(path))


@pytest.mark.parametrize("optimizer", ["sign", "momentum"])
def test_ranked_votes_do_not_depend_on_chunking(optimizer):
    """Ranks are over the whole population: chunks of 4 give the votes of one chunk, bit for bit."""
    shape = M.ModelShape(64, 32, 1)
    params = M.init_params(shape, 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (8, 9)).astype(np.int32))
    out = []
    for chunk in (0, 4):
        spec = E.EggrollSpec(shape, population=16, chunk_size=chunk, fitness_levels=7)
        out.append(jax.jit(lambda p, s, t: E.population_votes(spec, p, s, t, 3, 1))(
            params, M.init_state(shape, 16), tokens))
    for a, b in zip(jax.tree_util.tree_leaves(out[0]), jax.tree_util.tree_leaves(out[1])):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# The momentum rule against its NumPy twin
# ---------------------------------------------------------------------------

def np_round_shift(x, s):
    x = np.asarray(x, np.int64)
    return x if s == 0 else np.sign(x) * ((np.abs(x) + (1 << (s - 1))) >> s)


def np_momentum_step(z, m, master, eta, zshift, beta, fbits):
    """One step of optim.momentum for one parameter, in int64 NumPy, straight from its docstring."""
    from int_lm.optim import momentum as MO
    zhat = np.clip(np_round_shift(z, zshift), -MO.ZMAX, MO.ZMAX)
    m = m - np_round_shift(m, beta) + zhat if beta else zhat
    dw = np_round_shift(np.clip(m, -MO.MMAX, MO.MMAX) * eta, MO.ETA_BITS)
    half = (1 << fbits) >> 1
    master = np.clip(master + dw, -127 * (1 << fbits) - half, 127 * (1 << fbits) + half - 1)
    w = np.clip((master + half) >> fbits, -127, 127)
    return m, master, w


def momentum_es(**kw):
    return C.ESConfig(optimizer="momentum", population=kw.pop("population", 4096), **kw)


@pytest.mark.parametrize("beta,fbits,levels", [(2, 8, 1), (0, 8, 7), (3, 4, 3), (8, 0, 1)])
def test_momentum_update_equals_numpy_twin(beta, fbits, levels):
    """Bit-exact over several steps on random votes, including saturated votes (|Z| ~ 2^30)."""
    from int_lm.optim import momentum as MO
    es = momentum_es(momentum_shift=beta, master_bits=fbits, fitness_levels=levels, lr=2.0)
    rule = O.make(es)
    shape = M.ModelShape(16, 8, 1)
    params = M.init_params(shape, 1)
    state = rule.init(params)
    update = jax.jit(rule.update)
    rng = np.random.default_rng(beta * 10 + fbits)
    sig_m, sig_v = O.base.vote_sigmas(es.population, es.rank, levels)
    np_params = {p: np.asarray(M.get_leaf(params, p), np.int64) for p, _, _ in M.param_leaves(shape)}
    np_m = {p: np.zeros_like(v) for p, v in np_params.items()}
    np_master = {p: v << fbits for p, v in np_params.items()}
    for step in range(6):
        votes, np_z = {}, {}
        for path, shp, matrix in M.param_leaves(shape):
            sigma = sig_m if matrix else sig_v
            z = np.rint(rng.standard_normal(shp) * sigma * (1 + 3 * (step == 2))).astype(np.int64)
            z.flat[0], z.flat[-1] = 2 ** 30 + 5, -(2 ** 30) - 5   # saturated votes (exact sum beyond int32)
            np_z[path] = np.clip(z, -(2 ** 30 - 2 ** 20), 2 ** 30 - 2 ** 20 - 1)   # what vote_value returns
            z = np.asarray(z)
            votes[path] = (jnp.asarray(z >> E.CARRY_BITS, jnp.int32), jnp.asarray(z & ((1 << E.CARRY_BITS) - 1), jnp.int32))
        hyper, _ = rule.schedule(step)
        params, state, stats = update(state, params, votes, {k: np.int32(v) for k, v in hyper.items()})
        for path, _, matrix in M.param_leaves(shape):
            kind = "matrix" if matrix else "vector"
            got_z = np.asarray(E.vote_value(*votes[path]), np.int64)
            np.testing.assert_array_equal(np.sign(got_z), np.sign(np_z[path]))
            np_m[path], np_master[path], w = np_momentum_step(
                got_z, np_m[path], np_master[path], hyper[f"eta_{kind}"],
                MO.vote_shift(sig_m if matrix else sig_v), beta, fbits)
            np.testing.assert_array_equal(np.asarray(M.get_leaf(state["momentum"], path)), np_m[path])
            np.testing.assert_array_equal(np.asarray(M.get_leaf(state["master"], path)), np_master[path])
            np.testing.assert_array_equal(np.asarray(M.get_leaf(params, path)), w)
            np_params[path] = w
        assert M.get_leaf(state["master"], ("head",)).dtype == jnp.int16
        assert M.get_leaf(state["momentum"], ("head",)).dtype == jnp.int32


def test_momentum_worst_case_stays_in_bounds():
    """Every vote saturated in one direction for many steps: momentum, master and weights hit their
    bounds exactly and never wrap (the bounds of the module docstring)."""
    from int_lm.optim import momentum as MO
    es = momentum_es(momentum_shift=MO.MAX_MOMENTUM_SHIFT, master_bits=MO.MAX_MASTER_BITS, lr=4.0)
    rule = O.make(es)
    shape = M.ModelShape(16, 8, 1)
    params = M.init_params(shape, 0)
    state = rule.init(params)
    update = jax.jit(rule.update)
    for step in range(3000):
        sign = 1 if step < 2000 else -1
        votes = {p: (jnp.full(s, sign * 2 ** 10, jnp.int32), jnp.zeros(s, jnp.int32)) for p, s, _ in M.param_leaves(shape)}
        hyper, _ = rule.schedule(step)
        assert 0 <= hyper["eta_matrix"] <= MO.ETA_MAX
        params, state, _ = update(state, params, votes, {k: np.int32(v) for k, v in hyper.items()})
        if step in (1999, 2999):
            m = np.asarray(M.get_leaf(state["momentum"], ("head",)), np.int64)
            master = np.asarray(M.get_leaf(state["master"], ("head",)), np.int64)
            w = np.asarray(M.get_leaf(params, ("head",)))
            assert (np.sign(m) == sign).all() and np.abs(m).max() < 2 ** 31
            assert (w == sign * 127).all(), w
            assert (master == (32639 if sign > 0 else -32640)).all()


def test_momentum_settings_out_of_bounds_are_refused():
    for key, value in [("momentum_shift", 9), ("master_bits", 9), ("lr", 0.0), ("lr", 5.0), ("lr_power", -1.0)]:
        cfg = C.apply_values(C.Config(), {"es": {"optimizer": "momentum", key: value}}, "test")
        with pytest.raises(C.ConfigError, match=f"es.{key}"):
            C.validate(cfg)


@pytest.mark.parametrize("optimizer", ["sign", "momentum"])
def test_step_and_update_are_integers_only(optimizer):
    """The population step with ranked fitness and each rule's update: no float in jaxpr or HLO."""
    from integer_only import assert_integer_only
    shape = M.ModelShape(32, 16, 1)
    spec = E.EggrollSpec(shape, population=8, fitness_levels=7)
    params = M.init_params(shape, 0)
    tokens = jnp.ones((4, 5), jnp.int32)
    assert_integer_only(lambda p, s, t: E.population_votes(spec, p, s, t, 0, 0), params,
                        M.init_state(shape, 8), tokens)
    rule = O.make(momentum_es(population=8, fitness_levels=7) if optimizer == "momentum"
                  else C.ESConfig(population=8, fitness_levels=7))
    votes = E.zero_votes(spec)
    hyper = {k: np.int32(v) for k, v in rule.schedule(3)[0].items()}
    assert_integer_only(rule.update, rule.init(params), params, votes, hyper)
