"""Integer arithmetic of EGG: every op is int8 in, int32 inside, int8 (or int32) out.

Fixed point: an int8 value ``a`` stands for ``a / 16``. Every narrowing cast
saturates to [-127, 127] (``-128`` never appears). Division and right shifts
round toward minus infinity everywhere (``>>`` on signed ints and
``jnp.floor_divide`` both do). Each function's docstring states its worst-case
int32 magnitude; ``tests/test_intmath.py`` checks them with inputs at +-127.
"""
from __future__ import annotations

import math
from functools import lru_cache

import jax.numpy as jnp
import numpy as np
from jax import lax

INT8_MAX = 127
FRAC_BITS = 4
ONE = 1 << FRAC_BITS  # 1.0 in fixed point


def sat8(x):
    """Clip to [-127, 127] and narrow to int8."""
    return jnp.clip(x, -INT8_MAX, INT8_MAX).astype(jnp.int8)


def sat_add(*terms):
    """Saturating add of int8 tensors: sum in int32, one sat8 at the end."""
    total = terms[0].astype(jnp.int32)
    for t in terms[1:]:
        total = total + t.astype(jnp.int32)
    return sat8(total)


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def floor_div_const(x, divisor: int):
    """floor(x / divisor) for a static positive divisor: a shift when it is 2^k."""
    if is_pow2(divisor):
        return x >> (divisor.bit_length() - 1)
    return jnp.floor_divide(x, divisor)


def matmul_divisor(n: int) -> int:
    """The scaled matmul divides a length-n dot by 16 * isqrt(n) (2^(4+log2 sqrt n) for n = 4^k)."""
    return ONE * math.isqrt(n)


def dot_i32(u, w):
    """u (..., n) int8 times w (out, n) int8 transposed, accumulated in int32: (..., out).

    Worst case |u . w| = n * 127^2 < 2^26 for n <= 4096.
    """
    return lax.dot_general(u, w, (((u.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.int32)


def scaled_matmul(u, w, extra=None):
    """``sat8(floor((u . w^T [+ extra]) / (16 isqrt(n))))``, n = w.shape[1].

    ``extra`` is an int32 term added before the division (the low-rank
    perturbation of EGGROLL); without it nothing else is computed.
    """
    acc = dot_i32(u, w)
    if extra is not None:
        acc = acc + extra
    return sat8(floor_div_const(acc, matmul_divisor(w.shape[1])))


RECIP_BITS = 22


@lru_cache(maxsize=None)
def reciprocal_tables() -> tuple[np.ndarray, np.ndarray]:
    """ceil(2^22 / m) and floor(2^22 / m) for m in 0..127 (entry 0 unused): 1 KiB."""
    m = np.maximum(np.arange(128, dtype=np.int64), 1)
    up = -(-(1 << RECIP_BITS) // m)
    down = (1 << RECIP_BITS) // m
    return up.astype(np.int32), down.astype(np.int32)


def sat_div_small(x, m):
    """sat8(floor(x / m)) for int32 |x| <= 127^2 and per-row divisors m in [1, 127], without division.

    x is first clipped to [-128 m, 128 m] (the quotient saturates there anyway),
    then multiplied by ceil(2^22/m) (x >= 0) or floor(2^22/m) (x < 0) and
    shifted: the error stays below 1/m, so the floor is exact (checked for every
    x and m in tests/test_intmath.py), and |product| <= 2^29 + 2^14 fits int32.
    Integer division has no SIMD form on CPUs; this runs ~20x faster.
    """
    up, down = (jnp.asarray(t) for t in reciprocal_tables())
    x = jnp.clip(x, -128 * m, 128 * m)
    recip = jnp.where(x >= 0, up[m], down[m])
    return sat8((x * recip) >> RECIP_BITS)


def layer_norm(u, weight):
    """Square-root-free layer norm: ``sat8((u * w) // max(1, mean|u|))``.

    mean|u| is ``(sum |u|) >> log2(D)`` (a floor division when D is not 2^k), so
    it lies in [1, 127]; |u * w| <= 127^2, sum |u| <= 127 * D: no overflow for any
    D <= 2^24. ``weight`` is (D,) or per-sequence (batch, D).
    """
    d = u.shape[-1]
    u32 = u.astype(jnp.int32)
    mean_abs = floor_div_const(jnp.sum(jnp.abs(u32), axis=-1, keepdims=True), d)
    mean_abs = jnp.maximum(mean_abs, 1)
    return sat_div_small(u32 * weight.astype(jnp.int32), mean_abs)


def gate_mix(g, s, hc):
    """GRU state update ``sat8(s + ((g * (hc - s)) >> 8))``; |g * (hc - s)| <= 254 * 254."""
    s32 = s.astype(jnp.int32)
    return sat8(s32 + ((g * (hc.astype(jnp.int32) - s32)) >> 8))


# ---------------------------------------------------------------------------
# EXP2 / LOG2 and the integer log-softmax (logits read as 1/16-bit log-probs)
# ---------------------------------------------------------------------------

LOGIT_OFFSET = 128  # y = logit + 128 lies in [1, 255]


@lru_cache(maxsize=None)
def exp2_table() -> np.ndarray:
    """EXP2[i] = floor(16 * 2^(i/16)) for i in 0..255, computed exactly with integers.

    floor(2^(4 + i/16)) is the largest x with x^16 <= 2^(64 + i). Max < 2^20.
    """
    out = np.zeros(256, dtype=np.int32)
    for i in range(256):
        target = 1 << (64 + i)
        x = _iroot16(target)
        out[i] = x
    return out


def _iroot16(target: int) -> int:
    """floor(target ** (1/16)) for a non-negative Python int, exactly."""
    x = int(round(target ** (1 / 16))) if target < (1 << 1000) else 1 << (target.bit_length() // 16)
    while x ** 16 > target:
        x -= 1
    while (x + 1) ** 16 <= target:
        x += 1
    return x


@lru_cache(maxsize=None)
def log2_thresholds() -> np.ndarray:
    """T[e, j] = ceil(2^(e + j/16)): the smallest S with floor(16 log2 S) >= 16e + j.

    Shape (31, 16) int32 (1,984 bytes): with e = floor(log2 S) from the highest
    set bit, floor(16 log2 S) = 16e + #{j >= 1 : S >= T[e, j]}. All fit int32
    (T[30, 15] = ceil(2^30.9375) < 2^31).
    """
    table = np.zeros((31, 16), dtype=np.int64)
    for e in range(31):
        for j in range(16):
            target = 1 << (16 * e + j)  # smallest S with S^16 >= 2^(16e + j)
            x = _iroot16(target)
            if x ** 16 < target:
                x += 1
            table[e, j] = x
    assert table.max() < 2**31
    return table.astype(np.int32)


def log2_fixed(s):
    """LOG2(S) = floor(16 * log2(S / 16)) for int32 S >= 1, exactly, without floats."""
    s = s.astype(jnp.int32)
    e = 31 - lax.clz(s)  # floor(log2 S), S >= 1
    row = jnp.asarray(log2_thresholds())[e]  # (..., 16)
    frac = jnp.sum((s[..., None] >= row[..., 1:]).astype(jnp.int32), axis=-1)
    return ONE * (e - FRAC_BITS) + frac


def exp_sum_shift(vocab_size: int) -> int:
    """Right shift k applied to the EXP2 sum so it fits int32 for large vocabularies.

    EXP2 < 2^20 (max 1,004,119 ~ 2^19.94), so V <= 2048 sums exactly (k = 0, the
    spec's formula). Above that we keep S' = floor(S / 2^k) with
    k = ceil(log2 V) - 11 and use LOG2(S) ~= LOG2(S') + 16k (exact whenever S'
    is not within one unit of a 1/16-bit boundary; S' >= 16 V / 2^k > 2^14).
    """
    return max(0, (vocab_size - 1).bit_length() - 11)


def log_sum_exp2(y):
    """LOG2(sum_j EXP2[y_j]) over the last axis of y (int32 in [0, 255]), in 1/16 bits."""
    vocab = y.shape[-1]
    table = jnp.asarray(exp2_table())
    terms = table[y]
    k = exp_sum_shift(vocab)
    if k == 0:
        return log2_fixed(jnp.sum(terms, axis=-1))
    # Split each term into high and low parts so the sum is floor(S / 2^k) exactly.
    high = jnp.sum(terms >> k, axis=-1)
    low = jnp.sum(terms & ((1 << k) - 1), axis=-1)
    return log2_fixed(high + (low >> k)) + ONE * k


def log_likelihood(logits, targets):
    """Integer log-likelihood of ``targets`` in 1/16 bits: ``y_t - LOG2(sum_j EXP2[y_j])``.

    ``logits`` (..., V) int8, ``targets`` (...) int. Bits per token = -ll / 16.
    """
    y = logits.astype(jnp.int32) + LOGIT_OFFSET
    y_t = jnp.take_along_axis(y, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return y_t - log_sum_exp2(y)


def argmax_logits(logits):
    """Greedy choice (lowest index among ties), on integers."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------
# Host-side, exact float64 view of the model distribution (not the forward pass)
# ---------------------------------------------------------------------------

def bits_per_token_f64(logits, targets) -> np.ndarray:
    """Exact -log2 p(target) for p(j) proportional to 2^(logit_j / 16), in float64 on the host."""
    z = np.asarray(logits, dtype=np.float64) / ONE
    zmax = z.max(axis=-1, keepdims=True)
    lse = np.log2(np.sum(np.exp2(z - zmax), axis=-1)) + zmax[..., 0]
    z_t = np.take_along_axis(z, np.asarray(targets)[..., None].astype(np.int64), axis=-1)[..., 0]
    return lse - z_t
