"""The published rule: every weight whose vote passes the z-test moves by sign(Z); no state.

``w <- clip(w + sign(Z) [|Z| >= threshold_t], -127, 127)``, with the threshold
moving an alpha_t share of weights under random fitness and alpha_t decaying
(``base.alpha_at``). The paper's recipe: ``configs/paper_minipile_gpu.toml``.
"""
from __future__ import annotations

import jax.numpy as jnp

from int_lm.optim import base


def make(es) -> base.UpdateRule:
    """The sign rule for ``es`` (an ``ESConfig``: population, rank, fitness_levels, alpha, alpha_horizon)."""

    def init(params):
        return {}

    def schedule(step):
        alpha = base.alpha_at(step, es.alpha, es.alpha_horizon)
        thr_m, thr_v = base.thresholds(alpha, es.population, es.rank, es.fitness_levels)
        hyper = {"threshold_matrix": thr_m, "threshold_vector": thr_v}
        return hyper, {"alpha": alpha, **hyper}

    def update(state, params, votes, hyper):
        steps = {}
        for path, z in base.vote_values(votes).items():
            thr = base.by_kind(path, hyper["threshold_matrix"], hyper["threshold_vector"])
            steps[path] = jnp.where(jnp.abs(z) >= thr, jnp.sign(z), 0)
        params, stats = base.move(params, steps)
        return params, state, stats

    return base.UpdateRule("sign", init, schedule, update)
