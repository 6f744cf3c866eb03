"""Integer momentum on int16 master weights: every vote counts, not only those past a threshold.

The sign rule keeps only the votes that pass a z-test and forgets the rest; late in
training, when the threshold is high, that is most of what the population measured.
This rule keeps it, in integers:

    zhat = clip(round(Z / 2^s), +-ZMAX)          votes normalised (s from the host: std(zhat) in [128, 256))
    m    = m - round(m / 2^beta) + zhat          integer momentum, gain 2^beta (beta = 0: m = zhat)
    W    = clip(W + round(clip(m, +-MMAX) * eta_t / 2^10), Wmin, Wmax)     int16 master weight
    w    = (W + 2^(F-1)) >> F                    the int8 weight the forward pass reads (round to nearest)

W carries F fraction bits below the int8 weight, so a step of 1/2^F of an int8 unit
exists and small consistent votes add up instead of being thresholded away. The host
computes ``eta_t = lr_t 2^F 2^10 / std_t(m)`` once a step from the exact null standard
deviation of m (a geometric sum: the momentum's warm-up is corrected, as Adam's bias
correction does), so ``es.lr`` reads as "int8 units per step for a momentum one
standard deviation from zero", and ``lr_t = es.lr * alpha_t ^ es.lr_power`` decays
with the alpha schedule. All rounding is to nearest with halves away from zero: a
floor's bias of -1/2 unit per step would drift every weight over thousands of steps.

Overflow bounds (checked by ``check_limits``): |zhat| <= 2^15 - 1; |m| < 2^(beta+15)
<= 2^23; m is clipped to 2^17 - 1 and eta_t to 2^13 before their product (< 2^30);
W stays in [-127 2^F - 2^(F-1), 127 2^F + 2^(F-1) - 1], inside int16 for F <= 8.
State: ``momentum`` int32 and ``master`` int16, one of each per weight.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from int_lm import intmath
from int_lm import model
from int_lm.errors import UserError
from int_lm.optim import base

ZMAX = (1 << 15) - 1      # normalised votes beyond ~128 standard deviations are clipped
MMAX = (1 << 17) - 1      # momentum clipped before the product with eta
ETA_BITS = 10             # fraction bits of eta
ETA_MAX = 1 << 13
MAX_MASTER_BITS = 8       # W fits int16
MAX_MOMENTUM_SHIFT = 8


def check_limits(es) -> None:
    """Refuse settings outside the documented bounds (message names the key)."""
    if not 0 <= es.momentum_shift <= MAX_MOMENTUM_SHIFT:
        raise UserError(f"es.momentum_shift must be in [0, {MAX_MOMENTUM_SHIFT}], got {es.momentum_shift}")
    if not 0 <= es.master_bits <= MAX_MASTER_BITS:
        raise UserError(f"es.master_bits must be in [0, {MAX_MASTER_BITS}] (int16 master weights), "
                        f"got {es.master_bits}")
    if not 0 < es.lr <= 4:
        raise UserError(f"es.lr must be in (0, 4] int8 units per step, got {es.lr}")
    if not 0 <= es.lr_power <= 2:
        raise UserError(f"es.lr_power must be in [0, 2], got {es.lr_power}")


def vote_shift(sigma: float) -> int:
    """The shift that brings a vote of standard deviation ``sigma`` to [128, 256) (0 if already below)."""
    return max(0, int(math.floor(math.log2(sigma))) - 7)


def momentum_sigma(sigma_zhat: float, beta: int, step: int) -> float:
    """Null standard deviation of m after ``step + 1`` updates: sigma * sqrt(sum_i rho^2i), rho = 1 - 2^-beta."""
    if beta == 0:
        return sigma_zhat
    rho2 = (1.0 - 2.0 ** -beta) ** 2
    return sigma_zhat * math.sqrt((1.0 - rho2 ** (step + 1)) / (1.0 - rho2))


def make(es) -> base.UpdateRule:
    """The momentum rule for ``es`` (an ``ESConfig``: momentum_shift, master_bits, lr, lr_power, alpha, ...)."""
    check_limits(es)
    beta, fbits = es.momentum_shift, es.master_bits
    sigmas = dict(zip(("matrix", "vector"), base.vote_sigmas(es.population, es.rank, es.fitness_levels)))
    shifts = {kind: vote_shift(sigma) for kind, sigma in sigmas.items()}
    w_min, w_max = -127 * (1 << fbits) - (1 << fbits >> 1), 127 * (1 << fbits) + (1 << fbits >> 1) - 1

    def init(params):
        return {"momentum": jax.tree_util.tree_map(lambda w: jnp.zeros(w.shape, jnp.int32), params),
                "master": jax.tree_util.tree_map(lambda w: (w.astype(jnp.int16) << fbits), params)}

    def schedule(step):
        alpha = base.alpha_at(step, es.alpha, es.alpha_horizon)
        lr = es.lr * alpha ** es.lr_power
        hyper = {}
        for kind in ("matrix", "vector"):
            sigma_m = momentum_sigma(sigmas[kind] / 2 ** shifts[kind], beta, step)
            hyper[f"eta_{kind}"] = min(ETA_MAX, int(round(lr * 2 ** fbits * 2 ** ETA_BITS / sigma_m)))
        return hyper, {"alpha": alpha, "lr": lr, **hyper}

    def update(state, params, votes, hyper):
        new_state = {"momentum": {"layers": {}}, "master": {"layers": {}}}
        steps = {}
        for path, z in base.vote_values(votes).items():
            kind = "matrix" if model.is_matrix(path) else "vector"
            zhat = jnp.clip(base.round_shift(z, shifts[kind]), -ZMAX, ZMAX)
            m = model.get_leaf(state["momentum"], path)
            m = m - base.round_shift(m, beta) + zhat if beta else zhat
            dw = base.round_shift(jnp.clip(m, -MMAX, MMAX) * hyper[f"eta_{kind}"], ETA_BITS)
            master = model.get_leaf(state["master"], path).astype(jnp.int32)
            master = jnp.clip(master + dw, w_min, w_max)
            w = intmath.sat8((master + (1 << fbits >> 1)) >> fbits)
            steps[path] = w - model.get_leaf(params, path).astype(jnp.int32)
            model.set_leaf(new_state["momentum"], path, m)
            model.set_leaf(new_state["master"], path, master.astype(jnp.int16))
        params, stats = base.move(params, steps)
        return params, new_state, stats

    return base.UpdateRule("momentum", init, schedule, update)
