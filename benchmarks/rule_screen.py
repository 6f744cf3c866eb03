#!/usr/bin/env python
"""Screen update-rule variants that did not ship: train with one of them, as train.py does.

    python benchmarks/rule_screen.py --rule '{"beta": 3, "mode": "threshold"}' \
        --config configs/tinyshakespeare.toml --data.source PATH/tinyshakespeare.txt \
        --es.tokens_per_update 100 --es.alpha_horizon 2000 --train.steps 200 --train.eval_every 25 \
        --train.checkpoint_every 0 --train.run_dir runs/screen/signum_b3

Every other argument is train.py's (``--config``, ``--section.key value``); ``es.optimizer`` is
set to ``screen``. The rows of docs/training.md ("Integer optimiser state: what was tried")
came from a prototype of this rule; this script rebuilds it on the package's own pieces
(``base.round_shift`` rounding, ``eggroll``'s signed-rank fitness), so reruns land near
those figures, not on them bit for bit. The variant is not saved with the run's config:
resume a screening run only with the same ``--rule``.

``--rule`` keys (JSON), one family of rules:

* ``beta`` (0): integer momentum ``m <- m - round(m / 2^beta) + zhat`` of the normalised votes
  ``zhat = round(Z / 2^s)`` (0: no momentum, ``m = zhat``).
* ``mode``: ``"threshold"`` (signum): a weight moves by ``sign(m)`` where ``|m|`` passes the
  z-test on m's exact null standard deviation at ``alpha_t * ascale``; ``"linear"``: it moves
  by ``round(m * eta_t / 2^10)`` with ``eta_t = lr * alpha_t^lr_power * 2^fine * 2^10 / std(m)``
  (the shipped momentum rule is ``{"beta": 2, "mode": "linear", "fine": 8, "lr": 0.4}``).
* ``ascale`` (1.0): the threshold's alpha multiplier.
* ``fb`` (0.0): error feedback (threshold mode): a weight that moves takes ``fb * std(m)``
  out of its momentum.
* ``fine`` (0): fraction bits of an int32 master weight under the int8 one (threshold mode:
  a move is ``1 / 2^fine`` of an int8 unit; linear mode: the step's resolution).
* ``lr`` (0.5), ``lr_power`` (1.0): linear mode's step size and its decay with alpha_t.

Fitness shaping is the trainer's: ``--es.fitness_levels L`` (1 = the published sign).
"""
from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from int_lm import model  # noqa: E402
from int_lm import optim  # noqa: E402
from int_lm.errors import UserError  # noqa: E402
from int_lm.optim import base, momentum  # noqa: E402

KEYS = {"beta": 0, "mode": "threshold", "ascale": 1.0, "fb": 0.0, "fine": 0, "lr": 0.5, "lr_power": 1.0}
ZMAX, MMAX = momentum.ZMAX, momentum.MMAX     # the shipped rule's clips of zhat and (linear mode) m


def parse_rule(text: str) -> dict:
    try:
        rule = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--rule is not JSON ({e}); e.g. --rule '{{\"beta\": 3}}'") from None
    unknown = set(rule) - set(KEYS)
    if unknown:
        raise UserError(f"--rule: unknown keys {sorted(unknown)}; known: {', '.join(KEYS)}")
    rule = {**KEYS, **rule}
    if rule["mode"] not in ("threshold", "linear"):
        raise UserError(f"--rule mode must be \"threshold\" or \"linear\", got {rule['mode']!r}")
    if not (0 <= rule["beta"] <= 8 and 0 <= rule["fine"] <= 12):
        raise UserError("--rule beta must be in [0, 8] and fine in [0, 12]")
    return rule


def make_screen_rule(rule: dict):
    def make(es) -> base.UpdateRule:
        beta, fine, mode = rule["beta"], rule["fine"], rule["mode"]
        sigmas = dict(zip(("matrix", "vector"), base.vote_sigmas(es.population, es.rank, es.fitness_levels)))
        shifts = {kind: momentum.vote_shift(sigma) for kind, sigma in sigmas.items()}
        w_lo, w_hi = -(127 << fine), (127 << fine) + (1 << fine) - 1

        def init(params):
            state = {}
            if beta:
                state["momentum"] = jax.tree_util.tree_map(lambda w: jnp.zeros(w.shape, jnp.int32), params)
            if fine:
                state["master"] = jax.tree_util.tree_map(lambda w: w.astype(jnp.int32) << fine, params)
            return state

        def schedule(step):
            alpha = base.alpha_at(step, es.alpha, es.alpha_horizon)
            z = base.z_value(alpha * rule["ascale"])
            lr = rule["lr"] * alpha ** rule["lr_power"]
            hyper = {}
            for kind in ("matrix", "vector"):
                sd = momentum.momentum_sigma(sigmas[kind] / 2 ** shifts[kind], beta, step)
                hyper[f"threshold_{kind}"] = int(math.ceil(z * sd))
                hyper[f"feedback_{kind}"] = int(round(rule["fb"] * sd))
                eta = int(round(lr * 2 ** fine * 2 ** momentum.ETA_BITS / sd))
                hyper[f"eta_{kind}"] = min(momentum.ETA_MAX, eta)
            return hyper, {"alpha": alpha, **hyper}

        def update(state, params, votes, hyper):
            new_state = {name: {"layers": {}} for name in state}
            steps = {}
            for path, z in base.vote_values(votes).items():
                kind = "matrix" if model.is_matrix(path) else "vector"
                m = jnp.clip(base.round_shift(z, shifts[kind]), -ZMAX, ZMAX)
                if beta:
                    old = model.get_leaf(state["momentum"], path)
                    m = old - base.round_shift(old, beta) + m
                if mode == "threshold":
                    move = jnp.where(jnp.abs(m) >= hyper[f"threshold_{kind}"], jnp.sign(m), 0)
                    m = m - move * hyper[f"feedback_{kind}"]
                else:
                    move = base.round_shift(jnp.clip(m, -MMAX, MMAX) * hyper[f"eta_{kind}"], momentum.ETA_BITS)
                w8 = model.get_leaf(params, path).astype(jnp.int32)
                if fine:
                    master = jnp.clip(model.get_leaf(state["master"], path) + move, w_lo, w_hi)
                    model.set_leaf(new_state["master"], path, master)
                    move = jnp.clip((master + (1 << (fine - 1))) >> fine, -127, 127) - w8
                if beta:
                    model.set_leaf(new_state["momentum"], path, m)
                steps[path] = move
            params, stats = base.move(params, steps)
            return params, new_state, stats

        return base.UpdateRule("screen", init, schedule, update)

    return make


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--rule" not in argv or argv.index("--rule") + 1 >= len(argv):
        print(__doc__)
        return 2
    i = argv.index("--rule")
    rule_text = argv[i + 1]
    del argv[i:i + 2]
    try:
        rule = parse_rule(rule_text)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    optim.RULES["screen"] = types.SimpleNamespace(make=make_screen_rule(rule))
    print(f"screening rule: {json.dumps(rule)}", flush=True)
    import train
    return train.main(argv + ["--es.optimizer", "screen"])


if __name__ == "__main__":
    sys.exit(main())
