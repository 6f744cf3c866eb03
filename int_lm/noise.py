"""Counter-based int8 Gaussian noise: no state, no big tables, no floats on the device.

A value is a pure function of (seed, epoch, pair, parameter id, element index):
an integer hash (``mix32``, the "lowbias32" finaliser, uint32 wrap-around
arithmetic) gives 32 uniform bits, the top bit is the sign and the other 31
pick the magnitude against 128 thresholds of the distribution of
|round(16 N(0,1))| clipped to 127, through two lookup tables (160 KiB). The same
inputs give the same noise on every run, device and number of devices.
"""
from __future__ import annotations

import math
from functools import lru_cache

import jax.numpy as jnp
import numpy as np

GOLDEN = np.uint32(0x9E3779B9)
NOISE_SCALE = 16  # round(16 N(0,1)): one fixed-point unit of standard deviation


def mix32(x):
    """lowbias32 integer hash (uint32 in, uint32 out; full avalanche)."""
    x = x.astype(jnp.uint32)
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def stream_key(seed, epoch, pair, param_id):
    """A 32-bit key per (seed, epoch, pair, parameter); arguments may be arrays."""
    k = mix32(jnp.asarray(seed, jnp.uint32) ^ jnp.uint32(0x5EED1234))
    k = mix32(k ^ jnp.asarray(epoch, jnp.uint32))
    k = mix32(k ^ (jnp.asarray(param_id, jnp.uint32) * GOLDEN))
    return mix32(k + jnp.asarray(pair, jnp.uint32) * jnp.uint32(0x85EBCA6B))


@lru_cache(maxsize=None)
def magnitude_thresholds() -> np.ndarray:
    """T[m] = P(|V| < m) * 2^31 (rounded), V = round(16 Z) clipped to [-127, 127]; T[0] = 0.

    A uniform 31-bit u has magnitude max{m : T[m] <= u}, so P(|V| = m) is exact
    up to 2^-31 and all mass beyond 126.5/16 standard deviations lands on 127.
    Built once on the host (float64 erf); the device only compares integers.
    """
    m = np.arange(128)
    cdf = np.array([0.0] + [math.erf((k - 0.5) / NOISE_SCALE / math.sqrt(2)) for k in m[1:]])
    return np.minimum(np.rint(cdf * 2**31), 2**31 - 1).astype(np.int32)


BUCKET_BITS = 15  # the top 16 of the 31 magnitude bits index the bucket table


@lru_cache(maxsize=None)
def magnitude_tables() -> tuple[np.ndarray, int, np.ndarray]:
    """Lookup tables giving exactly max{m : T[m] <= u} for every 31-bit u (160 KiB in all).

    ``bucket[u >> 15]`` is the magnitude at the start of u's bucket of 2^15 values;
    all but the last few buckets contain at most one threshold, so one comparison
    with T[m + 1] finishes the job. The tail buckets (from ``tail_start``: |V| >= 65,
    probability ~5e-5), where thresholds crowd, get an exact per-value table.
    """
    t = magnitude_thresholds().astype(np.int64)
    n_buckets = 1 << (31 - BUCKET_BITS)
    starts = np.arange(n_buckets, dtype=np.int64) << BUCKET_BITS
    first = np.searchsorted(t, starts, side="right") - 1
    last = np.searchsorted(t, starts + (1 << BUCKET_BITS) - 1, side="right") - 1
    crowded = np.nonzero(last - first > 1)[0]
    tail_bucket = int(crowded[0]) if len(crowded) else n_buckets - 1
    tail_start = tail_bucket << BUCKET_BITS
    tail_values = np.arange(tail_start, 1 << 31, dtype=np.int64)
    tail = (np.searchsorted(t, tail_values, side="right") - 1).astype(np.int8)
    return first.astype(np.int8), tail_start, tail


def bits_to_int8(bits):
    """Map uniform uint32 bits to int8 noise distributed as clip(round(16 N(0,1))).

    The top bit is the sign; the other 31 pick the magnitude max{m : T[m] <= u}
    (see magnitude_thresholds) through two small tables and one comparison,
    exactly as a binary search over T would (tests/test_noise.py checks that).
    """
    bucket, tail_start, tail = (jnp.asarray(x) for x in magnitude_tables())
    t = jnp.asarray(magnitude_thresholds())
    u31 = (bits & jnp.uint32(0x7FFFFFFF)).astype(jnp.int32)
    mag = bucket[u31 >> BUCKET_BITS].astype(jnp.int32)
    mag = mag + (t[jnp.minimum(mag + 1, 127)] <= u31).astype(jnp.int32)
    in_tail = u31 >= tail_start
    mag = jnp.where(in_tail, tail[jnp.maximum(u31 - tail_start, 0)].astype(jnp.int32), mag)
    negative = (bits >> 31).astype(jnp.int32)
    return (mag * (1 - 2 * negative)).astype(jnp.int8)


def int8_noise(key, shape):
    """int8 Gaussian noise of ``shape`` from one 32-bit key (elements indexed 0..size-1)."""
    size = int(np.prod(shape))
    idx = jnp.arange(size, dtype=jnp.uint32)
    bits = mix32(key + idx * GOLDEN)
    return bits_to_int8(bits).reshape(shape)


def pair_noise(seed, epoch, pairs, param_id, shape, offset: int = 0, pair_axis: int = 0):
    """Noise of ``shape`` for each pair in ``pairs`` (P,), the pair axis at ``pair_axis``.

    Element ``i`` of ``shape`` (C order) is element ``offset + i`` of the pair's
    stream for ``param_id``, so a stream can be drawn in parts and in any layout:
    pair_axis=0 gives (P, *shape); pair_axis=1 with shape (L, ...) gives
    (L, P, ...), the same values with layers first. Each part is one fused loop
    that writes its output in order (slicing or transposing one big draw split
    it into several slow passes on CPU).
    """
    keys = stream_key(seed, epoch, pairs, param_id)  # (P,)
    shape = tuple(shape)
    idx = jnp.arange(offset, offset + int(np.prod(shape)), dtype=jnp.uint32).reshape(shape)
    key_shape = [1] * (len(shape) + 1)
    key_shape[pair_axis] = keys.shape[0]
    bits = mix32(keys.reshape(key_shape) + jnp.expand_dims(idx, pair_axis) * GOLDEN)
    return bits_to_int8(bits)
