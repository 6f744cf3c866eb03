#!/usr/bin/env python
"""EGGROLL training vs pure inference, measured in one process and one run.

    python benchmarks/throughput.py                           # 6 x 256, N = 1024, T = 100
    python benchmarks/throughput.py --es.population 4096 --model.width 128 --json
    python benchmarks/throughput.py --naive --model.width 64 --es.population 64

(a) inference: the unperturbed model on N sequences of T tokens (the work of a
population step without noise, fitness or update); (b) full EGGROLL steps
(noise, perturbed forward, fitness, vote, update). Reports population-tokens
per second for each and their ratio, the split of a step, compile times and
peak memory. ``--naive`` adds naive ES at the same size: full-rank int8 noise
per member and explicitly perturbed weights (what EGGROLL avoids).
Random tokens: throughput does not depend on the text.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from int_lm import config as C  # noqa: E402
from int_lm import eggroll as E  # noqa: E402
from int_lm import intmath as im  # noqa: E402
from int_lm import model as M  # noqa: E402
from int_lm import optim  # noqa: E402

DEFAULTS = {"model": {"layers": 6, "width": 256}, "es": {"population": 1024, "tokens_per_update": 100,
                                                          "chunk_size": 0}}


def timed(fn, *args, repeats: int):
    """(first-call seconds incl. compile, best steady-state seconds (the first call's
    when repeats is 0), last result)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    best = first if repeats == 0 else float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return first, best, out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def device_peak_mb():
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def naive_es_step(spec: E.EggrollSpec, shift: int):
    """Naive ES: each member's weights formed explicitly from full-rank int8 noise."""
    from int_lm import noise as nz

    def step(params, states, tokens, seed, epoch, thr):
        pairs = jnp.arange(spec.population // 2, dtype=jnp.int32)
        leaves = M.param_leaves(spec.shape)
        dense = {}
        for pid, (path, shape, matrix) in enumerate(leaves):
            if matrix:
                dense[path] = nz.pair_noise(seed, epoch, pairs, pid, shape)  # (P, [L,] out, n)
        members = spec.population

        def member_forward(m, noise_m):
            sign = 1 - 2 * (m % 2)
            p = {"layers": dict(params["layers"]), "embed": params["embed"], "head": params["head"],
                 "ln_out": params["ln_out"]}
            for path, e in noise_m.items():
                w = M.get_leaf(params, path)
                pert = im.sat8(w.astype(jnp.int32) + ((sign * e.astype(jnp.int32)) >> shift))
                M.set_leaf(p, path, pert)
            st = jax.lax.dynamic_slice_in_dim(states, m, 1, axis=1)
            toks = tokens[m // spec.group_size][None]
            ll, st = M.forward(p, st, toks[:, :-1], toks[:, 1:], spec.shape.boundary_token)
            return jnp.sum(ll), st[:, 0]

        noise_members = jax.tree_util.tree_map(lambda x: jnp.repeat(x, 2, axis=0), dense)
        scores, new_states = jax.lax.map(lambda a: member_forward(a[0], a[1]),
                                         (jnp.arange(members), noise_members))
        fitness = E.shape_fitness(scores)
        new = {"layers": dict(params["layers"]), "embed": params["embed"], "head": params["head"],
               "ln_out": params["ln_out"]}
        for path, e in dense.items():
            z = jnp.einsum("p,p...->...", fitness, e.astype(jnp.int32))
            w = M.get_leaf(params, path)
            M.set_leaf(new, path, im.sat8(w.astype(jnp.int32) + jnp.where(jnp.abs(z) >= thr, jnp.sign(z), 0)))
        return new, jnp.moveaxis(new_states, 0, 1), scores

    return jax.jit(step)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds after the compiling call (inference and training alternate)")
    parser.add_argument("--naive", action="store_true", help="also time naive ES (small sizes only)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    values, rest = C.parse_overrides(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(rest)
    cfg = C.apply_values(C.apply_values(C.Config(), DEFAULTS, "benchmark defaults"), values, "the command line")
    cfg = C.validate(cfg)
    spec = E.EggrollSpec.from_config(cfg)
    E.check_limits(spec)
    shape, n, t = spec.shape, spec.population, cfg.es.tokens_per_update
    rows = n // spec.group_size
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, shape.vocab_size, (rows, t + 1)).astype(np.int32))
    member_tokens = jnp.repeat(tokens, spec.group_size, axis=0)
    params = M.init_params(shape, 0)
    pop_tokens = n * t

    # (a) pure batched inference, in the same member chunks as training (the same work
    # without noise, fitness or update), and as one batch of all N sequences.
    chunk = spec.chunk

    def infer_chunked(p, s, x):
        if chunk == n:  # one batch, exactly as training runs a single chunk (no loop)
            return M.forward(p, s, x[:, :-1], x[:, 1:], shape.boundary_token)[0]

        def one(c):
            st = jax.lax.dynamic_slice_in_dim(s, c * chunk, chunk, axis=1)
            xc = jax.lax.dynamic_slice_in_dim(x, c * chunk, chunk, axis=0)
            return M.forward(p, st, xc[:, :-1], xc[:, 1:], shape.boundary_token)[0]
        return jax.lax.map(one, jnp.arange(n // chunk))

    infer = jax.jit(infer_chunked)
    whole = jax.jit(lambda p, s, x: M.forward(p, s, x[:, :-1], x[:, 1:], shape.boundary_token))

    # (b) EGGROLL: votes (noise + perturbed forward + fitness + vote) then the update
    votes_fn = jax.jit(lambda p, s, x, seed, epoch: E.population_votes(spec, p, s, x, seed, epoch))
    rule = optim.make(dataclasses.replace(cfg.es, alpha=0.1))
    update_fn = jax.jit(rule.update)
    hyper = {k: np.int32(v) for k, v in rule.schedule(0)[0].items()}
    thr_m = hyper["threshold_matrix"]
    states = M.init_state(shape, n)
    # Inference and training alternate, round by round, so that a slow spell of the
    # machine hits both; each reports its best round.
    calls = {
        "infer": (infer, (params, M.init_state(shape, n), member_tokens)),
        "votes": (votes_fn, (params, states, tokens, np.uint32(0), np.uint32(0))),
    }
    if chunk < n:  # otherwise "infer" is this very batch already
        calls["whole"] = (whole, (params, M.init_state(shape, n), member_tokens))
    first, best, out = {}, {}, {}
    for name, (fn, fn_args) in calls.items():
        first[name], best[name], out[name] = timed(fn, *fn_args, repeats=0)
    acc = out["votes"][0]
    calls["update"] = (update_fn, (rule.init(params), params, acc, hyper))
    first["update"], best["update"], _ = timed(update_fn, *calls["update"][1], repeats=0)
    for _ in range(args.repeats):
        for name, (fn, fn_args) in calls.items():
            best[name] = min(best[name], timed(fn, *fn_args, repeats=0)[0])
    infer_first, infer_s, whole_s = first["infer"], best["infer"], best.get("whole", best["infer"])
    votes_first, votes_s = first["votes"], best["votes"]
    update_first, update_s = first["update"], best["update"]
    # The parts of a step, each jitted alone: noise for the whole population and the vote GEMMs.
    pairs = jnp.arange(n // 2, dtype=jnp.int32)
    noise_fn = jax.jit(lambda p: E.make_noise(spec, 0, 0, p))
    _, noise_s, noise = timed(noise_fn, pairs, repeats=args.repeats)
    vote_fn = jax.jit(E.vote)
    _, vote_s, _ = timed(vote_fn, noise, jnp.ones((n // 2,), jnp.int32), repeats=args.repeats)
    del noise
    train_s = votes_s + update_s
    result = {
        "model": {"layers": shape.layers, "width": shape.width, "vocab": shape.vocab_size,
                  "params": M.param_count(shape)},
        "population": n, "tokens_per_update": t, "rank": spec.rank, "chunk_size": spec.chunk,
        "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
        "infer_tokens_per_s": pop_tokens / infer_s,
        "infer_one_batch_tokens_per_s": pop_tokens / whole_s,
        "train_tokens_per_s": pop_tokens / train_s,
        "train_over_infer": infer_s / train_s,
        "step_s": train_s,
        "split_s": {"noise": noise_s, "forward": max(votes_s - noise_s - vote_s, 0.0), "vote": vote_s,
                    "update": update_s},
        "compile_s": {"infer": max(infer_first - infer_s, 0.0),
                      "train_step": max((votes_first - votes_s) + (update_first - update_s), 0.0)},
        "peak_rss_mb": peak_rss_mb(),
        "device_peak_mb": device_peak_mb(),
    }
    if args.naive:
        naive = naive_es_step(spec, spec.matrix_shift)
        naive_first, naive_s, _ = timed(naive, params, M.init_state(shape, n), tokens, np.uint32(0),
                                        np.uint32(0), thr_m, repeats=args.repeats)
        result["naive_tokens_per_s"] = pop_tokens / naive_s
        result["eggroll_over_naive"] = naive_s / train_s
    if args.json:
        print(json.dumps(result))
    else:
        print(f"model {shape.layers} x {shape.width}, V={shape.vocab_size}, population {n}, T={t}, "
              f"rank {spec.rank}, chunk {spec.chunk} on {result['backend']} ({result['device']})")
        print(f"  inference    {result['infer_tokens_per_s']:>12,.0f} population-tokens/s "
              f"(chunks of {chunk}; all {n} in one batch: {result['infer_one_batch_tokens_per_s']:,.0f})")
        print(f"  EGGROLL      {result['train_tokens_per_s']:>12,.0f} population-tokens/s   "
              f"train/infer = {result['train_over_infer']:.3f}")
        sp = result["split_s"]
        print(f"  step {train_s:.3f} s: noise {sp['noise']:.3f}, forward {sp['forward']:.3f}, "
              f"vote {sp['vote']:.3f}, update {sp['update']:.3f}")
        print(f"  compile: inference {result['compile_s']['infer']:.1f} s, "
              f"train step {result['compile_s']['train_step']:.1f} s; peak RSS {result['peak_rss_mb']:.0f} MB"
              + (f", device peak {result['device_peak_mb']:.0f} MB" if result["device_peak_mb"] else ""))
        if args.naive:
            print(f"  naive ES     {result['naive_tokens_per_s']:>12,.0f} population-tokens/s   "
                  f"EGGROLL speed-up = {result['eggroll_over_naive']:.1f}x")
    return result


if __name__ == "__main__":
    main()
