"""What a checkpoint's arrays are: flattened names, integer dtypes, shapes from the config, sha256.

A train state flattens to ``{name: host array}`` with names ``params.<leaf>``
(int8), ``states`` (int8) and ``opt.<leaf>`` (the update rule's state, int32 or
smaller: :data:`OPT_DTYPES`). :func:`_expected_arrays` derives every name,
shape and dtype from a config (the update rule's ``init`` included), and
:func:`_check_arrays` refuses anything else, never casting. Also home of
:class:`CheckpointError`, which every module of the package raises.
"""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from int_lm import config
from int_lm.errors import UserError


class CheckpointError(UserError):
    """A checkpoint that cannot be used (missing, corrupt, incompatible); the message says what to do."""


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested dict of arrays as ``{dotted name: array}``, names sorted (``"Wf"``, ``"m.Wf"``, ...)."""
    out = {}
    for k in sorted(tree):
        v = tree[k]
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def _unflat(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for name, v in flat.items():
        node = out
        parts = name.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _host_array(x, name: str, dtypes: tuple = (np.int8,)) -> np.ndarray:
    """A private host copy (the device buffers are donated by the next step); integers only."""
    a = np.array(x, copy=True)
    if a.dtype not in dtypes:
        raise CheckpointError(f"refusing to save {name} with dtype {a.dtype}: weights and member states are "
                              f"int8 only, optimiser state int32 or smaller")
    return a


OPT_DTYPES = (np.int8, np.int16, np.int32)


def state_arrays(state) -> dict[str, np.ndarray]:
    """The arrays a checkpoint of ``state`` holds, as ``{name: host copy}``: params.*, states, opt.*.

    ``state``: anything with ``params``, ``states`` and (optionally) ``opt_state``: the
    trainer's state, or what :func:`restore` returns."""
    flat = {"params." + k: _host_array(v, k) for k, v in flatten(dict(state.params)).items()}
    flat["states"] = _host_array(state.states, "states")
    for k, v in flatten(dict(getattr(state, "opt_state", None) or {})).items():
        flat["opt." + k] = _host_array(v, "opt_state." + k, OPT_DTYPES)
    return flat


def _expected_arrays(cfg: config.Config) -> dict[str, tuple[tuple, np.dtype]]:
    """Name -> (shape, dtype) of every array a checkpoint of ``cfg`` holds."""
    import jax
    from int_lm import model
    from int_lm import optim
    shape = model.ModelShape.from_config(cfg.model)
    out = {"params." + k: (tuple(v), np.dtype(np.int8)) for k, v in flatten(model.param_shapes(shape)).items()}
    out["states"] = ((shape.layers, cfg.es.population, shape.width), np.dtype(np.int8))
    params = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, np.int8), model.param_shapes(shape),
                                    is_leaf=lambda x: isinstance(x, tuple))
    opt = jax.eval_shape(optim.make(cfg.es).init, params)
    for k, v in flatten(dict(opt)).items():
        out["opt." + k] = (tuple(v.shape), np.dtype(v.dtype))
    return out


def _param_arrays(cfg: config.Config) -> dict[str, tuple[tuple, np.dtype]]:
    """The weights alone (an exported model), without the ``params.`` prefix."""
    return {k[len("params."):]: v for k, v in _expected_arrays(cfg).items() if k.startswith("params.")}


def _check_arrays(flat: dict[str, np.ndarray], expected: dict[str, tuple[tuple, np.dtype]],
                  digests: dict[str, str] | None, where: str, hint: str) -> None:
    if set(flat) != set(expected):
        raise CheckpointError(f"{where} holds arrays {sorted(flat)}, expected {sorted(expected)}; {hint}")
    for name, a in flat.items():
        shape, dtype = expected[name]
        if not isinstance(a, np.ndarray) or a.dtype != dtype:
            raise CheckpointError(f"{where}: {name} has dtype {getattr(a, 'dtype', type(a))}, expected {dtype} "
                                  f"(never cast silently); {hint}")
        if tuple(a.shape) != tuple(shape):
            raise CheckpointError(f"{where}: {name} has shape {tuple(a.shape)}, expected {shape}; {hint}")
        if digests is not None and digests.get(name) != _digest(a):
            raise CheckpointError(f"{where}: {name} does not match its saved sha256 (corrupted); {hint}")
        if dtype == np.int8 and a.size and a.min() == -128:
            # The model's int8 range is symmetric; -128 never arises in training, and the CPU
            # workarounds (backend.materialize) rely on it.
            raise CheckpointError(f"{where}: {name} holds -128, outside the symmetric int8 range [-127, 127] "
                                  f"of int_lm models; {hint}")
