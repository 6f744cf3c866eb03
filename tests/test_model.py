"""EGG forward pass: bit-exact against the NumPy reference, overflow-free, float-free."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from int_lm import model as M
import reference as ref
from integer_only import assert_integer_only


def random_params(shape, seed, full_range=False):
    """Spec init, or (full_range) every parameter uniform in [-127, 127]."""
    params = M.init_params(shape, seed)
    if not full_range:
        return params
    rng = np.random.default_rng(seed + 99)
    return jax.tree_util.tree_map(
        lambda p: jnp.asarray(rng.integers(-127, 128, p.shape).astype(np.int8)), params)


def random_tokens(rng, batch, length, vocab, boundary, p_boundary=0.05):
    toks = rng.integers(0, vocab, (batch, length + 1))
    toks[rng.random(toks.shape) < p_boundary] = boundary
    return toks.astype(np.int32)


def run_both(shape, params, tokens, state=None):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    batch = tokens.shape[0]
    st = M.init_state(shape, batch) if state is None else state
    fwd = jax.jit(lambda p, s, i, t: M.forward(p, s, i, t, shape.boundary_token, return_logits=True))
    ll, final, logits = fwd(params, st, jnp.asarray(inputs), jnp.asarray(targets))
    r = ref.Reference(jax.tree_util.tree_map(np.asarray, params), shape.boundary_token)
    for b in range(batch):
        init = None if state is None else [np.asarray(state[l, b]) for l in range(shape.layers)]
        r_ll, r_logits, r_state = r.run(inputs[b], targets[b], init)
        np.testing.assert_array_equal(np.asarray(logits[b]), r_logits)
        np.testing.assert_array_equal(np.asarray(ll[b]), r_ll)
        np.testing.assert_array_equal(np.asarray(final[:, b]), r_state)
    return ll, final


@pytest.mark.parametrize("vocab,width,layers,batch,full", [
    (256, 256, 6, 2, False),   # the paper's model
    (256, 256, 2, 2, True),
    (37, 96, 2, 3, True),      # small, non-square, non power-of-two widths
    (300, 128, 3, 2, False),   # 4D = 512: division by 16 * isqrt(n)
])
def test_forward_matches_reference(vocab, width, layers, batch, full):
    shape = M.ModelShape(vocab, width, layers, boundary_token=vocab - 1)
    params = random_params(shape, seed=width + layers, full_range=full)
    rng = np.random.default_rng(layers)
    tokens = random_tokens(rng, batch, 64, vocab, shape.boundary_token)
    run_both(shape, params, tokens)


def test_state_carries_across_calls_and_resets_at_boundary():
    shape = M.ModelShape(256, 64, 2)
    params = random_params(shape, 3)
    rng = np.random.default_rng(0)
    tokens = random_tokens(rng, 2, 40, 256, 0, p_boundary=0.0)
    tokens[:, 0] = 1
    fwd = jax.jit(lambda s, i, t: M.forward(params, s, i, t, 0))
    whole_ll, whole_state = fwd(M.init_state(shape, 2), tokens[:, :-1], tokens[:, 1:])
    ll1, st = fwd(M.init_state(shape, 2), tokens[:, :20], tokens[:, 1:21])
    ll2, st2 = fwd(st, tokens[:, 20:40], tokens[:, 21:41])
    np.testing.assert_array_equal(np.concatenate([ll1, ll2], 1), whole_ll)
    np.testing.assert_array_equal(st2, whole_state)
    # A boundary token makes what follows independent of what came before.
    a = tokens.copy(); b = tokens.copy()
    b[:, :10] = rng.integers(1, 256, (2, 10))
    a[:, 10] = b[:, 10] = 0
    ll_a, _ = fwd(M.init_state(shape, 2), a[:, :-1], a[:, 1:])
    ll_b, _ = fwd(M.init_state(shape, 2), b[:, :-1], b[:, 1:])
    np.testing.assert_array_equal(np.asarray(ll_a)[:, 10:], np.asarray(ll_b)[:, 10:])
    assert not np.array_equal(np.asarray(ll_a)[:, :10], np.asarray(ll_b)[:, :10])


@pytest.mark.parametrize("vocab,width", [(256, 1024), (65536, 256), (65536, 1024)])
def test_worst_case_inputs_do_not_overflow(vocab, width):
    """Every weight and activation at +127 / -127 (and mixed) equals the int64 reference."""
    shape = M.ModelShape(vocab, width, 1, boundary_token=vocab - 1)
    shapes = M.param_shapes(shape)
    for fill in (127, -127, "mixed"):
        def make(s):
            if fill == "mixed":
                return jnp.asarray(np.where(np.indices(s).sum(0) % 2 == 0, 127, -127).astype(np.int8))
            return jnp.full(s, fill, jnp.int8)
        params = jax.tree_util.tree_map(make, shapes, is_leaf=lambda x: isinstance(x, tuple))
        state = jnp.full((1, 2, width), 127 if fill != -127 else -127, jnp.int8)
        tokens = np.array([[1, 2, 3], [vocab - 2, 5, 1]], np.int32)
        run_both(shape, params, tokens, state=state)


def test_param_count_of_paper_model():
    shape = M.ModelShape(256, 256, 6)
    assert M.param_count(shape) == 4_856_064
    params = M.init_params(shape, 0)
    assert sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params)) == 4_856_064
    assert all(p.dtype == jnp.int8 for p in jax.tree_util.tree_leaves(params))


def test_init_follows_spec_and_is_deterministic():
    shape = M.ModelShape(256, 256, 2)
    p1, p2 = M.init_params(shape, 5), M.init_params(shape, 5)
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(p1["embed"], M.init_params(shape, 6)["embed"])
    assert (np.asarray(p1["layers"]["ln1"]) == 16).all() and (np.asarray(p1["ln_out"]) == 16).all()
    assert (np.asarray(p1["layers"]["bf"]) == 0).all()
    w = np.asarray(p1["layers"]["Wf"]).astype(np.float64)
    assert abs(w.std() - 16) < 0.2 and abs(w.mean()) < 0.2 and np.abs(w).max() <= 127
    # Same seed, same logits.
    toks = jnp.ones((2, 8), jnp.int32)
    f = lambda p: M.forward(p, M.init_state(shape, 2), toks, toks, 0)[0]
    np.testing.assert_array_equal(f(p1), f(p2))


@pytest.mark.parametrize("table", ["head", "embed"])
def test_init_std_scales_only_its_table_from_the_same_draws(table):
    """model.head_init_std / model.embed_init_std: the table is round(s N(0,1)) from the draws the spec's
    16 uses; every other weight is the default's, bit for bit; s = 0 is a zero table; the config refuses
    s outside [0, 64]."""
    key = f"{table}_init_std"
    base = M.init_params(M.ModelShape(256, 64, 1), 3)
    for s in (0.0, 4.0, 16.0):
        p = M.init_params(M.ModelShape(256, 64, 1, **{key: s}), 3)
        for path in {"embed", "head", "ln_out"} - {table}:
            np.testing.assert_array_equal(p[path], base[path])
        for name, w in p["layers"].items():
            np.testing.assert_array_equal(w, base["layers"][name])
        got = np.asarray(p[table]).astype(np.float64)
        if s == 0:
            assert (got == 0).all()
            continue
        assert abs(got.std() - s) < 0.05 * s and np.abs(got).max() <= 127
        # Same draws: the default table is round(16 z), this one round(s z), so they agree to the rounding.
        assert np.abs(got - np.asarray(base[table]).astype(np.float64) * s / 16).max() <= 0.5 + s / 32
    np.testing.assert_array_equal(M.init_params(M.ModelShape(256, 64, 1, **{key: 16.0}), 3)[table], base[table])
    from int_lm import config as C
    with pytest.raises(C.ConfigError, match=f"model.{key}"):
        C.validate(C.apply_values(C.load_file("tiny"), {"model": {key: -1.0}}, "test"))


def test_forward_has_no_floating_point_anywhere():
    shape = M.ModelShape(256, 64, 2)
    params = M.init_params(shape, 0)
    toks = jnp.ones((2, 8), jnp.int32)
    fn = lambda p, s, i, t: M.forward(p, s, i, t, 0)
    assert_integer_only(fn, params, M.init_state(shape, 2), toks, toks)


def test_tied_head_is_the_untied_model_with_head_equal_to_embed():
    """model.tie_head: no head parameter; every other weight is the untied model's (same seed), and the
    forward pass equals the untied model's with head := embed, bit for bit."""
    untied, tied = M.ModelShape(48, 16, 2), M.ModelShape(48, 16, 2, tie_head=True)
    p_u, p_t = M.init_params(untied, 5), M.init_params(tied, 5)
    assert "head" not in p_t and "head" not in M.param_shapes(tied)
    assert [p for p, _, _ in M.param_leaves(tied)] == [p for p, _, _ in M.param_leaves(untied) if p != ("head",)]
    assert M.param_count(untied) - M.param_count(tied) == 48 * 16
    for a, b in zip(jax.tree_util.tree_leaves({k: v for k, v in p_u.items() if k != "head"}),
                    jax.tree_util.tree_leaves(p_t)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens = np.random.default_rng(0).integers(0, 48, (3, 12)).astype(np.int32)
    ll_t, st_t = M.forward(p_t, M.init_state(tied, 3), tokens[:, :-1], tokens[:, 1:], 0)
    ll_u, st_u = M.forward({**p_u, "head": p_u["embed"]}, M.init_state(untied, 3), tokens[:, :-1], tokens[:, 1:], 0)
    np.testing.assert_array_equal(np.asarray(ll_t), np.asarray(ll_u))
    np.testing.assert_array_equal(np.asarray(st_t), np.asarray(st_u))
    r_ll, _, _ = ref.Reference(jax.tree_util.tree_map(np.asarray, p_t)).run(tokens[0, :-1], tokens[0, 1:])
    np.testing.assert_array_equal(np.asarray(ll_t[0]), r_ll)
