"""An independent NumPy twin of the EGG spec, used only by the tests.

Written from the spec, not from int_lm's JAX code: int64 arithmetic (so it
cannot overflow and shows what the exact answer is), Python big integers for
EXP2 and LOG2, per-sequence loops, and dense perturbation matrices A.B^T where
EGGROLL uses low-rank factors; the noise stream in plain Python integers, its
magnitudes by binary search.
"""
from __future__ import annotations

import math

import numpy as np


def sat8(x):
    return np.clip(x, -127, 127).astype(np.int64)


def exp2_entry(i: int) -> int:
    # floor(16 * 2^(i/16)) = floor(2^((64 + i) / 16)) = four nested integer square roots.
    x = 1 << (64 + i)
    for _ in range(4):
        x = math.isqrt(x)
    return x


EXP2 = np.array([exp2_entry(i) for i in range(256)], dtype=np.int64)


def log2_exact(s: int) -> int:
    # floor(16 * log2(s / 16)) = floor(log2(s^16)) - 64 = bit_length(s^16) - 1 - 64.
    return (int(s) ** 16).bit_length() - 1 - 64


def vocab_shift(v: int) -> int:
    return max(0, math.ceil(math.log2(v)) - 11) if v > 1 else 0


def log_likelihood(logits, target: int) -> int:
    y = np.asarray(logits, np.int64) + 128
    s = int(EXP2[y].sum())
    k = vocab_shift(len(y))
    return int(y[target]) - (log2_exact(s >> k) + 16 * k)


def matmul(u, w, dense_pert=None, shift=0):
    """sat8(floor((u.w^T + floor(u.P^T / 2^shift)) / (16 isqrt(n)))) in int64."""
    u = np.asarray(u, np.int64)
    w = np.asarray(w, np.int64)
    acc = w @ u
    if dense_pert is not None:
        acc = acc + np.floor_divide(np.asarray(dense_pert, np.int64) @ u, 2 ** shift)
    return sat8(np.floor_divide(acc, 16 * math.isqrt(w.shape[1])))


def layer_norm(u, w):
    u = np.asarray(u, np.int64)
    mean_abs = max(1, int(np.abs(u).sum()) // len(u))
    return sat8(np.floor_divide(u * np.asarray(w, np.int64), mean_abs))


class Reference:
    """EGG for one sequence at a time. ``params`` as int_lm.model (NumPy arrays).

    ``pert`` optionally holds, for this sequence, dense perturbations of every
    matrix (``{name: P}`` with layer matrices as lists) plus per-sequence
    vector parameters already perturbed; see tests/test_eggroll.py.
    """

    def __init__(self, params, boundary_token=0, pert=None, shift=0):
        self.p = {k: (np.asarray(v, np.int64) if not isinstance(v, dict) else
                      {kk: np.asarray(vv, np.int64) for kk, vv in v.items()}) for k, v in params.items()}
        self.boundary = boundary_token
        self.pert = pert or {}
        self.shift = shift
        self.layers = self.p["layers"]["Wf"].shape[0]
        self.width = self.p["embed"].shape[1]

    def _mm(self, u, name, layer=None):
        w = self.p["layers"][name][layer] if layer is not None else self.p[name]
        dense = self.pert.get(name)
        if dense is not None and layer is not None:
            dense = dense[layer]
        return matmul(u, w, dense, self.shift)

    def _vec(self, name, layer):
        return np.asarray(self.pert.get("vectors", {}).get(name, self.p["layers"][name])[layer], np.int64)

    def step(self, state, token):
        if token == self.boundary:
            state = [np.zeros(self.width, np.int64) for _ in range(self.layers)]
        x = self.p["embed"][token].copy()
        if "embed" in self.pert:
            x = sat8(x + np.floor_divide(self.pert["embed"][token], 2 ** self.shift))
        new_state = []
        for l in range(self.layers):
            s = state[l]
            xn = layer_norm(x, self._vec("ln1", l))
            f = sat8(self._mm(xn, "Wf", l) + self._mm(s, "Uf", l) + self._vec("bf", l))
            g = f + 127
            sg = sat8(np.floor_divide(g * s, 256))
            hc = sat8(self._mm(xn, "Wh", l) + self._mm(sg, "Uh", l) + self._vec("bh", l))
            h = sat8(s + np.floor_divide(g * (hc - s), 256))
            new_state.append(h)
            x = sat8(x + h)
            up = self._mm(layer_norm(x, self._vec("ln2", l)), "up", l)
            x = sat8(x + self._mm(up, "down", l))
        ln_out = np.asarray(self.pert.get("ln_out", self.p["ln_out"]), np.int64)
        logits = self._mm(layer_norm(x, ln_out), "head" if "head" in self.p else "embed")   # tie_head
        return logits, new_state

    def run(self, inputs, targets, state=None):
        """Returns (ll per token, logits per token, final state) for one sequence."""
        if state is None:
            state = [np.zeros(self.width, np.int64) for _ in range(self.layers)]
        else:
            state = [np.asarray(s, np.int64) for s in state]
        lls, all_logits = [], []
        for tok, tgt in zip(inputs, targets):
            logits, state = self.step(state, int(tok))
            all_logits.append(logits)
            lls.append(log_likelihood(logits, int(tgt)))
        return np.array(lls), np.array(all_logits), np.array(state)


# ---------------------------------------------------------------------------
# Counter-based int8 noise (spec §4.2)
# ---------------------------------------------------------------------------

MASK = 0xFFFFFFFF


def spec_mix32(x: int) -> int:
    """lowbias32 in Python integers: x ^= x>>16; x *= 0x7FEB352D; x ^= x>>15; x *= 0x846CA68B; x ^= x>>16."""
    x &= MASK
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK
    return x ^ (x >> 16)


def spec_key(seed: int, epoch: int, pair: int, param_id: int) -> int:
    k = spec_mix32(seed ^ 0x5EED1234)
    k = spec_mix32(k ^ epoch)
    k = spec_mix32(k ^ ((param_id * 0x9E3779B9) & MASK))
    return spec_mix32(k + pair * 0x85EBCA6B)


def spec_table() -> list[int]:
    """Tm[0] = 0, Tm[m] = min(2^31 - 1, rint(2^31 erf((m - 1/2) / (16 sqrt 2))))."""
    return [0] + [min(2 ** 31 - 1, round(2 ** 31 * math.erf((m - 0.5) / (16 * math.sqrt(2))))) for m in range(1, 128)]


def spec_value(table: list[int], seed: int, epoch: int, pair: int, param_id: int, index: int) -> int:
    """One noise value: the top bit of the hash is the sign, the low 31 bits pick max{m : Tm[m] <= u}."""
    bits = spec_mix32(spec_key(seed, epoch, pair, param_id) + index * 0x9E3779B9)
    u = bits & 0x7FFFFFFF
    lo, hi = 0, 127                       # binary search: Tm[lo] <= u < Tm[hi + 1]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if table[mid] <= u else (lo, mid - 1)
    return -lo if bits >> 31 else lo
