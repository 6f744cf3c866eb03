#!/usr/bin/env python
"""Where the perturbed forward's extra time goes, by CPU time in one process.

    python benchmarks/forward_overhead.py                  # 6 x 256, 128 members, 50 tokens
    python benchmarks/forward_overhead.py --members 256 --tokens 20 --layers 2 --width 128

Times the forward pass alone (no noise making, fitness or vote) five ways: the
unperturbed model (inference); the full EGGROLL perturbation; per-member vector
parameters only; low-rank matrix factors only; and members that perturb only the head,
reading trunk outputs they share (the head matmul with its rank-1 term and the integer
log-likelihood per token: what a head-only member would cost, docs/training.md). Prints
each one's ratio to inference. CPU time (user + system of this process) is steadier than wall-clock
when other jobs share the machine.
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
    states = model.init_state(shape, b)
    noise = eggroll.make_noise(spec, 0, 0, jnp.arange(b // 2, dtype=jnp.int32))
    member_params, factors = eggroll.member_model_inputs(spec, params, noise)
    shift = spec.matrix_shift

    def fwd(p, f, s, x):
        return model.forward(p, s, x[:, :-1], x[:, 1:], shape.boundary_token, f, shift)[0]

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
    }
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
