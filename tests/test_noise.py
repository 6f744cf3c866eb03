"""The counter-based int8 noise (int_lm/noise.py) against an independent reference of
docs/integer-spec.md §4.2: the hash in plain Python integers, the magnitude by a binary
search over a table built from erf (tests/reference.py), the parameter ids and element order of the EGGROLL
streams; then its distribution, determinism and layouts."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from int_lm import eggroll as E
from int_lm import model as M
from int_lm import noise as nz
from reference import MASK, spec_mix32, spec_table, spec_value

def test_mix32_equals_the_spec_on_edge_and_random_words():
    words = [0, 1, 2 ** 16, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 0x9E3779B9, 0x5EED1234]
    words += np.random.default_rng(0).integers(0, 2 ** 32, 2000, dtype=np.uint64).tolist()
    got = np.asarray(nz.mix32(jnp.asarray(np.array(words, np.uint64).astype(np.uint32))))
    assert got.dtype == np.uint32
    assert got.tolist() == [spec_mix32(w) for w in words]


def test_magnitude_table_equals_the_spec():
    assert nz.magnitude_thresholds().tolist() == spec_table()


@pytest.mark.parametrize("seed,epoch,param_id,pairs,offset", [
    (0, 0, 0, [0, 1, 2, 3], 0),
    (1234, 7, 12, [5, 2047, 2 ** 19 - 1], 1000),
    (2 ** 31 - 1, 2 ** 31 - 1, 4, [0, 2 ** 30], 2 ** 32 - 40),    # the last indices of a uint32 stream
    (2 ** 32 - 1, 3, 1, [1], 5),                                  # the largest train.seed
])
def test_pair_noise_equals_the_spec_value_by_value(seed, epoch, param_id, pairs, offset):
    table = spec_table()
    got = np.asarray(nz.pair_noise(seed, epoch, jnp.asarray(pairs, jnp.int32), param_id, (40,), offset=offset))
    want = [[spec_value(table, seed, epoch, k, param_id, (offset + i) & MASK) for i in range(40)] for k in pairs]
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, np.array(want, np.int8))


def test_a_tail_value_follows_the_spec():
    """The crowded tail (|V| >= 65, an exact per-value table in the code): values found by search."""
    table, hits = spec_table(), []
    rng = np.random.default_rng(1)
    # P(|V| >= 65) ~ 5e-5 per draw: a couple of hundred in 2^22 draws
    vals = np.asarray(nz.pair_noise(3, 1, jnp.array([9], jnp.int32), 5, (2 ** 22,)))[0]
    tail = np.nonzero(np.abs(vals.astype(np.int32)) >= 65)[0]
    assert len(tail) > 50
    for i in rng.choice(tail, 40, replace=False).tolist() + tail[:10].tolist():
        hits.append((int(vals[i]), spec_value(table, 3, 1, 9, 5, i)))
    assert all(a == b for a, b in hits), hits


def test_eggroll_streams_use_the_spec_parameter_ids_and_element_order():
    """Parameter ids 0 embed, 1 head, 2 ln_out, then the layer arrays by name; A's elements, then B's,
    in ([L,] r, .) order; vectors a then b (docs/integer-spec.md §4.2)."""
    ids = ["embed", "head", "ln_out", "Uf", "Uh", "Wf", "Wh", "bf", "bh", "down", "ln1", "ln2", "up"]
    shape = M.ModelShape(16, 8, 2)
    spec = E.EggrollSpec(shape, population=4, rank=2)
    pairs = [0, 1]
    noise = E.make_noise(spec, 11, 3, jnp.asarray(pairs, jnp.int32))
    table = spec_table()
    assert [path[-1] for path, _, _ in M.param_leaves(shape)] == ids
    for path, (a, b) in noise.items():
        pid = ids.index(path[-1])
        a, b = np.asarray(a), np.asarray(b)
        if path[0] == "layers":                       # layers first: (L, P, ...) -> (P, L, ...)
            a, b = np.moveaxis(a, 1, 0), np.moveaxis(b, 1, 0)
        for k_i, k in enumerate(pairs):
            stream = np.concatenate([a[k_i].ravel(), b[k_i].ravel()])
            for i in list(range(6)) + [a[k_i].size - 1, a[k_i].size, stream.size - 1]:
                assert stream[i] == spec_value(table, 11, 3, k, pid, i), (path, k, i)


def test_noise_parts_and_layouts_are_one_stream():
    """A stream drawn whole, in parts (offset) or layers first (pair_axis=1) gives the same values."""
    pairs = jnp.arange(3, dtype=jnp.int32)
    whole = np.asarray(nz.pair_noise(4, 1, pairs, 7, (2 * 5 * 6,)))
    first = np.asarray(nz.pair_noise(4, 1, pairs, 7, (2, 5, 2)))
    rest = np.asarray(nz.pair_noise(4, 1, pairs, 7, (2, 5, 4), offset=20))
    np.testing.assert_array_equal(first.reshape(3, -1), whole[:, :20])
    np.testing.assert_array_equal(rest.reshape(3, -1), whole[:, 20:])
    layers_first = np.asarray(nz.pair_noise(4, 1, pairs, 7, (2, 5, 4), offset=20, pair_axis=1))
    assert layers_first.shape == (2, 3, 5, 4)
    np.testing.assert_array_equal(np.moveaxis(layers_first, 1, 0), rest)


def test_noise_is_deterministic_and_counter_based():
    x1 = np.asarray(nz.pair_noise(1, 2, jnp.arange(4, dtype=jnp.int32), 5, (1000,)))
    x2 = np.asarray(nz.pair_noise(1, 2, jnp.arange(4, dtype=jnp.int32), 5, (1000,)))
    np.testing.assert_array_equal(x1, x2)
    # Pair 2 alone gives the same values as pair 2 inside a batch (no hidden state).
    x3 = np.asarray(nz.pair_noise(1, 2, jnp.array([2], jnp.int32), 5, (1000,)))
    np.testing.assert_array_equal(x3[0], x1[2])
    for other in [(2, 2, 5), (1, 3, 5), (1, 2, 6)]:
        y = np.asarray(nz.pair_noise(other[0], other[1], jnp.arange(4, dtype=jnp.int32), other[2], (1000,)))
        assert (y != x1).mean() > 0.9
    assert nz.magnitude_thresholds().nbytes <= 1024


def test_noise_distribution():
    x = np.asarray(nz.pair_noise(0, 0, jnp.arange(64, dtype=jnp.int32), 0, (32768,))).astype(np.float64).ravel()
    assert x.dtype == np.float64 and len(x) == 2 ** 21
    assert abs(x.mean()) < 0.05
    assert abs(x.std() - 16.0) < 0.05
    assert np.abs(x).max() <= 127
    # Symmetric, and each small value has the probability of round(16 N(0,1)).
    values, counts = np.unique(x, return_counts=True)
    freq = dict(zip(values.astype(int), counts / len(x)))
    for v in range(0, 40, 3):
        p = 0.5 * (math.erf((v + 0.5) / 16 / math.sqrt(2)) - math.erf((v - 0.5) / 16 / math.sqrt(2)))
        assert abs(freq.get(v, 0) - p) < 6 * math.sqrt(p / len(x)) + 1e-6, v
        assert abs(freq.get(v, 0) - freq.get(-v, 0)) < 6 * math.sqrt(p / len(x)) + 1e-6
    # The clipped tail: P(|V| = 127) = P(|16 Z| >= 126.5), ~3e-15: nothing lands there at this size.
    assert freq.get(127, 0) == 0


def test_noise_tables_equal_a_search_over_the_thresholds():
    """The lookup-table sampler is exactly max{m : T[m] <= u} for every kind of u, tail included."""
    bucket, tail_start, tail = nz.magnitude_tables()
    assert bucket.nbytes + tail.nbytes + nz.magnitude_thresholds().nbytes < 2 ** 20  # no table over 1 MiB
    t = nz.magnitude_thresholds().astype(np.int64)
    rng = np.random.default_rng(0)
    u = np.concatenate([
        rng.integers(0, 2 ** 32, 500_000, dtype=np.uint64),
        np.arange(tail_start - 1000, 2 ** 31, dtype=np.uint64),            # the whole positive tail
        np.arange(2 ** 31 + tail_start - 1000, 2 ** 32, dtype=np.uint64),  # and the negative one
        t[1:].astype(np.uint64), (t[1:] - 1).astype(np.uint64),           # every threshold edge
    ]).astype(np.uint32)
    got = np.asarray(jax.jit(nz.bits_to_int8)(jnp.asarray(u)))
    mag = np.searchsorted(t, (u & 0x7FFFFFFF).astype(np.int64), side="right") - 1
    np.testing.assert_array_equal(got, np.where(u >> 31, -mag, mag))
