#!/usr/bin/env python
"""EGGROLL training vs pure inference, measured in one process and one run.

    python benchmarks/throughput.py                           # 6 x 256, N = 1024, T = 100
    python benchmarks/throughput.py --es.population 4096 --model.width 128 --json
    python benchmarks/throughput.py --config configs/tinyshakespeare.toml   # a run's own settings
    python benchmarks/throughput.py --naive --model.width 64 --es.population 64
    python benchmarks/throughput.py --roofline --repeats 3   # + GEMM rates, fractions, per-part breakdown

(a) inference: the unperturbed model on N sequences of T tokens (the work of a
population step without noise, fitness or update); (b) full EGGROLL steps
(noise, perturbed forward, fitness, vote, update). Reports population-tokens
per second for each and their ratio (also by CPU time of this process, steadier
on a shared machine), the split of a step, compile times, peak memory and the CPU
it ran on (model name and int8-relevant flags, ``int_lm.backend.cpu_flags``).
``--naive`` adds naive ES at the same size: full-rank int8 noise per member and
explicitly perturbed weights (what EGGROLL avoids). ``--breakdown`` times each
part of a step alone next to the inference forward (noise draw, member inputs, the
forward with vector perturbations only, with low-rank factors only, with both,
fitness + vote, update). ``--roofline`` adds the breakdown and XLA's int8 x int8 ->
int32 and float32 dot rates at the model's shapes (chunk rows x D x D, x 4D, ...),
and prints inference and training as fractions of them, counting 2 operations per
multiply-add of the weight matmuls (12 L D^2 + V D per member-token; the low-rank
and element work is not counted). Random tokens: throughput does not depend on the text.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import common
import jax
import jax.numpy as jnp
import numpy as np

from int_lm import backend
from int_lm import eggroll
from int_lm import intmath
from int_lm import model
from int_lm import optim

DEFAULTS = {"model": {"layers": 6, "width": 256}, "es": {"population": 1024, "tokens_per_update": 100,
                                                          "chunk_size": 0}}


def naive_es_step(spec: eggroll.EggrollSpec, shift: int):
    """Naive ES: each member's weights formed explicitly from full-rank int8 noise."""
    from int_lm.noise import pair_noise

    def step(params, states, tokens, seed, epoch, thr):
        pairs = jnp.arange(spec.population // 2, dtype=jnp.int32)
        leaves = model.param_leaves(spec.shape)
        dense = {}
        for pid, (path, shape, matrix) in enumerate(leaves):
            if matrix:
                dense[path] = pair_noise(seed, epoch, pairs, pid, shape)  # (P, [L,] out, n)
        members = spec.population

        def member_forward(m, noise_m):
            sign = 1 - 2 * (m % 2)
            p = {**params, "layers": dict(params["layers"])}
            for path, e in noise_m.items():
                w = model.get_leaf(params, path)
                pert = intmath.sat8(w.astype(jnp.int32) + ((sign * e.astype(jnp.int32)) >> shift))
                model.set_leaf(p, path, pert)
            st = jax.lax.dynamic_slice_in_dim(states, m, 1, axis=1)
            toks = tokens[m // spec.group_size][None]
            ll, st = model.forward(p, st, toks[:, :-1], toks[:, 1:], spec.shape.boundary_token)
            return jnp.sum(ll), st[:, 0]

        noise_members = jax.tree_util.tree_map(lambda x: jnp.repeat(x, 2, axis=0), dense)
        scores, new_states = jax.lax.map(lambda a: member_forward(a[0], a[1]),
                                         (jnp.arange(members), noise_members))
        fitness = eggroll.shape_fitness(scores)
        new = {**params, "layers": dict(params["layers"])}
        for path, e in dense.items():
            z = jnp.einsum("p,p...->...", fitness, e.astype(jnp.int32))
            w = model.get_leaf(params, path)
            model.set_leaf(new, path, intmath.sat8(w.astype(jnp.int32) + jnp.where(jnp.abs(z) >= thr, jnp.sign(z), 0)))
        return new, jnp.moveaxis(new_states, 0, 1), scores

    return jax.jit(step)


def breakdown(spec: eggroll.EggrollSpec, params, member_tokens, update_call: tuple, repeats: int) -> dict:
    """Seconds per step of each part of a training step, each jitted alone, next to inference:
    {part: (best wall s, best CPU s of this process)}.

    The forward variants run on one chunk of members (the step runs N / chunk of them;
    times are scaled by that): unperturbed (inference), per-member vector parameters
    only, low-rank matrix factors only, and both (the perturbed forward). Noise, member
    inputs and the vote are timed for one chunk too; the update once per step. CPU time
    is steadier than wall time when other jobs share the cores.
    """
    shape, n, chunk = spec.shape, spec.population, spec.chunk
    scale = n // chunk
    pairs = jnp.arange(chunk // 2, dtype=jnp.int32)
    states = model.init_state(shape, chunk)
    toks = member_tokens[:chunk]
    noise_fn = jax.jit(lambda p: eggroll.make_noise(spec, 0, 0, p))
    noise = noise_fn(pairs)
    inputs_fn = jax.jit(lambda p, z: eggroll.member_model_inputs(spec, p, z))
    member_params, factors = inputs_fn(params, noise)

    def fwd(p, f, s, x):
        return model.forward(p, s, x[:, :-1], x[:, 1:], shape.boundary_token, f, spec.matrix_shift)[0]

    scores = jnp.asarray(np.random.default_rng(1).integers(-2**20, 2**20, chunk).astype(np.int32))
    calls = {
        "inference forward": (jax.jit(lambda p, s, x: fwd(p, None, s, x)), (params, states, toks)),
        "noise draw": (noise_fn, (pairs,)),
        "member inputs (per-member vectors)": (inputs_fn, (params, noise)),
        "forward, vector perturbations only": (jax.jit(lambda p, s, x: fwd(p, None, s, x)),
                                               (member_params, states, toks)),
        "forward, low-rank factors only": (jax.jit(fwd), (params, factors, states, toks)),
        "perturbed forward (both)": (jax.jit(fwd), (member_params, factors, states, toks)),
        "fitness + vote": (jax.jit(lambda sc, z: eggroll.vote(z, eggroll.shape_fitness(sc))), (scores, noise)),
        "update": update_call,
    }
    for fn, fn_args in calls.values():  # compile outside the timed rounds
        jax.block_until_ready(fn(*fn_args))
    best, cpu = {}, {}
    common.alternate(calls, max(repeats, 1), best, cpu)
    return {name: [best[name] * (1 if name == "update" else scale), cpu[name] * (1 if name == "update" else scale)]
            for name in calls}


def roofline(spec: eggroll.EggrollSpec, infer_tps: float, train_tps: float, repeats: int) -> dict:
    """XLA's int8 and float32 GEMM rates at the model's shapes (chunk rows) and the model's
    inference and training rates as fractions of them (dense weight-matmul ops, 2 per multiply-add)."""
    ops = common.ops_per_token(spec.shape, spec.rank)
    rates = common.gemm_roofline(spec.shape, spec.chunk, repeats=max(20, repeats))
    infer_gops, train_gops = infer_tps * ops["dense"] / 1e9, train_tps * ops["dense"] / 1e9
    return {
        "ops_per_token": ops, **rates,
        "infer_gops": infer_gops, "train_gops": train_gops,
        "infer_of_int8": infer_gops / rates["mix_int8_gops"], "train_of_int8": train_gops / rates["mix_int8_gops"],
        "infer_of_float32": infer_gops / rates["mix_float32_gflops"],
        "train_of_float32": train_gops / rates["mix_float32_gflops"],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds after the compiling call (inference and training alternate)")
    parser.add_argument("--naive", action="store_true", help="also time naive ES (small sizes only)")
    parser.add_argument("--roofline", action="store_true",
                        help="also measure XLA's int8 and float32 GEMM rates at the model's shapes, the model's "
                             "fractions of them, and the per-part breakdown of a step")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time each part of a step alone (noise, member inputs, forward variants, vote, "
                             "update) next to inference")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    cfg, args, _ = common.parse_config(parser, argv, DEFAULTS)
    spec = common.make_spec(cfg)
    shape, n, t = spec.shape, spec.population, cfg.es.tokens_per_update
    rows = n // spec.group_size
    tokens = jnp.asarray(common.random_tokens(np.random.default_rng(0), shape.vocab_size, rows, t + 1))
    member_tokens = jnp.repeat(tokens, spec.group_size, axis=0)
    params = model.init_params(shape, 0)
    pop_tokens = n * t

    # (a) pure batched inference, in the same member chunks as training (the same work
    # without noise, fitness or update), and as one batch of all N sequences.
    chunk = spec.chunk

    def infer_chunked(p, s, x):
        if chunk == n:  # one batch, exactly as training runs a single chunk (no loop)
            return model.forward(p, s, x[:, :-1], x[:, 1:], shape.boundary_token)[0]

        def one(c):
            st = jax.lax.dynamic_slice_in_dim(s, c * chunk, chunk, axis=1)
            xc = jax.lax.dynamic_slice_in_dim(x, c * chunk, chunk, axis=0)
            return model.forward(p, st, xc[:, :-1], xc[:, 1:], shape.boundary_token)[0]
        return jax.lax.map(one, jnp.arange(n // chunk))

    infer = jax.jit(infer_chunked)
    whole = jax.jit(lambda p, s, x: model.forward(p, s, x[:, :-1], x[:, 1:], shape.boundary_token))

    # (b) EGGROLL: votes (noise + perturbed forward + fitness + vote) then the update
    votes_fn = jax.jit(lambda p, s, x, seed, epoch: eggroll.population_votes(spec, p, s, x, seed, epoch))
    rule = optim.make(dataclasses.replace(cfg.es, alpha=0.1))
    update_fn = jax.jit(rule.update)
    hyper = {k: np.int32(v) for k, v in rule.schedule(0)[0].items()}
    thr_m = optim.thresholds(0.1, n, spec.rank)[0]   # the naive-ES comparison uses the sign rule
    states = model.init_state(shape, n)
    # Inference and training alternate, round by round, so that a slow spell of the
    # machine hits both; each reports its best round.
    calls = {
        "infer": (infer, (params, model.init_state(shape, n), member_tokens)),
        "votes": (votes_fn, (params, states, tokens, np.uint32(0), np.uint32(0))),
    }
    if chunk < n:  # otherwise "infer" is this very batch already
        calls["whole"] = (whole, (params, model.init_state(shape, n), member_tokens))
    first, best, out, best_cpu = {}, {}, {}, {}
    for name, (fn, fn_args) in calls.items():
        first[name], best[name], out[name] = common.timed(fn, *fn_args, repeats=0)
    acc = out["votes"][0]
    calls["update"] = (update_fn, (rule.init(params), params, acc, hyper))
    first["update"], best["update"], _ = common.timed(update_fn, *calls["update"][1], repeats=0)
    common.alternate(calls, args.repeats, best, best_cpu)
    infer_first, infer_s, whole_s = first["infer"], best["infer"], best.get("whole", best["infer"])
    votes_first, votes_s = first["votes"], best["votes"]
    update_first, update_s = first["update"], best["update"]
    # The parts of a step, each jitted alone: noise for the whole population and the vote GEMMs.
    pairs = jnp.arange(n // 2, dtype=jnp.int32)
    noise_fn = jax.jit(lambda p: eggroll.make_noise(spec, 0, 0, p))
    _, noise_s, noise = common.timed(noise_fn, pairs, repeats=args.repeats)
    vote_fn = jax.jit(lambda z, f: eggroll.vote(z, f, spec.fitness_levels))
    _, vote_s, _ = common.timed(vote_fn, noise, jnp.ones((n // 2,), jnp.int32), repeats=args.repeats)
    del noise
    train_s = votes_s + update_s
    result = {
        "model": {"layers": shape.layers, "width": shape.width, "vocab": shape.vocab_size,
                  "params": model.param_count(shape)},
        "population": n, "tokens_per_update": t, "rank": spec.rank, "chunk_size": spec.chunk,
        "optimizer": cfg.es.optimizer, "fitness_levels": cfg.es.fitness_levels,
        "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
        "cpu": backend.cpu_flags(),
        "infer_tokens_per_s": pop_tokens / infer_s,
        "infer_one_batch_tokens_per_s": pop_tokens / whole_s,
        "train_tokens_per_s": pop_tokens / train_s,
        "train_over_infer": infer_s / train_s,
        "step_s": train_s,
        "split_s": {"noise": noise_s, "forward": max(votes_s - noise_s - vote_s, 0.0), "vote": vote_s,
                    "update": update_s},
        "compile_s": {"infer": max(infer_first - infer_s, 0.0),
                      "train_step": max((votes_first - votes_s) + (update_first - update_s), 0.0)},
    }
    if args.repeats > 0:  # best CPU seconds of this process per call: steadier when other jobs share the cores
        cpu_train = best_cpu["votes"] + best_cpu["update"]
        result["cpu_s"] = {"infer": best_cpu["infer"], "train_step": cpu_train}
        result["train_over_infer_cpu"] = best_cpu["infer"] / cpu_train if cpu_train > 0 else None
    if args.breakdown or args.roofline:
        parts = breakdown(spec, params, member_tokens, calls["update"], args.repeats)
        result["breakdown_s"] = {  # part: [best wall s, best CPU s]
            "step (votes + update, as trained)": [train_s, best_cpu.get("votes", 0.0) + best_cpu.get("update", 0.0)],
            "inference (as measured above)": [infer_s, best_cpu.get("infer", 0.0)], **parts}
    if args.roofline:
        result["roofline"] = roofline(spec, result["infer_tokens_per_s"], result["train_tokens_per_s"],
                                      args.repeats)
    if args.naive:
        naive = naive_es_step(spec, spec.matrix_shift)
        naive_first, naive_s, _ = common.timed(naive, params, model.init_state(shape, n), tokens, np.uint32(0),
                                               np.uint32(0), thr_m, repeats=args.repeats)
        result["naive_tokens_per_s"] = pop_tokens / naive_s
        result["eggroll_over_naive"] = naive_s / train_s
    result["peak_rss_mb"] = common.peak_rss_mb()
    result["device_peak_mb"] = common.device_peak_mb()
    if args.json:
        print(json.dumps(result))
    else:
        print_text(result, spec, n, t, args)
    return result


def print_text(result: dict, spec: eggroll.EggrollSpec, n: int, t: int, args) -> None:
    shape, chunk, train_s = spec.shape, spec.chunk, result["step_s"]
    print(f"model {shape.layers} x {shape.width}, V={shape.vocab_size}, population {n}, T={t}, "
          f"rank {spec.rank}, chunk {spec.chunk}, {result['optimizer']} rule ({result['fitness_levels']} fitness "
          f"levels) on {result['backend']} ({result['device']})")
    print(f"  CPU: {backend.describe_cpu(result['cpu'])}")
    print(f"  inference    {result['infer_tokens_per_s']:>12,.0f} population-tokens/s "
          f"(chunks of {chunk}; all {n} in one batch: {result['infer_one_batch_tokens_per_s']:,.0f})")
    print(f"  EGGROLL      {result['train_tokens_per_s']:>12,.0f} population-tokens/s   "
          f"train/infer = {result['train_over_infer']:.3f}"
          + (f" (by CPU time: {result['train_over_infer_cpu']:.3f})" if result.get("train_over_infer_cpu") else ""))
    sp = result["split_s"]
    print(f"  step {train_s:.3f} s: noise {sp['noise']:.3f}, forward {sp['forward']:.3f}, "
          f"vote {sp['vote']:.3f}, update {sp['update']:.3f}")
    print(f"  compile: inference {result['compile_s']['infer']:.1f} s, "
          f"train step {result['compile_s']['train_step']:.1f} s; peak RSS {result['peak_rss_mb']:.0f} MB"
          + (f", device peak {result['device_peak_mb']:.0f} MB" if result["device_peak_mb"] else ""))
    if args.naive:
        print(f"  naive ES     {result['naive_tokens_per_s']:>12,.0f} population-tokens/s   "
              f"EGGROLL speed-up = {result['eggroll_over_naive']:.1f}x")
    if "breakdown_s" in result:
        parts = result["breakdown_s"]
        inf_w, inf_c = parts["inference forward"]
        scale = f"; one chunk of {chunk} timed, x {n // chunk}" if chunk < n else ""
        print(f"  per-part breakdown per step (each part jitted alone{scale}): best wall s and best CPU s, "
              f"and each over the inference forward's")
        for name, (wall, cpu) in parts.items():
            print(f"    {name:38s} wall {wall:7.3f} s {wall / inf_w:6.3f}x   CPU {cpu:7.3f} s {cpu / inf_c:6.3f}x")
        extra = {k: [parts[k][0] - inf_w, parts[k][1] - inf_c] for k in
                 ("perturbed forward (both)", "forward, vector perturbations only", "forward, low-rank factors only")}
        print("    perturbed forward over inference, wall / CPU s: {:+.3f} / {:+.3f} (vectors alone {:+.3f} / {:+.3f}, "
              "low-rank factors alone {:+.3f} / {:+.3f})".format(*extra["perturbed forward (both)"],
                                                                  *extra["forward, vector perturbations only"],
                                                                  *extra["forward, low-rank factors only"]))
    if "roofline" in result:
        r = result["roofline"]
        ops = r["ops_per_token"]
        print(f"  roofline: XLA dot rates at {chunk} rows (GOP/s; best of >= 20 single jitted calls):")
        for name, sh in r["shapes"].items():
            print(f"    {name:22s} x{sh['count']:<3d} ({chunk} x {sh['n']} . {sh['n']} x {sh['out']}): "
                  f"int8->int32 {sh['int8_gops']:8.0f}   float32 {sh['float32_gflops']:8.0f}")
        print(f"    model mix: int8 {r['mix_int8_gops']:.0f} GOP/s, float32 {r['mix_float32_gflops']:.0f} GFLOP/s; "
              f"{ops['dense'] / 1e6:.2f} MOP/token dense (+{ops['lowrank'] / 1e3:.0f} kOP low-rank, not counted)")
        print(f"    inference {r['infer_gops']:.0f} GOP/s = {r['infer_of_int8']:.3f} of int8, "
              f"{r['infer_of_float32']:.3f} of float32;  training {r['train_gops']:.0f} GOP/s = "
              f"{r['train_of_int8']:.3f} of int8, {r['train_of_float32']:.3f} of float32")


if __name__ == "__main__":
    main()
