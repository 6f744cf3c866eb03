"""The EGG model: a minGRU-style integer recurrent LM with no activation functions.

Parameters are a plain dict of int8 arrays (a JAX pytree); layers are stacked on
a leading axis. The forward pass runs a batch of independent sequences token by
token (``scan_tokens``: ``lax.scan`` over time), carrying each layer's int8 state
and resetting it to zero where the input token is the document-boundary token.

The perturbation hook: ``factors`` maps a matrix name to int8 low-rank factors
``(A, B)`` per sequence or per antithetic pair of sequences (2k: +A, 2k+1: -A),
and vector parameters may carry a leading per-sequence batch axis. EGGROLL
(``int_lm/eggroll.py``) uses this to run a whole population in one batch; with
``factors=None`` no extra work is traced at all.

The ``backend.*`` calls (``materialize``, the joined Wf/Wh factors, keeping factors
int8 in the loop) change how XLA compiles the model, never a value: they are
explained in ``int_lm/backend.py`` and switched off by ``INT_LM_PLAIN_XLA=1``.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from int_lm import backend, intmath

# Matrices that take a low-rank perturbation; everything else is a vector.
LAYER_MATRICES = ("Wf", "Uf", "Wh", "Uh", "up", "down")
LAYER_VECTORS = ("ln1", "ln2", "bf", "bh")


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    width: int
    layers: int
    boundary_token: int = 0
    tie_head: bool = False      # the head reads the embedding table (there is no "head" parameter)
    head_init_std: float = 16.0  # only init_params reads it: the spec's 16, or smaller (docs/training.md)
    embed_init_std: float = 16.0  # likewise for the embedding table (the tied head too)

    @classmethod
    def from_config(cls, model_cfg) -> "ModelShape":
        return cls(model_cfg.vocab_size, model_cfg.width, model_cfg.layers, model_cfg.boundary_token,
                   model_cfg.tie_head, model_cfg.head_init_std, model_cfg.embed_init_std)


def param_shapes(shape: ModelShape) -> dict:
    """Name -> shape of every parameter (layer parameters stacked on axis 0)."""
    v, d, n_layers = shape.vocab_size, shape.width, shape.layers
    shapes = {
        "embed": (v, d),
        "head": (v, d),
        "ln_out": (d,),
        "layers": {
            "ln1": (n_layers, d), "ln2": (n_layers, d),
            "Wf": (n_layers, d, d), "Uf": (n_layers, d, d),
            "Wh": (n_layers, d, d), "Uh": (n_layers, d, d),
            "bf": (n_layers, d), "bh": (n_layers, d),
            "up": (n_layers, 4 * d, d), "down": (n_layers, d, 4 * d),
        },
    }
    if shape.tie_head:   # the head is the embedding table: one matrix, its noise and its votes serve both
        del shapes["head"]
    return shapes


def param_leaves(shape: ModelShape) -> list[tuple[tuple[str, ...], tuple[int, ...], bool]]:
    """(path, shape, is_matrix) of every parameter in a fixed order; the index is the parameter id.

    The order (embed, head, ln_out, then the layer parameters by name) fixes the
    noise streams, so it is part of the integer semantics: never reorder it.
    """
    shapes = param_shapes(shape)
    out = [((name,), shapes[name], is_matrix((name,))) for name in ("embed", "head", "ln_out") if name in shapes]
    for name in sorted(shapes["layers"]):
        out.append((("layers", name), shapes["layers"][name], is_matrix(("layers", name))))
    return out


def is_matrix(path) -> bool:
    """Matrices take low-rank noise; vectors (norm weights, biases) full-rank noise."""
    return path[0] in ("embed", "head") or path[-1] in LAYER_MATRICES


def get_leaf(tree, path):
    """``tree[path[0]][path[1]]...``: one parameter of a params-shaped tree."""
    for p in path:
        tree = tree[p]
    return tree


def set_leaf(tree, path, value) -> None:
    """Set one parameter of a (mutable) params-shaped dict tree, creating sections as needed."""
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def param_count(shape: ModelShape) -> int:
    return int(sum(np.prod(s) for s in jax.tree_util.tree_leaves(
        param_shapes(shape), is_leaf=lambda x: isinstance(x, tuple))))


def init_params(shape: ModelShape, seed: int) -> dict:
    """Seeded init per the spec: matrices round(16 N(0,1)) clipped, norms 16, biases 0.

    Drawn on the host with NumPy's PCG64 in a fixed order, so the same seed gives
    the same int8 weights on every machine and backend. The embedding and the untied
    head are round(s N(0,1)) from the same draws, s = shape.embed_init_std and
    shape.head_init_std (16: the spec's); tables that start small hold less random
    preference for ES to unlearn (docs/training.md).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x1E66]))
    shapes = param_shapes(shape)

    def gaussian(s, std=16.0):
        return np.clip(np.rint(std * rng.standard_normal(s)), -127, 127).astype(np.int8)

    layers = {}
    for name in ("ln1", "ln2"):
        layers[name] = np.full(shapes["layers"][name], intmath.ONE, np.int8)
    for name in LAYER_MATRICES:
        layers[name] = gaussian(shapes["layers"][name])
    for name in ("bf", "bh"):
        layers[name] = np.zeros(shapes["layers"][name], np.int8)
    params = {
        "embed": gaussian(shapes["embed"], float(shape.embed_init_std)),
        "layers": layers,
        "ln_out": np.full(shapes["ln_out"], intmath.ONE, np.int8),
    }
    if "head" in shapes:   # drawn last, so a tied model's other weights are the untied model's
        params["head"] = gaussian(shapes["head"], float(shape.head_init_std))
    return jax.tree_util.tree_map(jnp.asarray, params)


def init_state(shape: ModelShape, batch: int):
    """Zero recurrent state: (layers, batch, width) int8."""
    return jnp.zeros((shape.layers, batch, shape.width), jnp.int8)


# ---------------------------------------------------------------------------
# Perturbed matmul (the EGGROLL hook)
# ---------------------------------------------------------------------------

def _row_signs(rows: int, factor_rows: int):
    """How factor rows map to input rows: per row (sign +1), or per antithetic pair.

    With B/2 factor rows, rows 2k and 2k+1 share factor k: row 2k takes +A_k and
    row 2k+1 takes -A_k, with the same B_k (EGGROLL's mirrored pair). Reading each
    pair's factors once instead of a copy per member halves what the time loop streams.
    """
    if rows == factor_rows:
        return 1, None
    if rows == 2 * factor_rows:
        return 2, jnp.array([1, -1], jnp.int32)
    raise ValueError(f"low-rank factors for {factor_rows} rows cannot serve {rows} rows (need {rows} or {rows // 2})")


def lowrank_dots(u, b):
    """Per-row dots u (B, n) . b_r -> (B, r) int32 (|value| <= n 127^2), without signs.

    ``b`` is (B, r, n) per row or (B/2, r, n) per antithetic pair. An int32
    multiply-reduce that XLA fuses into one loop; on CPU it measured slightly
    faster than a batched (B, 1, n) x (B, r, n) dot (docs/performance.md).
    """
    group, _ = _row_signs(u.shape[0], b.shape[0])
    p, r, n = b.shape
    rows = u.reshape(p, group, 1, n).astype(jnp.int32)
    return jnp.sum(rows * b[:, None].astype(jnp.int32), axis=-1).reshape(p * group, r)


def lowrank_term(u, a, b, shift: int, u_dots=None):
    """floor(sum_r (u . b_r) a_r / 2^shift) per row (a_r negated on odd rows of a pair), exact in int32.

    u (B, n) int8; a (B, r, out), b (B, r, n) int8 per row, or (B/2, r, .) per
    antithetic pair (see ``_row_signs``). The sum over r is one small reduction
    that XLA fuses with the products (faster than slicing per rank: docs/performance.md).
    ``u_dots`` is ``lowrank_dots(u, b)`` when the caller has it already. The pair
    sign goes on u . b_r (the same integer as negating a_r). |u . b_r| <= n 127^2;
    when the product with a_r could pass 2^31 it is split into high and low parts,
    ``(hi 2^s + lo) a >> s == hi a + (lo a >> s)``, so nothing overflows.
    """
    group, signs = _row_signs(u.shape[0], a.shape[0])
    p, r, out = a.shape
    n = b.shape[2]
    dots = (lowrank_dots(u, b) if u_dots is None else u_dots).reshape(p, group, r)
    if signs is not None:
        dots = dots * signs[None, :, None]
    dots4 = dots[:, :, :, None]              # (P, group, r, 1)
    a4 = a[:, None, :, :].astype(jnp.int32)  # (P, 1, r, out)
    if r * n * 127 * 127 * 127 < 2**31:
        term = jnp.sum(dots4 * a4, axis=2) >> shift
    else:
        mask = (1 << shift) - 1
        high = jnp.sum((dots4 >> shift) * a4, axis=2)
        low = jnp.sum((dots4 & mask) * a4, axis=2)
        term = high + (low >> shift)
    return term.reshape(p * group, out)


def matmul(u, w, factor=None, shift: int = 0, u_dots=None):
    """Scaled matmul of u (B, n) by w (out, n), optionally with low-rank noise per row or pair.

    With ``factor = (A, Bf)`` (see ``lowrank_term`` for the layouts) this is
    ``sat8(floor((u.w^T + ((u.Bf^T) . A >> shift)) / (16 isqrt(n))))``,
    without ever forming A^T.Bf (``u_dots`` optionally gives u.Bf^T precomputed).
    """
    if factor is None:
        return intmath.scaled_matmul(u, w)
    a, b = factor
    return intmath.scaled_matmul(u, w, lowrank_term(u, a, b, shift, u_dots))


def embed(table, tokens, factor=None, shift: int = 0):
    """Row lookup; with noise, row t gains ``(sum_r A[r, t] Bf[r]) >> shift`` before sat8.

    ``factor`` (A (., r, V), Bf (., r, D)) is per row or per antithetic pair, as in ``lowrank_term``.
    """
    rows = table[tokens]
    if factor is None:
        return rows
    a, b = factor
    group, signs = _row_signs(tokens.shape[0], a.shape[0])
    p, r, _ = a.shape
    idx = jnp.broadcast_to(tokens.reshape(p, 1, group).astype(jnp.int32), (p, r, group))
    a_t = jnp.take_along_axis(a, idx, axis=2).astype(jnp.int32)            # (P, r, group)
    if signs is not None:
        a_t = a_t * signs[None, None, :]
    pert = jnp.sum(a_t[..., None] * b[:, :, None, :].astype(jnp.int32), axis=1) >> shift  # (P, group, D)
    return intmath.sat8(rows.astype(jnp.int32) + pert.reshape(p * group, -1))


# ---------------------------------------------------------------------------
# Forward pass
# ---------------------------------------------------------------------------

def layer_factor(factors, name, layer):
    """Matrix ``name``'s low-rank factors (A, B) at ``layer``, or None where it is not perturbed."""
    if factors is None or name not in factors:
        return None
    a, b = factors[name]
    return a[layer], b[layer]


def gru_cell(x, s, lp, layer, factors, shift):
    """minGRU variant with identity 'sigmoid' and 'tanh' (saturation only)."""
    wf, wh = layer_factor(factors, "Wf", layer), layer_factor(factors, "Wh", layer)
    x_dots_f, x_dots_h = backend.wf_wh_dots(x, factors, layer, lowrank_dots)  # None: each matmul takes its own
    return gru_update(matmul(x, lp["Wf"][layer], wf, shift, x_dots_f),
                      matmul(x, lp["Wh"][layer], wh, shift, x_dots_h), s, lp, layer, factors, shift)


def gru_update(xf, xh, s, lp, layer, factors, shift):
    """The part of :func:`gru_cell` that needs the state: from the input's products ``xf = x Wf``
    and ``xh = x Wh`` (int8, as ``matmul`` returns them) and the state s to the new state."""
    f = intmath.sat_add(xf, matmul(s, lp["Uf"][layer], layer_factor(factors, "Uf", layer), shift),
                        lp["bf"][layer])
    g = f.astype(jnp.int32) + intmath.INT8_MAX  # [0, 254]: g / 256 in [0, 1)
    gated_s = intmath.sat8((g * s.astype(jnp.int32)) >> 8)
    hc = intmath.sat_add(xh, matmul(gated_s, lp["Uh"][layer], layer_factor(factors, "Uh", layer), shift),
                         lp["bh"][layer])
    return intmath.gate_mix(g, s, hc)


def block(x, s, lp, layer, factors, shift):
    """Pre-norm residual block: GRU then a two-matmul MLP, all saturating."""
    h = gru_cell(backend.materialize(intmath.layer_norm(x, lp["ln1"][layer])), s, lp, layer, factors, shift)
    x = backend.materialize(intmath.sat_add(x, h))
    up = matmul(backend.materialize(intmath.layer_norm(x, lp["ln2"][layer])), lp["up"][layer],
                layer_factor(factors, "up", layer), shift)
    x = backend.materialize(intmath.sat_add(x, matmul(up, lp["down"][layer],
                                                      layer_factor(factors, "down", layer), shift)))
    return x, h


def step(params, states, tokens, boundary_token: int, factors=None, shift: int = 0):
    """One token for a batch: tokens (B,) -> logits (B, V) int8 and new states.

    ``states`` holds one (B, D) int8 array per layer (a tuple: :func:`scan_tokens`
    splits the stacked (L, B, D) state into it and stacks it again at the end).
    """
    reset = (tokens == boundary_token)[:, None]
    states = tuple(jnp.where(reset, jnp.zeros_like(s), s) for s in states)
    get = (lambda name: factors.get(name)) if factors is not None else (lambda name: None)
    x = backend.materialize(embed(params["embed"], tokens, get("embed"), shift))
    lp = params["layers"]
    layer_factors = factors.get("layers") if factors is not None else None
    new_states = []
    for layer, s in enumerate(states):
        x, h = block(x, s, lp, layer, layer_factors, shift)
        new_states.append(h)
    head = "head" if "head" in params else "embed"   # tied: the embedding table and its noise
    logits = matmul(backend.materialize(intmath.layer_norm(x, params["ln_out"])), params[head], get(head), shift)
    return logits, tuple(new_states)


def unstack_layers(tree, n_layers: int):
    """Split every stacked (L, ...) layer array into a tuple of L arrays, once, before the time loop.

    Each step's layer loop then reads whole per-layer arrays instead of slicing the
    stacks at every token (slow in XLA's CPU loop: docs/performance.md).
    """
    if tree is None or "layers" not in tree:
        return tree
    def split(x):
        return tuple(x[layer] for layer in range(n_layers))
    return {**tree, "layers": jax.tree_util.tree_map(split, tree["layers"])}


def scan_tokens(params, states, xs, boundary_token: int, read, *, feed=None, carry=None, factors=None,
                shift: int = 0):
    """The time loop that :func:`forward`, evaluation and generation share: one :func:`step` per token.

    ``states`` (L, B, D) int8; ``xs`` a pytree of time-major arrays (T, B, ...). At
    time t the input tokens (B,) are ``feed(x_t, carry)``, by default ``x_t[0]``;
    after the step ``read(logits, x_t, carry)`` returns ``(carry, out_t)``. Returns
    (final states (L, B, D), final carry, the outputs stacked on a leading time axis).
    """
    n_layers = states.shape[0]
    params, factors = unstack_layers(params, n_layers), unstack_layers(factors, n_layers)
    factors = backend.join_wf_wh_factors(factors)

    def body(loop_carry, x):
        layer_states, user_carry = loop_carry
        tokens = x[0] if feed is None else feed(x, user_carry)
        logits, layer_states = step(params, layer_states, tokens, boundary_token,
                                    backend.keep_int8_in_loop(factors, tokens), shift)
        user_carry, out = read(logits, x, user_carry)
        return (layer_states, user_carry), out

    layer_states = tuple(states[layer] for layer in range(n_layers))
    (layer_states, carry), outs = lax.scan(body, (layer_states, carry), xs)
    return jnp.stack(layer_states), carry, outs


def forward(params, states, inputs, targets, boundary_token: int, factors=None, shift: int = 0,
            return_logits: bool = False):
    """Run inputs (B, T) through the model from states (L, B, D).

    Returns (ll (B, T) int32, final states (L, B, D)[, logits (B, T, V)]); ``ll``
    is the integer log-likelihood of each target in 1/16 bits.
    """
    def read(logits, x, carry):
        ll = intmath.log_likelihood(logits, x[1])
        return carry, ((ll, logits) if return_logits else ll)

    states, _, out = scan_tokens(params, states, (inputs.T, targets.T), boundary_token, read,
                                 factors=factors, shift=shift)
    if return_logits:
        ll, logits = out
        return ll.T, states, jnp.swapaxes(logits, 0, 1)
    return out.T, states
