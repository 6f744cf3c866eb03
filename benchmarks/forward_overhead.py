#!/usr/bin/env python
"""Where the perturbed forward's extra time goes, by CPU time in one process.

    python benchmarks/forward_overhead.py                  # 6 x 256, 128 members, 50 tokens
    python benchmarks/forward_overhead.py --members 256 --tokens 20 --layers 2 --width 128

Times the forward pass alone (no noise making, fitness or vote) several ways: the
unperturbed model (inference); the full EGGROLL perturbation; per-member vector
parameters only; low-rank matrix factors only; members that perturb only the head,
reading trunk outputs they share (the head matmul with its rank-1 term and the integer
log-likelihood per token: what a head-only member would cost, docs/training.md); and the
unperturbed and perturbed forward **layer-major** (:func:`forward_layer_major`: only the
recurrence in the time loop, every state-free product for all tokens at once, as cuDNN-style
RNNs and ``benchmarks/backprop.py`` do; the same integers, checked here bit for bit, with
boundary tokens in the text). Prints each one's ratio to inference. CPU time (user + system
of this process) is steadier than wall-clock when other jobs share the machine.
"""
from __future__ import annotations

import argparse

import common
import jax
import jax.numpy as jnp
import numpy as np

from int_lm import backend
from int_lm import eggroll
from int_lm import intmath
from int_lm import model


def forward_layer_major(params, states, inputs, targets, boundary_token: int, factors=None, shift: int = 0):
    """``model.forward`` computed layer by layer: (ll (B, T), final states (L, B, D)), the same integers.

    Per layer, the time loop runs only what needs the state (``model.gru_update``: ``Uf`` and
    ``Uh`` with the gate); the embedding, layer norms, ``Wf`` / ``Wh``, the MLP, the head and the
    log-likelihood run once over all T x B rows (``jax.vmap`` over time of the model's own
    per-token functions, so every op is the model's). Integer sums do not depend on their
    order, so the result equals the token loop's exactly. Not used in training: on the CPU
    it measured slower (docs/performance.md, "Layer-major forward"); kept here to measure
    it again on other hardware (a GPU, where the token loop's many small kernels cost more).
    """
    over_time = jax.vmap
    n_layers = states.shape[0]
    params, factors = model.unstack_layers(params, n_layers), model.unstack_layers(factors, n_layers)
    get = (lambda name: factors.get(name)) if factors is not None else (lambda name: None)
    tokens = inputs.T                                     # (T, B)
    resets = (tokens == boundary_token)[:, :, None]
    x = backend.materialize(over_time(lambda t: model.embed(params["embed"], t, get("embed"), shift))(tokens))
    lp = params["layers"]
    layer_factors = factors.get("layers") if factors is not None else None
    finals = []
    for layer in range(n_layers):
        def fac(name, layer=layer):
            return model.layer_factor(layer_factors, name, layer)

        def mm(name, u, layer=layer):
            return over_time(lambda v: model.matmul(v, lp[name][layer], fac(name), shift))(u)

        def norm(name, u, layer=layer):
            return backend.materialize(over_time(lambda v: intmath.layer_norm(v, lp[name][layer]))(u))

        u = norm("ln1", x)
        xf, xh = mm("Wf", u), mm("Wh", u)

        def recur(s, step_in, layer=layer):
            xf_t, xh_t, reset = step_in
            s = jnp.where(reset, jnp.zeros_like(s), s)
            h = model.gru_update(xf_t, xh_t, s, lp, layer, backend.keep_int8_in_loop(layer_factors, reset), shift)
            return h, h

        final, h = jax.lax.scan(recur, states[layer], (xf, xh, resets))
        finals.append(final)
        x = backend.materialize(intmath.sat_add(x, h))
        x = backend.materialize(intmath.sat_add(x, mm("down", mm("up", norm("ln2", x)))))
    head = "head" if "head" in params else "embed"
    u = backend.materialize(over_time(lambda v: intmath.layer_norm(v, params["ln_out"]))(x))
    logits = over_time(lambda v: model.matmul(v, params[head], get(head), shift))(u)
    return intmath.log_likelihood(logits, targets.T).T, jnp.stack(finals)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--members", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    shape = model.ModelShape(256, args.width, args.layers)
    b, t = args.members, args.tokens
    spec = eggroll.EggrollSpec(shape, b, chunk_size=b)
    params = model.init_params(shape, 0)
    tokens = jnp.asarray(common.random_tokens(np.random.default_rng(0), 256, b, t + 1))
    tokens = tokens.at[:, (t + 1) // 3].set(shape.boundary_token)   # state resets inside the window
    states = jnp.asarray(np.random.default_rng(2).integers(-100, 101, (args.layers, b, args.width)), jnp.int8)
    noise = eggroll.make_noise(spec, 0, 0, jnp.arange(b // 2, dtype=jnp.int32))
    member_params, factors = eggroll.member_model_inputs(spec, params, noise)
    shift = spec.matrix_shift

    def token_loop(p, f, s, x):
        return model.forward(p, s, x[:, :-1], x[:, 1:], shape.boundary_token, f, shift)

    def layer_major(p, f, s, x):
        return forward_layer_major(p, s, x[:, :-1], x[:, 1:], shape.boundary_token, f, shift)

    def fwd(p, f, s, x):
        return token_loop(p, f, s, x)[0]

    def fwd_layer_major(p, f, s, x):
        return layer_major(p, f, s, x)[0]

    def head_only(p, f, s, x):   # s: trunk outputs after ln_out (T, B, D), shared by every head-only member
        def body(total, xs):
            u, y = xs
            logits = model.matmul(u, p["head"], f["head"], shift)
            return total + intmath.log_likelihood(logits, y), None
        return jax.lax.scan(body, jnp.zeros((b,), jnp.int32), (s, x[:, 1:].T))[0]

    trunk = jnp.asarray(np.random.default_rng(1).integers(-60, 61, (t, b, shape.width)), jnp.int8)
    cases = {   # name: (function, params, factors, states or shared trunk outputs)
        "inference": (fwd, params, None, states),
        "perturbed (all)": (fwd, member_params, factors, states),
        "vector params only": (fwd, member_params, None, states),
        "matrix factors only": (fwd, params, factors, states),
        "head only (shared trunk)": (head_only, params, factors, trunk),
        "layer-major inference": (fwd_layer_major, params, None, states),
        "layer-major perturbed": (fwd_layer_major, member_params, factors, states),
    }
    for p, f in ((params, None), (member_params, factors)):   # the same integers, or the timing means nothing
        for a, c in zip(jax.jit(token_loop)(p, f, states, tokens), jax.jit(layer_major)(p, f, states, tokens)):
            if not np.array_equal(np.asarray(a), np.asarray(c)):
                raise SystemExit("error: the layer-major forward differs from model.forward")
    print("layer-major forward: bit-identical to model.forward (log-likelihoods and final states, "
          "unperturbed and perturbed)")
    print(f"model {args.layers} x {args.width}, {b} members x {t} tokens, forward only")
    print(f"CPU: {backend.describe_cpu()}")
    out = {}
    for name, (fn, p, f, st) in cases.items():
        cpu, wall = common.best_cpu_and_wall(jax.jit(fn), p, f, st, tokens, repeats=args.repeats)
        out[name] = cpu
        print(f"  {name:26s} CPU {cpu:7.3f} s  wall {wall:7.3f} s  {b * t / wall:>10,.0f} tok/s  "
              f"inference / this = {out['inference'] / cpu:.3f}")
    return out


if __name__ == "__main__":
    main()
