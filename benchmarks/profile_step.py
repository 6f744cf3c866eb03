#!/usr/bin/env python
"""Where a training step's time goes, by XLA operation, next to inference.

    python benchmarks/profile_step.py                         # 6 x 256, N = 1024, T = 20
    python benchmarks/profile_step.py --es.tokens_per_update 2 --top 30   # the per-step fixed costs
    python benchmarks/profile_step.py --config configs/default.toml      # the CPU default's step

Traces one call of pure inference and one call of the EGGROLL votes (noise,
perturbed forward, fitness, vote) with ``jax.profiler``, after compiling both,
and prints the busy time of each kind of XLA operation summed over the worker
threads (a kind is an HLO fusion name without its number: ``ynn_fusion`` are
the int8 GEMMs on CPU, ``wrapped_reduce-window`` the per-member row dots, and so
on), plus how much of training's busy time falls outside the time loop (noise,
member inputs, vote). Busy time is not wall time: with two cores about a third of
each is idle between operations. The trace is kept in ``--trace_dir`` for
TensorBoard's profile plugin or Perfetto.
"""
from __future__ import annotations

import argparse
import collections
import re
import tempfile
from pathlib import Path

import common
import jax
import numpy as np

from int_lm import backend
from int_lm import eggroll
from int_lm import model

DEFAULTS = {"model": {"layers": 6, "width": 256}, "es": {"population": 1024, "tokens_per_update": 20,
                                                          "chunk_size": 0}}


def busy_by_op(trace_dir: Path) -> collections.Counter:
    """{HLO operation name: busy ns summed over threads} from the newest trace under trace_dir."""
    path = max(trace_dir.glob("plugins/profile/*/*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    totals = collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(str(path)).planes:
        for line in plane.lines:
            for event in line.events:
                if not event.name.startswith(("ThunkExecutor", "end:", "ThreadpoolListener", "$")):
                    totals[event.name] += event.duration_ns
    return totals


def profile(fn, args, trace_dir: Path) -> collections.Counter:
    jax.block_until_ready(fn(*args))  # compile and warm up outside the trace
    jax.profiler.start_trace(str(trace_dir))
    jax.block_until_ready(fn(*args))
    jax.profiler.stop_trace()
    return busy_by_op(trace_dir)


def by_kind(ops: collections.Counter) -> collections.Counter:
    kinds = collections.Counter()
    for name, ns in ops.items():
        kinds[re.sub(r"\.\d+$", "", name)] += ns
    return kinds


def entry_ops(compiled_text: str) -> set[str]:
    """Names of the operations of the entry computation (outside any loop)."""
    entry = compiled_text[compiled_text.index("\nENTRY"):]
    entry = entry[:entry.index("\n}")]
    return {name for name in re.findall(r"%([\w.-]+) = ", entry) if not name.startswith("while")}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--top", type=int, default=15, help="operation kinds to list")
    parser.add_argument("--trace_dir", default=None, help="keep the traces here (default: a temporary folder)")
    cfg, args, _ = common.parse_config(parser, argv, DEFAULTS)
    spec = common.make_spec(cfg)
    shape, n, t = spec.shape, spec.population, cfg.es.tokens_per_update
    tokens = common.random_tokens(np.random.default_rng(0), shape.vocab_size, n // spec.group_size, t + 1)
    member_tokens = np.repeat(tokens, spec.group_size, axis=0)
    params, states = model.init_params(shape, 0), model.init_state(shape, n)
    infer = jax.jit(lambda p, s, x: model.forward(p, s, x[:, :-1], x[:, 1:], shape.boundary_token)[0])
    votes = jax.jit(lambda p, s, x, seed, epoch: eggroll.population_votes(spec, p, s, x, seed, epoch)[0])
    votes_args = (params, states, tokens, np.uint32(0), np.uint32(0))  # seed, epoch: runtime values

    root = Path(args.trace_dir or tempfile.mkdtemp(prefix="int_lm_profile_"))
    infer_ops = profile(infer, (params, states, member_tokens), root / "inference")
    train_ops = profile(votes, votes_args, root / "training")
    outside = entry_ops(votes.lower(*votes_args).compile().as_text())
    infer_kinds, train_kinds = by_kind(infer_ops), by_kind(train_ops)
    total_i, total_t = sum(infer_kinds.values()) / 1e6, sum(train_kinds.values()) / 1e6
    fixed = sum(ns for name, ns in train_ops.items() if name in outside) / 1e6

    print(f"model {shape.layers} x {shape.width}, population {n}, T={t}, chunk {spec.chunk}; "
          f"busy ms summed over threads (traces in {root})")
    print(f"CPU: {backend.describe_cpu()}")
    print(f"{'operation kind':32s} {'inference':>10s} {'training':>10s}")
    for kind, _ in (infer_kinds + train_kinds).most_common(args.top):
        print(f"{kind:32s} {infer_kinds[kind] / 1e6:10.1f} {train_kinds[kind] / 1e6:10.1f}")
    print(f"{'total':32s} {total_i:10.1f} {total_t:10.1f}")
    print(f"training outside the time loop (noise, member inputs, vote): {fixed:.1f} ms")
    return {"inference_ms": total_i, "training_ms": total_t, "outside_loop_ms": fixed,
            "inference": dict(infer_kinds), "training": dict(train_kinds)}


if __name__ == "__main__":
    main()
