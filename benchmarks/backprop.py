#!/usr/bin/env python
"""The backprop baseline: EGG's network in float32, trained by backpropagation with Adam.

    python benchmarks/backprop.py --config configs/tinyshakespeare.toml --data.source PATH --seconds 60

The same shape as the integer model (``int_lm/model.py``, docs/integer-spec.md): an
embedding V x D, L pre-norm residual blocks ``x + GRU(ln1(x), s)`` then
``x + down(up(ln2(x)))``, ``ln_out`` and the head; only the number format and the
training method differ. It answers "how far is gradient-free integer training from
backprop at equal wall-clock on this machine?" (``benchmarks/learning.py`` runs both).

The float twin: every integer op in real units
-----------------------------------------------
An int8 value ``a`` stands for the real ``a / 16``; here every tensor holds that real
value directly, in float32. Writing ``S = 127/16`` (the largest int8 value in real units):

* ``sat8(x)`` -> ``clip(x, -S, S)``; a saturating add ``sat8(a + b + c)`` ->
  ``clip(a + b + c, -S, S)``.
* scaled matmul ``sat8(floor(u.M^T / (16 isqrt(n))))`` -> ``clip(u.M^T / isqrt(n), -S, S)``
  (u and M real: the int32 dot is 256 times the real one, the division by 16 isqrt(n)
  leaves 16 times the real result, i.e. the real result in int8 units).
* layer norm ``sat8((u w) // max(1, mean|u|))`` -> ``clip(u w / max(mean|u|, 1/16), -S, S)``.
* GRU gate ``g = f + 127`` read as ``g / 256`` -> ``g = f / 16 + 127/256``, in [0, 254/256]
  for f in [-S, S]; ``sat8((g s) >> 8)`` -> ``g s``; ``sat8(s + (g (hc - s)) >> 8)`` ->
  ``clip(s + g (hc - s), -S, S)``. The "sigmoid" and "tanh" are the identity, as in EGG:
  saturation is the only nonlinearity.
* logits are base-2 log-probabilities: the integer model's ``p(j)`` is proportional to
  ``2^(logit_j / 16)``, i.e. ``2^(real logit_j)``, so the loss is
  ``log2(sum_j 2^z_j) - z_target`` bits per token (z real, in [-S, S]).
* the recurrent state of every layer resets to zero where the input is the boundary token.

Floors and integer rounding are the only differences (each op loses under 1/16); the
gradient of ``clip`` is zero where it saturates, as the function says. The state-free
products (the GRU's input matmuls, the MLP, the head) run for all tokens at once, outside
the token loop: the same numbers, far fewer small matmuls. ``forward(..., floors=True)``
rounds down to the 1/16 grid wherever the integer model rounds, and then reproduces the
integer model's logits / 16 and states exactly (``tests/test_learning_benchmark.py``, on
init and random int8 weights); without the floors, the function trained here, the logits
stay within the rounding's reach (same test file).

Initialisation literally the integer model's: ``model.init_params(shape, seed) / 16``
(matrices round(16 N(0,1)) / 16, i.e. N(0, 1) on a 1/16 grid; norm weights 1, biases 0;
the head and embedding at the config's ``model.head_init_std`` / ``model.embed_init_std``,
standard deviation 4 / 16 = 1/4 in ``configs/tinyshakespeare.toml``), so both start from the same network.

Training and measurement
------------------------
Batches of B sequences of T + 1 tokens (defaults B = 64, T = 128) at uniformly random
offsets of the training split (NumPy generator seeded by ``--seed``); each sequence starts
from the zero state. Adam (optax) at ``--lr``, constant, loss in bits per token.

The learning rate is 0.05 by default, not the 3e-3 usual for float nets: the weights here
are in the spec's units (N(0, 1), the matmul divides by isqrt(n)), where an Adam step of
3e-3 moves a D x D matrix 8 times less, relative to its scale, than it would in the usual
N(0, 1/n) parameterisation (16 times for ``down``). Measured on tinyshakespeare (1 x 64,
B 64 x T 128, seed 0), validation bits/byte after 300 / 1000 steps: lr 3e-3: 3.34 / 2.81;
0.01: 2.87 / -; 0.03: 2.69 / -; 0.05: 2.62 / 2.44; 0.1: 2.61 / 2.48; 0.2: 2.72 / -;
0.4: 3.05 / -.

Validation exactly as the ES trainer's validator (``trainer.make_validator``): the same
fixed slice of the validation split (``data.eval_slice`` with the rows/length formula of
``trainer.build_run``: up to 16 rows of ``val_tokens / rows`` tokens), state carried along
each row from zero, bits from the float logits summed in float64 and divided by the slice's
exact bytes (``data.eval_slice_bytes``). The unigram/bigram/compressor baselines are
``data.baselines`` on the validation split, as the trainer logs them.

The clock: ``time_s`` starts just before the first step (so it includes compiling it,
as the ES trainer's ``time_s`` does) and includes every evaluation (also as there).
Evaluations run every ``--eval-every-s`` seconds of that clock; training stops early
enough that the last evaluation should end within ``--seconds`` (estimated from the
previous step and evaluation). Setup (corpus, baselines) is outside the clock on both sides.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path[:1]:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from int_lm import config  # noqa: E402
from int_lm import data  # noqa: E402
from int_lm import model  # noqa: E402

SCALE = 16.0           # an int8 value a stands for a / 16
SAT = 127.0 / SCALE    # sat8's bound in real units
STARTED = "backprop: training started"   # learning.py waits for this line
DEFAULT_LR = 0.05                        # Adam's step in these units (not 3e-3): see "Training" above


# ---------------------------------------------------------------------------
# The float twin of the integer model
# ---------------------------------------------------------------------------

def from_int(int_params):
    """Integer parameters -> the same network in real units (float32 = int8 / 16)."""
    return jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float32) / SCALE, int_params)


def to_int(params):
    """Real parameters -> int8 (round to the 1/16 grid, clip to +-127): for comparing the two forwards."""
    return jax.tree_util.tree_map(
        lambda p: jnp.clip(jnp.rint(jnp.asarray(p) * SCALE), -127, 127).astype(jnp.int8), params)


def init_params(shape: model.ModelShape, seed: int):
    """The integer model's initialisation (the config's, see the module docstring) divided by 16."""
    return from_int(model.init_params(shape, seed))


def sat(x):
    return jnp.clip(x, -SAT, SAT)


class Real:
    """The real-number ops: plain division, no rounding (training and evaluation)."""

    @staticmethod
    def div(num, den):
        return num / den

    @staticmethod
    def rnd(x):
        return x


class Floors:
    """Rounding down to the 1/16 grid wherever the integer model rounds (only to check the mapping).

    On values from the int8 grid, ``div`` gives the integer op's floor exactly: in int8 units
    it is floor(256 num / (16 den)) with both sides integers held exactly in float32 (under
    2^24), a rounded quotient corrected by one where the product disagrees (XLA may divide
    by multiplying with a reciprocal, so a bare floor of the quotient can miss by one).
    """

    @staticmethod
    def div(num, den):
        n, d = num * 256.0, den * 16.0
        k = jnp.round(n / d)
        k = k - (k * d > n)
        k = k + ((k + 1) * d <= n)
        return k / SCALE

    @staticmethod
    def rnd(x):
        return jnp.floor(x * SCALE) / SCALE


def matmul(u, w, r=Real):
    """clip(u . w^T / isqrt(n)): the integer scaled matmul in real units (n = w.shape[1]).

    u (..., n) is flattened to one 2-D product (XLA's CPU dot is slower on 3-D operands).
    """
    out = (u.reshape(-1, u.shape[-1]) @ w.T).reshape(*u.shape[:-1], w.shape[0])
    return sat(r.div(out, math.isqrt(w.shape[1])))


def layer_norm(u, w, r=Real):
    """clip(u w / max(mean|u|, 1/16)): the square-root-free integer layer norm in real units."""
    m = jnp.maximum(r.div(jnp.sum(jnp.abs(u), axis=-1, keepdims=True), u.shape[-1]), 1.0 / SCALE)
    return sat(r.div(u * w, m))


def gru_scan(x, s0, reset, lp, layer, r=Real):
    """EGG's minGRU over a sequence, time-major: x (T, B, D) normed inputs, s0 (B, D), reset (T, B)
    -> states (T, B, D) and the last state.

    Per token: ``f = sat(mm(x, Wf) + mm(s, Uf) + bf)``, gate ``g = f/16 + 127/256`` in [0, 1)
    (identity 'sigmoid'), ``sg = g s``, ``hc = sat(mm(x, Wh) + mm(sg, Uh) + bh)`` (identity
    'tanh'), ``h = sat(s + g (hc - s))``; the state is zeroed first where ``reset``. The input
    products mm(x, Wf) and mm(x, Wh) do not depend on the state, so they run for every token
    at once outside the loop (the same numbers, far fewer small matmuls on a CPU).
    """
    fx = matmul(x, lp["Wf"][layer], r)
    hx = matmul(x, lp["Wh"][layer], r)
    uf, uh, bf, bh = lp["Uf"][layer], lp["Uh"][layer], lp["bf"][layer], lp["bh"][layer]

    def body(s, xs):
        fx_t, hx_t, reset_t = xs
        s = jnp.where(reset_t[:, None], 0.0, s)
        f = sat(fx_t + matmul(s, uf, r) + bf)
        g = f / SCALE + 127.0 / 256.0
        sg = r.rnd(g * s)
        hc = sat(hx_t + matmul(sg, uh, r) + bh)
        h = sat(s + r.rnd(g * (hc - s)))
        return h, h

    last, hs = lax.scan(body, s0, (fx, hx, reset))
    return hs, last


def zero_state(shape: model.ModelShape, batch: int):
    return jnp.zeros((shape.layers, batch, shape.width), jnp.float32)


def forward(params, states, inputs, boundary_token: int, floors: bool = False):
    """inputs (B, T) from states (L, B, D) -> (real logits (B, T, V), final states (L, B, D))."""
    logits, finals = forward_time_major(params, states, inputs, boundary_token, floors)
    return jnp.swapaxes(logits, 0, 1), finals


def forward_time_major(params, states, inputs, boundary_token: int, floors: bool = False):
    """:func:`forward` with logits (T, B, V), as computed (the loss reads them so, with no transpose).

    Layer by layer: ``x = sat(x + GRU(ln1(x), s))``, then ``x = sat(x + mm(mm(ln2(x), up),
    down))``; logits ``mm(ln_out(x), head)``. Only the GRU's state update runs token by token.
    ``floors=True`` rounds down to the 1/16 grid wherever the integer model rounds: on
    weights from the int8 grid that reproduces the integer model's logits / 16 exactly
    (the test of the mapping). Training and evaluation use the plain real-number function.
    """
    r = Floors if floors else Real
    reset = inputs.T == boundary_token          # time-major inside: (T, B, ...)
    x = params["embed"][inputs.T]
    lp = params["layers"]
    finals = []
    for layer in range(states.shape[0]):
        h, last = gru_scan(layer_norm(x, lp["ln1"][layer], r), states[layer], reset, lp, layer, r)
        x = sat(x + h)
        up = matmul(layer_norm(x, lp["ln2"][layer], r), lp["up"][layer], r)
        x = sat(x + matmul(up, lp["down"][layer], r))
        finals.append(last)
    head = params["head"] if "head" in params else params["embed"]   # model.tie_head: the embedding table
    return matmul(layer_norm(x, params["ln_out"], r), head, r), jnp.stack(finals)


def bits_per_token(logits, targets):
    """-log2 p(target) with p(j) proportional to 2^logit_j (base-2 log-probabilities)."""
    lse2 = jax.nn.logsumexp(logits * math.log(2.0), axis=-1) / math.log(2.0)
    z_t = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse2 - z_t


# ---------------------------------------------------------------------------
# Data, validation, training
# ---------------------------------------------------------------------------

def val_slice_shape(cfg, val_split) -> tuple[int, int]:
    """(rows, length) of the validation slice: the formula of ``trainer.build_run``."""
    val_rows = max(1, min(16, cfg.data.val_tokens // 256))
    val_len = max(1, min(cfg.data.val_tokens // val_rows, (len(val_split) - 1) // val_rows))
    return val_rows, val_len


def make_validator(shape: model.ModelShape, block: np.ndarray, num_bytes: int):
    """Bits per byte on the fixed block (state carried along each row from zero), like the trainer's."""
    inputs, targets = jnp.asarray(block[:, :-1]), jnp.asarray(block[:, 1:])
    state0 = zero_state(shape, block.shape[0])

    @jax.jit
    def bits_of(params):
        logits, _ = forward_time_major(params, state0, inputs, shape.boundary_token)
        return bits_per_token(logits, targets.T)

    def validate(params) -> float:
        return float(np.asarray(bits_of(params), np.float64).sum()) / num_bytes

    return validate


class RandomBatches:
    """(B, T + 1) windows of the training split at uniform offsets, from a seeded NumPy generator."""

    def __init__(self, split, batch: int, seq_len: int, seed: int):
        self.tokens, self.batch, self.T = split.tokens, batch, seq_len
        self.n = len(split)
        if self.n < seq_len + 2:
            raise ValueError(f"the training split has {self.n} tokens, fewer than seq_len + 2 = {seq_len + 2}")
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, 0xBAC4]))
        self.idx = np.arange(seq_len + 1, dtype=np.int64)[None, :]

    def next(self) -> np.ndarray:
        starts = self.rng.integers(0, self.n - self.T - 1, self.batch)
        return np.asarray(self.tokens[starts[:, None] + self.idx]).astype(np.int32)


def make_train_step(shape: model.ModelShape, opt, batch: int):
    state0 = zero_state(shape, batch)

    def loss_fn(params, tokens):
        logits, _ = forward_time_major(params, state0, tokens[:, :-1], shape.boundary_token)
        return jnp.mean(bits_per_token(logits, tokens[:, 1:].T))

    @jax.jit
    def train_step(params, opt_state, tokens):
        import optax
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def cpu_seconds() -> float:
    """User + system CPU time of this process: against wall time, the share of the machine it got."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load(cfg):
    """(cfg with the tokenizer's vocabulary, shape, corpus, validation baselines) as the trainer sets them up."""
    import dataclasses
    tok = data.make_tokenizer(cfg.data)
    cfg = config.validate(dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, vocab_size=tok.vocab_size, boundary_token=tok.boundary_token)))
    corpus = data.load_corpus(cfg.data, tok, progress=False)
    ref = data.baselines(corpus, tok)
    val_ref = {"unigram": ref["unigram"]["validation"], "bigram": ref["bigram"]["validation"]}
    if ref.get("compress", {}).get("validation"):
        val_ref["compressor"] = ref["compress"]["validation"]["best"]
    return cfg, model.ModelShape.from_config(cfg.model), corpus, val_ref


def train(cfg, *, seconds: float, batch: int = 64, seq_len: int = 128, lr: float = DEFAULT_LR, seed: int = 0,
          eval_every_s: float = 5.0, log=print) -> dict:
    """Train for ``seconds`` of wall clock; returns the curve and the run's settings and results."""
    import optax

    cfg, shape, corpus, val_ref = load(cfg)
    val_split = corpus.split("validation")
    rows, length = val_slice_shape(cfg, val_split)
    validate = make_validator(shape, data.eval_slice(val_split, rows, length),
                              data.eval_slice_bytes(val_split, rows, length))
    batches = RandomBatches(corpus.split("train"), batch, seq_len, seed)
    params = init_params(shape, seed)
    opt = optax.adam(lr)
    opt_state = opt.init(params)
    train_step = make_train_step(shape, opt, batch)
    n_params = int(sum(p.size for p in jax.tree_util.tree_leaves(params)))
    log(f"backprop: {shape.layers} layers x {shape.width} wide, V={shape.vocab_size} ({n_params:,} float32 "
        f"parameters), Adam lr {lr}, batch {batch} x {seq_len} tokens, seed {seed}; validation slice "
        f"{rows} x {length} tokens; baselines " + ", ".join(f"{k} {v:.3f}" for k, v in val_ref.items()))
    print(STARTED, flush=True)

    curve, step_s, losses = [], [], []
    t_start, cpu0 = time.perf_counter(), cpu_seconds()
    last_eval, eval_s, steps = t_start, 0.0, 0
    while True:
        tokens = batches.next()
        t0 = time.perf_counter()
        params, opt_state, loss = train_step(params, opt_state, tokens)
        losses.append(float(loss))
        t1 = time.perf_counter()
        step_s.append(t1 - t0)
        steps += 1
        elapsed = t1 - t_start
        # Stop once another step and the final evaluation would pass the budget.
        final = elapsed + (t1 - t0) + max(eval_s, t1 - t0) >= seconds
        if final or t1 - last_eval >= eval_every_s:
            e0 = time.perf_counter()
            val = validate(params)
            last_eval = time.perf_counter()
            eval_s = last_eval - e0
            curve.append({"time_s": last_eval - t_start, "step": steps, "val_bits_per_byte": val,
                          "train_bits_per_token": float(np.mean(losses[-20:])), "eval_s": eval_s,
                          "cpu_s": cpu_seconds() - cpu0})
            point = curve[-1]
            log(f"backprop: {point['time_s']:7.1f} s  step {steps:6d}  train {point['train_bits_per_token']:.3f}"
                f"  val {val:.4f} bits/byte", flush=True)
        if final:
            break
    rates = [batch * seq_len / s for s in step_s[1:]] or [batch * seq_len / step_s[0]]
    return {
        "kind": "backprop",
        "settings": {"batch": batch, "seq_len": seq_len, "lr": lr, "seed": seed, "optimizer": "adam",
                     "eval_every_s": eval_every_s, "seconds": seconds, "layers": shape.layers,
                     "width": shape.width, "vocab_size": shape.vocab_size, "parameters": n_params,
                     "val_slice": [rows, length], "data_source": cfg.data.source},
        "curve": curve,
        "steps": steps,
        "wall_s": time.perf_counter() - t_start,
        "cpu_s": cpu_seconds() - cpu0,
        "first_step_s": step_s[0],
        "tokens_per_s": float(np.median(rates)),
        "baselines": val_ref,
        "backend": jax.default_backend(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.toml", help="TOML config (model and data sections used)")
    parser.add_argument("--seconds", type=float, default=60.0, help="wall-clock budget (s)")
    parser.add_argument("--batch", type=int, default=64, help="sequences per batch (B)")
    parser.add_argument("--seq_len", "--seq-len", type=int, default=128, help="tokens per sequence (T)")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help="Adam learning rate (see the module docstring)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch sampling seed")
    parser.add_argument("--eval_every_s", "--eval-every-s", type=float, default=5.0,
                        help="seconds of training between validations")
    parser.add_argument("--json", default="", help="write the result (curve, settings) to this file")
    values, rest = config.parse_overrides(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(rest)
    cfg = config.validate(config.apply_values(config.load_file(args.config), values, "the command line"))
    try:
        import optax  # noqa: F401
    except ImportError:
        print("error: the backprop baseline needs optax: pip install -e \".[bench]\"", file=sys.stderr)
        return 2
    result = train(cfg, seconds=args.seconds, batch=args.batch, seq_len=args.seq_len, lr=args.lr,
                   seed=args.seed, eval_every_s=args.eval_every_s)
    result["command"] = [sys.executable, *sys.argv]
    end = result["curve"][-1]
    print(f"backprop: done: {result['steps']} steps in {result['wall_s']:.1f} s, val {end['val_bits_per_byte']:.4f} "
          f"bits/byte at {end['time_s']:.1f} s, {result['tokens_per_s']:,.0f} tokens/s (median step), "
          f"{result['cpu_s']:.1f} CPU s ({result['cpu_s'] / result['wall_s']:.2f} cores on average)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
