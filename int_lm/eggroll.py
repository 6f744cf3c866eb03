"""EGGROLL: low-rank integer evolution strategies for EGG, as pure functions.

One step: for each chunk of the population, draw each pair's noise (int8
factors A, B per matrix; two int8 vectors per vector parameter), run the
chunk's members (pair k: +A for member 2k, -A for 2k+1) through the model
with ``model.forward``'s perturbation hook (which takes the factors per pair),
score each member by its summed integer log-likelihood, shape the pair into
``F_k = sign(s_2k - s_2k+1)`` and add the chunk's vote ``Z += sum_k F_k A_k B_k^T``
(one int8 GEMM with int32 accumulation). What the votes do to the weights is
the update rule's business (``int_lm/optim``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
from jax import lax

from int_lm import backend, intmath, model
from int_lm.noise import pair_noise
from int_lm.errors import UserError

# Exact vote accumulation across chunks: Z = hi * 2^CARRY_BITS + lo, lo in [0, 2^CARRY_BITS).
CARRY_BITS = 20
HI_CLAMP = 1 << 10  # |hi| beyond this means |Z| >= 2^30, far above any threshold


@dataclass(frozen=True)
class EggrollSpec:
    """Static description of one EGGROLL configuration (hashable: a jit static arg)."""
    shape: model.ModelShape
    population: int
    rank: int = 1
    sigma_shift: int = 4
    group_size: int = 2
    chunk_size: int = 0
    fitness_levels: int = 1     # 1: F = sign(s_2k - s_2k+1) (published); L > 1: signed ranks in [-L, L]

    @classmethod
    def from_config(cls, cfg) -> "EggrollSpec":
        return cls(model.ModelShape.from_config(cfg.model), cfg.es.population, cfg.es.rank,
                   cfg.es.sigma_shift, cfg.es.group_size, cfg.es.chunk_size, cfg.es.fitness_levels)

    @property
    def chunk(self) -> int:
        return self.chunk_size or self.population

    @property
    def rank_shift(self) -> int:
        """Scale rank-r noise by 2^-ceil(log2(r)/2) ~ 1/sqrt(r) (exact when r is a power of 4)."""
        return (math.ceil(math.log2(self.rank) / 2)) if self.rank > 1 else 0

    @property
    def matrix_shift(self) -> int:
        return intmath.FRAC_BITS + self.sigma_shift + self.rank_shift

    @property
    def vector_shift(self) -> int:
        return intmath.FRAC_BITS + self.sigma_shift


def check_limits(spec: EggrollSpec) -> None:
    """Refuse settings whose worst case could overflow int32 (message names the key)."""
    d = spec.shape.width
    for n in (d, 4 * d):
        worst = n * 127 * 127 + ((spec.rank * n * 127 ** 3) >> spec.matrix_shift)
        if worst >= 2 ** 31:
            raise UserError(f"es.rank={spec.rank} with es.sigma_shift={spec.sigma_shift} can overflow "
                            f"int32 at width {d}; raise es.sigma_shift or lower es.rank")
    # The split path sums r low parts (< 2^shift each) times |a| <= 127 before shifting.
    if spec.rank * 127 * ((1 << spec.matrix_shift) - 1) >= 2 ** 31:
        raise UserError(f"es.rank={spec.rank} with es.sigma_shift={spec.sigma_shift} can overflow int32; "
                        f"lower es.sigma_shift or es.rank")
    # |F_k a b| summed over r; with levels > 1 the hi part of F a (see ``vote``) is at most 127 L + 127
    worst_pair = spec.rank * 127 * (127 if spec.fitness_levels == 1 else 127 * spec.fitness_levels + 127)
    if (spec.chunk // 2) * worst_pair >= 2 ** 31 - 2 ** CARRY_BITS:
        raise UserError(f"es.chunk_size={spec.chunk} x es.rank={spec.rank} x es.fitness_levels="
                        f"{spec.fitness_levels} is too large for an exact int32 vote; set es.chunk_size to at most "
                        f"{(2 * ((2**31 - 2**CARRY_BITS) // worst_pair)) & ~1}")


def pair_axis(path) -> int:
    """Where a parameter's noise keeps its pair axis: after the layer axis for stacked layers."""
    return 1 if path[0] == "layers" else 0


def make_noise(spec: EggrollSpec, seed, epoch, pairs) -> dict:
    """Noise for ``pairs`` (P,) int32 global pair ids: {path: (A, B)} int8, layers first.

    Matrices (out, n): A (P, r, out), B (P, r, n); stacked (L, out, n): A (L, P, r, out),
    B (L, P, r, n). Vectors (D,): a, b both (P, D); stacked (L, D): (L, P, D).
    Each parameter has one stream per pair: A is its first elements, B the rest,
    both in (L, r, .) order (the layout only places the pair axis).
    """
    noise = {}
    r = spec.rank
    for pid, (path, shape, matrix) in enumerate(model.param_leaves(spec.shape)):
        if matrix:
            lead, (out, n) = shape[:-2], shape[-2:]
            a_shape, b_shape = lead + (r, out), lead + (r, n)
        else:
            a_shape = b_shape = shape
        axis = pair_axis(path)
        noise[path] = (pair_noise(seed, epoch, pairs, pid, a_shape, pair_axis=axis),
                       pair_noise(seed, epoch, pairs, pid, b_shape, offset=int(np.prod(a_shape)),
                                  pair_axis=axis))
    return noise


def member_model_inputs(spec: EggrollSpec, params, noise):
    """(Per-member perturbed vectors, per-pair low-rank factors) for ``model.forward``.

    Member 2k gets +noise k, member 2k+1 gets -noise k: the model applies the
    sign to each pair's A (``model.lowrank_term``); for vectors it sits on the
    product a*b, before the shift. The noise is already in the model's layout.
    """
    member_params = {**params, "layers": dict(params["layers"])}
    factors = {"layers": {}}
    for path, (a, b) in noise.items():
        if model.is_matrix(path):  # low-rank factors, one per pair
            model.set_leaf(factors, path, (a, b))
            continue
        base = model.get_leaf(params, path)  # (D,) or (L, D); noise (P, D) or (L, P, D)
        prod = a.astype(jnp.int32) * b.astype(jnp.int32)
        delta = (jnp.expand_dims(prod, -2) * jnp.array([[1], [-1]], jnp.int32)) >> spec.vector_shift
        delta = delta.reshape(prod.shape[:-2] + (2 * prod.shape[-2], prod.shape[-1]))  # pairs -> members
        value = intmath.sat8(jnp.expand_dims(base, -2).astype(jnp.int32) + delta)
        model.set_leaf(member_params, path, value)
    return member_params, factors


def shape_fitness(scores, levels: int = 1):
    """Fitness of each antithetic pair from the members' scores (2P,): F (P,) int32 in [-levels, levels].

    ``levels = 1`` is the published shaping, ``F_k = sign(s_2k - s_2k+1)``. With
    ``levels = L > 1`` F keeps that sign and grows with the size of the difference:
    ``F_k = sign(d_k) (1 + floor(L rank_k / P))``, rank_k the place of |d_k| among
    all P pairs given (ties by pair order), so the quarter of pairs whose members
    differ most weighs about L times the quarter that differs least. Ranks, not
    the raw differences: robust to the scale of d, which varies with the text,
    sigma and training time. Integers only (an int32 sort).
    """
    d = scores[0::2] - scores[1::2]
    sign = jnp.sign(d).astype(jnp.int32)
    if levels == 1:
        return sign
    p = d.shape[0]
    order = jnp.argsort(jnp.abs(d), stable=True)
    rank = jnp.zeros((p,), jnp.int32).at[order].set(jnp.arange(p, dtype=jnp.int32))
    return sign * (1 + (rank * levels) // p)


def fitness_second_moment(pairs: int, levels: int) -> float:
    """E[F^2] of ``shape_fitness`` over ``pairs`` pairs when no difference is 0 (host side).

    The vote's null standard deviation scales with sqrt(E[F^2]); update rules use it
    to calibrate thresholds and step sizes (1 for sign shaping).
    """
    if levels == 1:
        return 1.0
    q = 1 + (np.arange(pairs, dtype=np.int64) * levels) // pairs
    return float(np.mean(q * q))


def vote(noise, fitness, levels: int = 1) -> dict:
    """Z = sum_k F_k A_k B_k^T per matrix (int8 GEMMs, int32 sums); sum_k F_k a_k b_k per vector.

    With |F| <= 1, F A is still int8: one int8 GEMM per matrix. With |F| <= levels > 1,
    F A (|F A| <= 127 L) is split as 128 hi + lo with lo in [0, 127] and hi in [-L, L],
    both int8, and Z = 128 (hi . B) + lo . B: two int8 GEMMs, every partial sum exact.
    """
    z = {}
    for path, (a, b) in noise.items():
        axis = pair_axis(path)
        f_shape = [1] * a.ndim
        f_shape[axis] = -1
        f = fitness.reshape(f_shape)
        if not model.is_matrix(path):
            z[path] = jnp.sum(f * a.astype(jnp.int32) * b.astype(jnp.int32), axis=axis)
            continue
        if a.ndim == 3:   # (P, r, out) x (P, r, n) -> (out, n)
            dims = (((0, 1), (0, 1)), ((), ()))
        else:             # (L, P, r, out) x (L, P, r, n) -> (L, out, n)
            dims = (((1, 2), (1, 2)), ((0,), (0,)))
        if levels == 1:
            fa = a * f.astype(jnp.int8)  # |F A| <= 127: still int8
            z[path] = lax.dot_general(fa, b, dims, preferred_element_type=jnp.int32)
            continue
        fa = a.astype(jnp.int32) * f
        hi, lo = (fa >> 7).astype(jnp.int8), (fa & 127).astype(jnp.int8)
        z[path] = (lax.dot_general(hi, b, dims, preferred_element_type=jnp.int32) << 7) \
            + lax.dot_general(lo, b, dims, preferred_element_type=jnp.int32)
    return z


def zero_votes(spec: EggrollSpec) -> dict:
    return {path: (jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.int32))
            for path, shape, _ in model.param_leaves(spec.shape)}


def accumulate(acc: dict, z: dict) -> dict:
    """Exact running sum (hi * 2^20 + lo) of chunk votes: cannot overflow for N up to 2^20 and beyond."""
    out = {}
    for path, (hi, lo) in acc.items():
        t = lo + z[path]
        out[path] = (hi + (t >> CARRY_BITS), t & ((1 << CARRY_BITS) - 1))
    return out


def vote_value(hi, lo):
    """Z as int32: exact when |Z| < 2^30 - 2^20, else saturated (same sign, |Z| >= 2^30 - 2^20)."""
    return jnp.clip(hi, -HI_CLAMP, HI_CLAMP) * (1 << CARRY_BITS) + lo


# ---------------------------------------------------------------------------
# One population step
# ---------------------------------------------------------------------------

def member_log_likelihoods(spec: EggrollSpec, params, noise, states, tokens):
    """Run the members of ``noise``'s pairs on tokens (B, T+1); returns (ll per token (B, T), states)."""
    member_params, factors = member_model_inputs(spec, params, noise)
    return model.forward(member_params, states, tokens[:, :-1], tokens[:, 1:],
                         spec.shape.boundary_token, factors, spec.matrix_shift)


def evaluate_members(spec: EggrollSpec, params, noise, states, tokens):
    """Run the members of ``noise``'s pairs on tokens (B, T+1); returns (scores (B,), states)."""
    ll, states = member_log_likelihoods(spec, params, noise, states, tokens)
    return jnp.sum(ll, axis=1), states


def population_votes(spec: EggrollSpec, params, states, tokens, seed, epoch, pair_offset=0,
                     gather_scores=None):
    """All chunks of a (local) population: returns (votes (hi, lo), scores, states).

    ``states`` (L, B, D) and ``tokens`` (B / group_size, T+1) hold this device's
    B members; ``pair_offset`` is the global id of its first pair. With sign
    shaping each chunk votes as soon as it is scored. Rank shaping
    (``spec.fitness_levels > 1``) needs every pair's score first: a first pass
    scores all chunks, ``gather_scores`` (identity on one device; the exact
    all-device gather under ``shard_map``) gives the whole population's scores,
    and a second pass votes with the ranked fitness, redrawing each chunk's noise (a
    pure function of its ids; a single chunk keeps its noise from the first pass).
    """
    members = states.shape[1]
    chunk = min(spec.chunk, members)
    n_chunks = members // chunk
    g = spec.group_size
    ranked = spec.fitness_levels > 1

    def chunk_noise(c, chunk_tokens):
        pairs = pair_offset + c * chunk // 2 + jnp.arange(chunk // 2, dtype=jnp.int32)
        return backend.draw_noise_fused(lambda: make_noise(spec, seed, epoch, pairs), chunk_tokens)

    def run_chunk(c, states, acc):
        first = c * chunk
        chunk_tokens = tokens[(first + jnp.arange(chunk)) // g]
        noise = chunk_noise(c, chunk_tokens)
        st = lax.dynamic_slice_in_dim(states, first, chunk, axis=1)
        scores, st = evaluate_members(spec, params, noise, st, chunk_tokens)
        if not ranked:
            acc = accumulate(acc, vote(noise, shape_fitness(scores)))
        return lax.dynamic_update_slice_in_dim(states, st, first, axis=1), acc, scores, noise

    noise = None
    if n_chunks == 1:   # one chunk: its noise is still at hand for a ranked vote
        states, acc, scores, noise = run_chunk(0, states, zero_votes(spec))
    else:
        def body(c, carry):
            states, acc, all_scores = carry
            states, acc, scores, _ = run_chunk(c, states, acc)
            return states, acc, lax.dynamic_update_slice_in_dim(all_scores, scores, c * chunk, axis=0)

        init = (states, zero_votes(spec), jnp.zeros((members,), jnp.int32))
        states, acc, scores = lax.fori_loop(0, n_chunks, body, init)
    if not ranked:
        return acc, scores, states

    everyone = scores if gather_scores is None else gather_scores(scores)
    fitness = lax.dynamic_slice_in_dim(shape_fitness(everyone, spec.fitness_levels), pair_offset, members // 2)

    def vote_chunk(c, acc):
        chunk_tokens = lax.dynamic_slice_in_dim(tokens, c * chunk // g, max(1, chunk // g), axis=0)
        f = lax.dynamic_slice_in_dim(fitness, c * chunk // 2, chunk // 2)
        return accumulate(acc, vote(chunk_noise(c, chunk_tokens), f, spec.fitness_levels))

    if n_chunks == 1:
        return accumulate(acc, vote(noise, fitness, spec.fitness_levels)), scores, states
    return lax.fori_loop(0, n_chunks, vote_chunk, zero_votes(spec)), scores, states
