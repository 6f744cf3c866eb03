"""Counter-based int8 Gaussian noise: no state, no big tables, no floats on the device.

A value is a pure function of (seed, epoch, pair, parameter id, element index):
an integer hash (``mix32``, the "lowbias32" finaliser, uint32 wrap-around
arithmetic) gives 32 uniform bits, the top bit is the sign and the other 31
pick the magnitude by a 7-step binary search over 128 thresholds of the
distribution of |round(16 N(0,1))| clipped to 127 (a 512-byte table). The same
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


def bits_to_int8(bits):
    """Map uniform uint32 bits to int8 noise distributed as clip(round(16 N(0,1)))."""
    table = jnp.asarray(magnitude_thresholds())
    u31 = (bits & jnp.uint32(0x7FFFFFFF)).astype(jnp.int32)
    # First step against a scalar (a gather at a constant index would be
    # constant-folded over the whole array at compile time), then a binary search.
    mag = jnp.where(table[64] <= u31, 64, 0)
    for step in (32, 16, 8, 4, 2, 1):
        cand = mag + step
        mag = jnp.where(table[cand] <= u31, cand, mag)
    negative = (bits >> 31).astype(jnp.int32)
    return (mag * (1 - 2 * negative)).astype(jnp.int8)


def int8_noise(key, shape):
    """int8 Gaussian noise of ``shape`` from one 32-bit key (elements indexed 0..size-1)."""
    size = int(np.prod(shape))
    idx = jnp.arange(size, dtype=jnp.uint32)
    bits = mix32(key + idx * GOLDEN)
    return bits_to_int8(bits).reshape(shape)


def pair_noise(seed, epoch, pairs, param_id, shape):
    """Noise of ``shape`` for each pair in ``pairs`` (P,): returns (P, *shape) int8."""
    keys = stream_key(seed, epoch, pairs, param_id)  # (P,)
    size = int(np.prod(shape))
    idx = jnp.arange(size, dtype=jnp.uint32)
    bits = mix32(keys[:, None] + idx[None, :] * GOLDEN)
    return bits_to_int8(bits).reshape((keys.shape[0],) + tuple(shape))
