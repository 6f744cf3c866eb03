"""EGGROLL: low-rank perturbations vs dense NumPy, votes, thresholds, exact sums (the noise itself:
tests/test_noise.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from int_lm import eggroll as E
from int_lm import model as M
import reference as ref


def dense(a, b):
    """Dense perturbation sum_r A[r]^T B[r]: (r, out), (r, n) -> (out, n) int64."""
    return np.asarray(a, np.int64).T @ np.asarray(b, np.int64)


@pytest.mark.parametrize("rank,sigma_shift,tie_head", [(1, 4, False), (2, 4, False), (4, 0, False), (1, 4, True)])
def test_perturbed_forward_equals_dense_reference(rank, sigma_shift, tie_head):
    """Tied: the embedding's one low-rank perturbation serves the lookup and the head."""
    shape = M.ModelShape(64, 32, 2, boundary_token=0, tie_head=tie_head)
    spec = E.EggrollSpec(shape, population=6, rank=rank, sigma_shift=sigma_shift)
    params = M.init_params(shape, 1)
    noise = E.make_noise(spec, 7, 3, jnp.arange(3, dtype=jnp.int32))
    mparams, factors = E.member_model_inputs(spec, params, noise)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (6, 17)).astype(np.int32)
    tokens[:, 9] = 0
    ll, states = jax.jit(lambda mp, f: M.forward(mp, M.init_state(shape, 6), tokens[:, :-1], tokens[:, 1:], 0,
                                                 f, spec.matrix_shift))(mparams, factors)
    np_params = jax.tree_util.tree_map(np.asarray, params)
    for member in range(6):
        pair, sign = member // 2, (1 if member % 2 == 0 else -1)
        pert = {"layers": None}
        layer_dense = {}
        for path, (a, b) in noise.items():
            axis = E.pair_axis(path)  # noise is layers first: (L, P, ...)
            a, b = np.take(np.asarray(a), pair, axis=axis), np.take(np.asarray(b), pair, axis=axis)
            if not M.is_matrix(path):
                continue
            if path[0] == "layers":
                layer_dense[path[1]] = [sign * dense(a[l], b[l]) for l in range(shape.layers)]
            else:
                pert[path[0]] = sign * dense(a, b)
        pert.update(layer_dense)
        del pert["layers"]
        pert["vectors"] = {k: np.asarray(mparams["layers"][k])[:, member] for k in M.LAYER_VECTORS}
        pert["ln_out"] = np.asarray(mparams["ln_out"])[member]
        r = ref.Reference(np_params, 0, pert=pert, shift=spec.matrix_shift)
        r_ll, _, r_state = r.run(tokens[member, :-1], tokens[member, 1:])
        np.testing.assert_array_equal(np.asarray(ll[member]), r_ll)
        np.testing.assert_array_equal(np.asarray(states[:, member]), r_state)


def test_vector_perturbation_follows_spec():
    shape = M.ModelShape(16, 8, 1)
    spec = E.EggrollSpec(shape, population=4)
    params = M.init_params(shape, 0)
    noise = E.make_noise(spec, 0, 0, jnp.arange(2, dtype=jnp.int32))
    mparams, factors = E.member_model_inputs(spec, params, noise)
    a, b = (np.asarray(x, np.int64) for x in noise[("ln_out",)])
    for member in range(4):
        sign = 1 if member % 2 == 0 else -1
        want = np.clip(16 + ((sign * a[member // 2] * b[member // 2]) >> spec.vector_shift), -127, 127)
        np.testing.assert_array_equal(np.asarray(mparams["ln_out"])[member], want)
    # Matrices: one (A, B) per pair, unchanged; the model puts -A on the odd member.
    am, bm = factors["head"]
    np.testing.assert_array_equal(np.asarray(am), np.asarray(noise[("head",)][0]))
    np.testing.assert_array_equal(np.asarray(bm), np.asarray(noise[("head",)][1]))


@pytest.mark.parametrize("n", [64, 4096])
def test_pair_factors_equal_mirrored_per_row_factors(n):
    """Factors per antithetic pair (row 2k: +A, row 2k+1: -A) equal explicit per-row factors, bit for bit,
    in matmul (both the direct and the split overflow-safe path) and in the embedding."""
    rng = np.random.default_rng(n)
    pairs, rank, out, shift = 3, 2, 8, 5
    u = rng.integers(-127, 128, (2 * pairs, n)).astype(np.int8)
    u[:2] = 127  # worst case magnitudes in the first pair
    w = rng.integers(-127, 128, (out, n)).astype(np.int8)
    a = rng.integers(-127, 128, (pairs, rank, out)).astype(np.int8)
    b = rng.integers(-127, 128, (pairs, rank, n)).astype(np.int8)
    a[0], b[0] = 127, 127
    a_rows = np.repeat(a, 2, axis=0) * np.tile([1, -1], pairs)[:, None, None].astype(np.int8)
    b_rows = np.repeat(b, 2, axis=0)
    got = np.asarray(M.matmul(jnp.asarray(u), jnp.asarray(w), (jnp.asarray(a), jnp.asarray(b)), shift))
    per_row = np.asarray(M.matmul(jnp.asarray(u), jnp.asarray(w), (jnp.asarray(a_rows), jnp.asarray(b_rows)), shift))
    np.testing.assert_array_equal(got, per_row)
    for i in range(2 * pairs):
        np.testing.assert_array_equal(got[i], ref.matmul(u[i], w, dense(a_rows[i], b_rows[i]), shift))
    vocab, d = 16, 8
    table = rng.integers(-127, 128, (vocab, d)).astype(np.int8)
    tokens = rng.integers(0, vocab, 2 * pairs).astype(np.int32)
    ea = rng.integers(-127, 128, (pairs, rank, vocab)).astype(np.int8)
    eb = rng.integers(-127, 128, (pairs, rank, d)).astype(np.int8)
    ea_rows = np.repeat(ea, 2, axis=0) * np.tile([1, -1], pairs)[:, None, None].astype(np.int8)
    got = np.asarray(M.embed(jnp.asarray(table), jnp.asarray(tokens), (jnp.asarray(ea), jnp.asarray(eb)), 3))
    for i in range(2 * pairs):
        want = np.clip(table[tokens[i]].astype(np.int64) + (dense(ea_rows[i], np.repeat(eb, 2, axis=0)[i])[tokens[i]] >> 3),
                       -127, 127)
        np.testing.assert_array_equal(got[i], want)
    with pytest.raises(ValueError, match="cannot serve"):
        M.matmul(jnp.asarray(u[:5]), jnp.asarray(w), (jnp.asarray(a), jnp.asarray(b)), shift)


@pytest.mark.parametrize("n", [256, 1024, 4096])
def test_lowrank_matmul_worst_case_exact(n):
    """u, A, B at +-127 with n up to 4096: the split path must equal int64 dense math."""
    out, batch, rank, shift = 8, 3, 2, 5
    for sign in (1, -1):
        u = np.full((batch, n), 127, np.int8)
        w = np.full((out, n), 127 * sign, np.int8)
        a = np.full((batch, rank, out), 127 * sign, np.int8)
        b = np.full((batch, rank, n), 127, np.int8)
        got = np.asarray(M.matmul(jnp.asarray(u), jnp.asarray(w), (jnp.asarray(a), jnp.asarray(b)), shift))
        for i in range(batch):
            want = ref.matmul(u[i], w, dense(a[i], b[i]), shift)
            np.testing.assert_array_equal(got[i], want)
    rng = np.random.default_rng(n)
    u = rng.integers(-127, 128, (batch, n)).astype(np.int8)
    w = rng.integers(-127, 128, (out, n)).astype(np.int8)
    a = rng.integers(-127, 128, (batch, rank, out)).astype(np.int8)
    b = rng.integers(-127, 128, (batch, rank, n)).astype(np.int8)
    got = np.asarray(M.matmul(jnp.asarray(u), jnp.asarray(w), (jnp.asarray(a), jnp.asarray(b)), 4))
    for i in range(batch):
        np.testing.assert_array_equal(got[i], ref.matmul(u[i], w, dense(a[i], b[i]), 4))


def test_vote_equals_dense_sum_over_members():
    shape = M.ModelShape(32, 16, 2)
    spec = E.EggrollSpec(shape, population=20, rank=2)
    noise = E.make_noise(spec, 3, 1, jnp.arange(10, dtype=jnp.int32))
    fitness = jnp.asarray(np.random.default_rng(0).integers(-1, 2, 10), jnp.int32)
    z = E.vote(noise, fitness)
    f = np.asarray(fitness)
    for path, (a, b) in noise.items():
        a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
        if M.is_matrix(path):
            if path[0] == "layers":  # (L, P, r, .)
                want = np.stack([sum(f[k] * dense(a[l, k], b[l, k]) for k in range(10)) for l in range(2)])
            else:
                want = sum(f[k] * dense(a[k], b[k]) for k in range(10))
        elif path[0] == "layers":  # (L, P, D)
            want = np.einsum("k,lk...->l...", f, a * b)
        else:
            want = np.einsum("k,k...->...", f, a * b)
        np.testing.assert_array_equal(np.asarray(z[path]), want)


def test_vote_accumulation_is_exact_up_to_population_2_20():
    """Worst case: 2^19 pairs all voting +127*127 (and mixed signs) in chunks of 2^14 pairs."""
    pairs, chunk_pairs = 2 ** 19, 2 ** 14
    per_chunk = jnp.array([chunk_pairs * 127 * 127, -chunk_pairs * 127 * 127, 1, -3], jnp.int32)
    acc = {("x",): (jnp.zeros(4, jnp.int32), jnp.zeros(4, jnp.int32))}
    add = jax.jit(E.accumulate)
    exact = np.zeros(4, np.int64)
    for c in range(pairs // chunk_pairs):
        z = per_chunk if c % 3 else per_chunk * jnp.array([1, 1, -1, 1], jnp.int32)
        acc = add(acc, {("x",): z})
        exact += np.asarray(z, np.int64)
    hi, lo = (np.asarray(v, np.int64) for v in acc[("x",)])
    np.testing.assert_array_equal(hi * 2 ** E.CARRY_BITS + lo, exact)
    value = np.asarray(E.vote_value(*acc[("x",)]))
    assert np.sign(value).tolist() == np.sign(exact).tolist()
    assert (np.abs(value[:2]) >= 2 ** 30 - 2 ** E.CARRY_BITS).all() and value[2:].tolist() == exact[2:].tolist()


def test_chunked_population_equals_one_chunk():
    shape = M.ModelShape(64, 32, 1)
    params = M.init_params(shape, 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (8, 9)).astype(np.int32))
    out = []
    for chunk in (0, 4):
        spec = E.EggrollSpec(shape, population=16, chunk_size=chunk)
        acc, scores, states = jax.jit(lambda p, s, t: E.population_votes(spec, p, s, t, 3, 1))(
            params, M.init_state(shape, 16), tokens)
        out.append((acc, scores, states))
    for a, b in zip(jax.tree_util.tree_leaves(out[0]), jax.tree_util.tree_leaves(out[1])):
        np.testing.assert_array_equal(a, b)


def test_limits_refuse_overflowing_settings():
    with pytest.raises(Exception, match="es.rank"):
        E.check_limits(E.EggrollSpec(M.ModelShape(256, 1024, 1), population=2, rank=64, sigma_shift=0))
    with pytest.raises(Exception, match="es.chunk_size"):
        E.check_limits(E.EggrollSpec(M.ModelShape(256, 64, 1), population=2 ** 20, chunk_size=2 ** 19))


def test_limits_refuse_large_rank_at_large_sigma_shift():
    # r * 127 * (2^shift - 1) >= 2^31 would overflow the split path's low sum.
    with pytest.raises(Exception, match="es.rank"):
        E.check_limits(E.EggrollSpec(M.ModelShape(256, 64, 1), population=2, rank=64, sigma_shift=12))
    E.check_limits(E.EggrollSpec(M.ModelShape(256, 64, 1), population=2, rank=16, sigma_shift=12))


