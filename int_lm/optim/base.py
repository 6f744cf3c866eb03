"""What every update rule shares: the rule's shape, the z-test thresholds, the alpha schedule,
and moving int8 weights by integer steps with the statistics the trainer logs."""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, Callable, NamedTuple

import jax.numpy as jnp
import numpy as np

from int_lm import eggroll
from int_lm import intmath
from int_lm import model


class UpdateRule(NamedTuple):
    """Three pure functions over an explicit integer optimiser state (the optax/evosax shape).

    ``init(params) -> state``: a dict of int32-or-smaller arrays ({} when the rule keeps none).
    ``schedule(step) -> (hyper, logged)``: host side, once a step; ``hyper`` holds the Python
    ints the device needs (thresholds), ``logged`` what the trainer writes as ``update/<key>``.
    ``update(state, params, votes, hyper) -> (params, state, stats)``: device side, integers
    only, jittable; ``votes`` are ``eggroll``'s exact ``{path: (hi, lo)}`` sums.
    """
    name: str
    init: Callable[[dict], dict]
    schedule: Callable[[int], tuple[dict[str, int], dict[str, float]]]
    update: Callable[[dict, dict, dict, dict], tuple[dict, dict, dict]]


def alpha_at(step: int, alpha0: float, horizon: int) -> float:
    """alpha_t = 1 / ((2^alpha0 - 1) t / T + 1) when alpha0 > 1, else the constant alpha0."""
    if alpha0 <= 1:
        return alpha0
    return 1.0 / ((2.0 ** alpha0 - 1.0) * step / horizon + 1.0)


def z_value(alpha: float) -> float:
    """The two-sided normal quantile that an alpha share of null votes passes (0 for alpha >= 1)."""
    return NormalDist().inv_cdf(1.0 - alpha / 2.0) if alpha < 1 else 0.0


def vote_sigmas(population: int, rank: int, fitness_levels: int = 1) -> tuple[float, float]:
    """Standard deviation of a vote entry under random fitness: (matrices, vectors).

    A matrix vote sums N/2 * r products of two noise values (std 16 each) times F_k,
    so std(Z) = 256 sqrt(N r E[F^2] / 2); a vector vote has r = 1. E[F^2] = 1 for
    sign shaping (``eggroll.fitness_second_moment``).
    """
    f2 = eggroll.fitness_second_moment(population // 2, fitness_levels)
    base = 256.0 * math.sqrt(population / 2.0 * f2)
    return base * math.sqrt(rank), base


def thresholds(alpha: float, population: int, rank: int, fitness_levels: int = 1) -> tuple[int, int]:
    """Integer z-test thresholds (matrices, vectors) that move about an alpha share of weights."""
    z = z_value(alpha)
    sigma_m, sigma_v = vote_sigmas(population, rank, fitness_levels)
    return int(math.ceil(z * sigma_m)), int(math.ceil(z * sigma_v))


def round_shift(x, shift: int):
    """x / 2^shift rounded to nearest, halves away from zero: unbiased for symmetric x (|x| < 2^31 - 2^shift).

    A plain ``>>`` floors, a bias of -1/2 unit per use that a long sum of small
    steps would turn into a drift of every weight.
    """
    if shift == 0:
        return x
    return jnp.sign(x) * ((jnp.abs(x) + (1 << (shift - 1))) >> shift)


def vote_values(votes: dict) -> dict:
    """{path: Z} as int32 from the exact (hi, lo) sums (saturated far above any threshold)."""
    return {path: eggroll.vote_value(hi, lo) for path, (hi, lo) in votes.items()}


def by_kind(path, matrix_value, vector_value):
    """The matrix or the vector variant of a per-kind setting, for ``path``."""
    return matrix_value if model.is_matrix(path) else vector_value


def move(params: dict, steps: dict) -> tuple[dict, dict[str, Any]]:
    """Add integer ``steps`` {path: int32 array} to the int8 weights (saturating); returns (params, stats).

    Stats: weights that changed (matrices, vectors), weights at +-127 afterwards,
    and the static counts the trainer turns into fractions.
    """
    new: dict = {"layers": {}}
    moved = {"matrix": jnp.int32(0), "vector": jnp.int32(0)}
    totals = {"matrix": 0, "vector": 0}
    saturated = jnp.int32(0)
    for path, step in steps.items():
        w = model.get_leaf(params, path)
        kind = "matrix" if model.is_matrix(path) else "vector"
        w_new = intmath.sat8(w.astype(jnp.int32) + step)
        moved[kind] = moved[kind] + jnp.sum((w_new != w).astype(jnp.int32))
        totals[kind] += int(np.prod(w.shape))
        saturated = saturated + jnp.sum((jnp.abs(w_new.astype(jnp.int32)) == intmath.INT8_MAX).astype(jnp.int32))
        model.set_leaf(new, path, w_new)
    return new, {
        "moved_matrix": moved["matrix"],
        "moved_vector": moved["vector"],
        "saturated": saturated,
        "count_matrix": totals["matrix"],
        "count_vector": totals["vector"],
    }
