#!/usr/bin/env python
"""EGGROLL step throughput with the population sharded over 1, 2, 4, ... devices.

    python benchmarks/devices.py                              # CPU: 1, 2, 4 virtual devices
    python benchmarks/devices.py --devices 1,2,4,8 --es.population 2048 --json
    python benchmarks/devices.py --config configs/tinyshakespeare.toml --devices 1,2
    python benchmarks/devices.py --devices 1 --platform gpu   # the real accelerators of this machine

Each device count runs in its own process (the CPU device count is fixed when
JAX starts: ``XLA_FLAGS=--xla_force_host_platform_device_count=K``) and times
the trainer's own step: ``distributed.Layout.votes_fn`` (population_votes
under shard_map, exact psum of the votes) plus the replicated update rule (``int_lm/optim``),
on random tokens. It also checks that the updated weights are bit-identical
across device counts (a sha256 of them is printed).

On a CPU the virtual devices share the same cores: this measures the overhead
of sharding (collectives, per-device dispatch, smaller GEMMs), not a speed-up.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time

import common

DEFAULTS = {"model": {"layers": 2, "width": 128}, "es": {"population": 512, "tokens_per_update": 64,
                                                         "chunk_size": 0}}


def worker(cfg, repeats: int) -> dict:
    import jax
    import numpy as np

    from int_lm import distributed
    from int_lm import model
    from int_lm import optim

    spec = common.make_spec(cfg)
    shape = spec.shape
    layout = distributed.Layout.create(spec)
    rows = spec.population // spec.group_size
    rng = np.random.default_rng(0)
    batches = [common.random_tokens(rng, shape.vocab_size, rows, cfg.es.tokens_per_update + 1, low=0,
                                    dtype=np.int32) for _ in range(repeats + 1)]
    params = layout.put_params(model.init_params(shape, 0))
    states = layout.put_states(model.init_state(shape, spec.population))
    votes_fn = layout.votes_fn()
    rule = optim.make(dataclasses.replace(cfg.es, alpha=0.5))
    update_fn = jax.jit(rule.update, donate_argnums=(0, 1))
    opt_state = rule.init(params)
    hyper = {k: np.int32(v) for k, v in rule.schedule(0)[0].items()}
    times = []
    for i, tokens in enumerate(batches):
        lo, hi = layout.row_range
        t0 = time.perf_counter()
        votes, scores, states = votes_fn(params, states, layout.put_tokens(tokens[lo:hi]), np.uint32(0),
                                         np.uint32(i))
        params, opt_state, stats = update_fn(opt_state, params, votes, hyper)
        jax.block_until_ready((params, states, scores))
        times.append(time.perf_counter() - t0)
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(params):
        digest.update(np.asarray(leaf).tobytes())
    step_s = float(np.median(times[1:])) if len(times) > 1 else times[0]
    return {
        "devices": jax.device_count(),
        "platform": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "members_per_device": spec.population // layout.devices,
        "first_step_s": times[0],
        "step_s": step_s,
        "population_tokens_per_s": spec.population * cfg.es.tokens_per_update / step_s,
        "weights_sha256": digest.hexdigest()[:16],
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="1,2,4", help="comma-separated device counts")
    parser.add_argument("--platform", default="cpu", help="cpu: virtual CPU devices; gpu/tpu: the real ones")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after the first (compile) step")
    parser.add_argument("--json", action="store_true", help="print one JSON list")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    cfg, args, values = common.parse_config(parser, argv, DEFAULTS)
    if args.worker:
        print(json.dumps(worker(cfg, args.repeats)))
        return []
    results = []
    for k in [int(x) for x in args.devices.split(",")]:
        env = {**os.environ, "JAX_PLATFORMS": args.platform}
        if args.platform == "cpu":
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={k}"
        elif args.platform == "gpu":
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(k)))
        overrides = [f"--{s}.{key}={v}" for s, kv in values.items() for key, v in kv.items()]
        if args.config:
            overrides = ["--config", args.config, *overrides]
        proc = subprocess.run([sys.executable, __file__, "--worker", "--repeats", str(args.repeats), *overrides],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{k} device(s) failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        m, es = cfg.model, cfg.es
        print(f"EGGROLL step, {m.layers} x {m.width}, N = {es.population}, T = {es.tokens_per_update}, "
              f"chunk {es.chunk_size or 'whole share'}; {args.platform}, {os.cpu_count()} host cores")
        print(f"{'devices':>8} {'members/dev':>12} {'first step s':>13} {'step s':>8} {'pop-tok/s':>11} "
              f"{'vs 1':>6}  weights")
        base = results[0]["population_tokens_per_s"]
        for r in results:
            print(f"{r['devices']:>8} {r['members_per_device']:>12} {r['first_step_s']:>13.2f} {r['step_s']:>8.3f} "
                  f"{r['population_tokens_per_s']:>11,.0f} {r['population_tokens_per_s'] / base:>6.2f}  "
                  f"{r['weights_sha256']}")
        same = len({r["weights_sha256"] for r in results}) == 1
        print("weights bit-identical across device counts" if same else "WEIGHTS DIFFER across device counts")
    return results


if __name__ == "__main__":
    main()
