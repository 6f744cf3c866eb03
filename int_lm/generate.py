"""Text generation with an integer sampler on the device.

The model's next-token distribution is ``p(j) ∝ 2^(l_j / 16)`` over its int8
logits ``l``; with temperature ``T`` it is ``p(j) ∝ 2^(l_j / (16 T))``. Sampling
uses integers only:

1. **Temperature**: ``T`` is quantised to ``t = round(256 T)`` (1/256 steps). Each
   token's distance below the best logit, ``(max l - l_j) / (16 T)`` bits, is
   taken in units of 2^-16 bit: ``d_j = round(2^16 * 16 (max l - l_j) / t)`` (one
   integer division; exact for T = 1).
2. **Top-k** (optional): ``lax.top_k`` keeps the k largest logits (ties: lower id).
3. **Weights**: with ``d = 2^16 a + b``, ``w_j = W[b] >> a`` where the host-built
   table ``W[b] = round(2^(P - b / 2^16))`` has 65,536 int32 entries and
   ``P = 30 - ceil(log2 n)`` for ``n`` candidate tokens, so at most n weights of
   at most 2^P sum below 2^31 (int32). A weight's relative error is below
   ``2^-17 ln 2 + 2^-(P - a)``; tokens more than P bits less likely than the
   best get weight 0. For the byte tokenizer P = 22: the sampler's probabilities
   are within ~1e-6 of ``2^(l/(16T))`` normalised (tests/test_generate.py).
4. **Uniform integer**: 32 candidate words from int_lm.noise's counter-based hash
   of ``(seed, position, sample row)``; each is cut to ``m = ceil(log2 total)``
   bits and the first one below ``total`` is taken (exact rejection sampling; all
   32 fail with probability < 2^-32, then a deterministic fallback).
5. **Inverse CDF**: the token is the number of cumulative int32 weights ``<= u``.

Greedy decoding takes the argmax (lowest id among ties). Everything runs in one
jitted ``lax.scan``; the same seed gives the same text on every run and backend.

:class:`FixedPromptSampler` is the trainer's sample at each evaluation: a fixed
prompt from the validation split, continued at temperature 1 with a fixed seed, so
samples of one run differ only by the weights (compiled once: the shapes never change).
"""
from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from int_lm import intmath, model, noise
from int_lm.errors import UserError

TEMP_BITS = 8                  # temperature in 1/256 steps
TEMP_ONE = 1 << TEMP_BITS
MAX_TEMPERATURE = 64.0
SAMPLER_ID = 0x53414D50        # "SAMP": the sampler's stream in the counter-based hash
TRIES = 32
FRAC = 16                      # distances in 2^-16 bit


def weight_precision(candidates: int) -> int:
    """P such that ``candidates`` weights of at most 2^P sum below 2^31."""
    return 30 - max(0, (int(candidates) - 1).bit_length())


@lru_cache(maxsize=None)
def weight_table(precision: int) -> np.ndarray:
    """W[b] = round(2^(P - b / 2^16)) for b in 0 .. 2^16 - 1 (int32, at most 2^P)."""
    b = np.arange(1 << FRAC, dtype=np.float64)
    return np.rint(np.exp2(precision - b / (1 << FRAC))).astype(np.int32)


def distance(lg, top, temp_q):
    """round(2^16 * 16 (top - l) / t): 2^-16-bit units below the best logit (int32: <= 254 * 2^21 / 1)."""
    return ((top - lg) * (1 << (FRAC + 5)) + temp_q) // (2 * temp_q)


def weights(d, table):
    """W[d mod 2^16] >> (d div 2^16): zero once the shift passes P (works on NumPy and JAX arrays)."""
    shift = (d >> FRAC).clip(0, 31)
    return table[d & ((1 << FRAC) - 1)] >> shift


def quantise_temperature(temperature: float) -> int:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and 0 < temperature <= MAX_TEMPERATURE):
        raise UserError(f"--temperature must be in (0, {MAX_TEMPERATURE:g}] (use --greedy for argmax), "
                        f"got {temperature}")
    return max(1, int(round(temperature * TEMP_ONE)))


def uniform_below(keys, total):
    """An exactly uniform int32 in [0, total) per row (total in [1, 2^30]), by rejection."""
    tries = jnp.arange(TRIES, dtype=jnp.uint32)[None, :]
    bits = noise.mix32(keys[:, None] + tries * noise.GOLDEN)                                 # (B, TRIES)
    m = jnp.maximum(32 - lax.clz(jnp.maximum(total - 1, 1)), 1)                              # ceil(log2 total)
    u = (bits >> (32 - m)[:, None].astype(jnp.uint32)).astype(jnp.int32)                     # m bits
    ok = u < total[:, None]
    first = jnp.argmax(ok, axis=1)
    chosen = jnp.take_along_axis(u, first[:, None], axis=1)[:, 0]
    fallback = u[:, 0] - total  # u < 2 total, so this lies in [0, total) when u[0] was rejected
    return jnp.where(jnp.any(ok, axis=1), chosen, fallback)


def sample(logits, keys, temp_q, top_k: int = 0):
    """Draw one token per row from p(j) ∝ 2^(l_j / (16 T)); logits (B, V) int8, keys (B,) uint32."""
    lg = logits.astype(jnp.int32)
    vocab = lg.shape[-1]
    if 0 < top_k < vocab:
        lg, ids = lax.top_k(lg, top_k)
    else:
        ids = None
    n = lg.shape[-1]
    precision = weight_precision(n)
    table = jnp.asarray(weight_table(precision))
    top = jnp.max(lg, axis=-1, keepdims=True)
    w = weights(distance(lg, top, temp_q), table)
    cum = jnp.cumsum(w, axis=-1)
    u = uniform_below(keys, cum[:, -1])
    choice = jnp.sum((cum <= u[:, None]).astype(jnp.int32), axis=-1)
    if ids is not None:
        choice = jnp.take_along_axis(ids, choice[:, None], axis=1)[:, 0]
    return choice.astype(jnp.int32)


def sample_keys(seed, position, rows: int):
    return noise.stream_key(jnp.uint32(seed), jnp.asarray(position, jnp.uint32),
                            jnp.arange(rows, dtype=jnp.uint32), SAMPLER_ID)


def sampler_probabilities(logits: np.ndarray, temperature: float = 1.0, top_k: int = 0) -> np.ndarray:
    """Host, float64: the sampler's exact distribution for one logits row (used by tests)."""
    lg = np.asarray(logits, np.int64)
    t = quantise_temperature(temperature)
    cand = np.arange(lg.shape[0])
    if 0 < top_k < lg.shape[0]:
        cand = np.argsort(-lg, kind="stable")[:top_k]
    top = lg[cand].max()
    p = np.zeros(lg.shape[0])
    p[cand] = weights(distance(lg[cand], top, t), weight_table(weight_precision(len(cand))))
    return p / p.sum()


@partial(jax.jit, static_argnames=("boundary", "layers", "max_new_tokens", "top_k", "greedy"))
def _generate(params, prompt, seed, temp_q, *, boundary: int, layers: int, max_new_tokens: int,
              top_k: int, greedy: bool):
    """prompt (B, P) int32 starting with the boundary token -> (B, max_new_tokens) int32."""
    rows = prompt.shape[0]
    states = jnp.zeros((layers, rows, params["embed"].shape[1]), jnp.int8)

    def choose(logits, i):
        if greedy:
            return intmath.argmax_logits(logits)
        return sample(logits, sample_keys(seed, i, rows), temp_q, top_k)

    def keep_logits(logits, x, carry):
        return carry, logits

    states, _, prompt_logits = model.scan_tokens(params, states, (prompt.T,), boundary, keep_logits)
    first = choose(prompt_logits[-1], jnp.uint32(0))

    def choose_next(logits, i, carry):  # token i from the logits after token i - 1 (fed back as the carry)
        tok = choose(logits, i)
        return tok, tok

    positions = jnp.arange(1, max_new_tokens, dtype=jnp.uint32)
    _, _, rest = model.scan_tokens(params, states, positions, boundary, choose_next,
                                   feed=lambda i, tok: tok, carry=first)
    return jnp.concatenate([first[None], rest]).T


def generate(params, shape: model.ModelShape, prompt_ids, *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, seed: int = 0, greedy: bool = False, num_samples: int = 1) -> np.ndarray:
    """Continue ``prompt_ids`` (token ids, without the leading boundary) -> (num_samples, max_new_tokens).

    The prompt is read as the start of a fresh document (a boundary token first).
    Row r of a sampled batch uses the hash stream (seed, position, r), so row 0 is
    the same text whatever ``num_samples`` is.
    """
    if max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_samples < 1:
        raise UserError(f"--num_samples must be >= 1, got {num_samples}")
    if top_k < 0:
        raise UserError(f"--top_k must be >= 0 (0 = all tokens), got {top_k}")
    if not 0 <= seed < 2**32:
        raise UserError(f"--seed must be in [0, 2^32), got {seed}")
    temp_q = TEMP_ONE if greedy else quantise_temperature(temperature)
    ids = np.asarray(list(prompt_ids), dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= shape.vocab_size):
        raise UserError(f"prompt token ids must be in [0, {shape.vocab_size})")
    prompt = np.concatenate([[shape.boundary_token], ids]).astype(np.int32)
    prompt = np.repeat(prompt[None, :], num_samples, axis=0)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    out = _generate(params, jnp.asarray(prompt), np.uint32(seed), np.int32(temp_q),
                    boundary=shape.boundary_token, layers=shape.layers, max_new_tokens=int(max_new_tokens),
                    top_k=int(top_k), greedy=bool(greedy))
    return np.asarray(out)


def cut_at_boundary(ids: np.ndarray, boundary: int) -> tuple[np.ndarray, bool]:
    """Tokens before the first generated boundary token (end of document), and whether one was found."""
    hits = np.nonzero(np.asarray(ids) == boundary)[0]
    return (ids[: hits[0]], True) if hits.size else (ids, False)


def safe_text(data: bytes) -> str:
    """Bytes shown safely: valid UTF-8 as text, other bytes as \\xNN, control characters escaped."""
    text = data.decode("utf-8", errors="backslashreplace")
    out = []
    for ch in text:
        if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cs"):
            out.append(ch)
        else:
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
    return "".join(out)


def describe(args: Any) -> str:
    if args.greedy:
        return "greedy"
    return f"temperature {args.temperature:g}, top-k {args.top_k or 'all'}, seed {args.seed}"


PROMPT_TOKENS = 64             # the trainer's sample: prompt length, in tokens
PROMPT_SEARCH = 256            # ... starting at the first line start among this many tokens
SAMPLE_SEED = 0


def line_start_prompt(tokens, boundary: int, decode_bytes: Callable, length: int = PROMPT_TOKENS,
                      search: int = PROMPT_SEARCH) -> np.ndarray:
    """Up to ``length`` tokens of ``tokens`` from the first line start: after the first token among
    the first ``search`` that ends a line or a document (the start if none), cut at the next
    document boundary. Deterministic: the same split gives the same prompt."""
    head = np.asarray(tokens[: search + length]).astype(np.int64)
    start = 0
    for i, t in enumerate(head[:search]):
        if t == boundary or decode_bytes([int(t)]).endswith(b"\n"):
            start = i + 1
            break
    ids, _ = cut_at_boundary(head[start:start + length], boundary)
    return ids


@dataclass(frozen=True)
class FixedPromptSampler:
    """``new_tokens`` sampled after a fixed prompt at temperature 1 with a fixed seed (one row).

    ``sampler(params)`` returns the continuation as safe text, cut at an end of document
    (then ending in ``[end of document]``). The integer sampler draws from its own hash
    stream of (seed, position), so it touches no training randomness; the prompt length
    and ``new_tokens`` are fixed, so it compiles once.
    """
    shape: model.ModelShape
    prompt_ids: tuple
    decode_bytes: Callable
    new_tokens: int
    seed: int = SAMPLE_SEED

    @property
    def prompt(self) -> str:
        return safe_text(self.decode_bytes(list(self.prompt_ids)))

    def __call__(self, params) -> str:
        row = generate(params, self.shape, self.prompt_ids, max_new_tokens=self.new_tokens,
                       temperature=1.0, seed=self.seed)[0]
        ids, ended = cut_at_boundary(row, self.shape.boundary_token)
        return safe_text(self.decode_bytes(ids)) + ("\n[end of document]" if ended else "")

    def describe(self) -> str:
        return f"{self.new_tokens} tokens, temperature 1, seed {self.seed}"
