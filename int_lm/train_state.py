"""The training state: everything a run needs to continue exactly, as one frozen value.

The checkpoint saves it, ``distributed.Layout`` places it on devices, and each
step of the loop returns a new one (``dataclasses.replace``), never mutating it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax

from int_lm import model


@dataclasses.dataclass(frozen=True)
class TrainState:
    params: dict            # int8 weights (model.param_shapes layout)
    states: Any             # (L, N, D) int8 recurrent state of every population member
    opt_state: dict         # the update rule's integer state (int32 or smaller; {} for "sign")
    step: int               # steps completed
    cursor: dict            # data stream position (JSON)
    seed: int


def init(shape: model.ModelShape, population: int, rule, seed: int) -> TrainState:
    """A fresh run: seeded weights, zero member states, the rule's initial state."""
    params = model.init_params(shape, seed)
    return TrainState(params=params, states=model.init_state(shape, population), opt_state=rule.init(params),
                      step=0, cursor={}, seed=seed)


def from_restored(restored, rule) -> TrainState:
    """A state read back by ``checkpoint.restore`` (host NumPy) as device arrays.

    A checkpoint of a stateless rule holds no optimiser arrays: the rule's init gives them.
    """
    as_device = lambda tree: jax.tree_util.tree_map(jax.numpy.asarray, tree)  # noqa: E731
    params = as_device(restored.params)
    opt_state = as_device(restored.opt_state) if restored.opt_state else rule.init(params)
    return TrainState(params=params, states=jax.numpy.asarray(restored.states), opt_state=opt_state,
                      step=restored.step, cursor=restored.cursor, seed=restored.seed)
