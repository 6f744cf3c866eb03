#!/usr/bin/env python
"""XLA's CPU options for dots and fusion: what each does to the int8 GEMM rate, the model's
throughput, and the integer results.

    python benchmarks/xla_options.py                          # every variant below, 6 x 256, N = 1024, T = 100
    python benchmarks/xla_options.py --variants default,ynn_off --es.tokens_per_update 20
    python benchmarks/xla_options.py --flags "--xla_cpu_prefer_vector_width=512"   # one custom variant

Each variant runs in its own process with ``XLA_FLAGS`` set (it is read once, when JAX
starts): XLA's int8 x int8 -> int32 and float32 dot rates at the model's shapes (the
model mix of ``throughput.py --roofline``), the throughput harness (inference and
EGGROLL population-tokens/s, best of ``--repeats`` alternating rounds), and the
digests (a) and (b) of ``gpu_check.py`` compared with tests/golden/gpu_check.json
(bit-identical or not). Prints a Markdown table; ``--json`` prints the rows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import common

from int_lm import backend

VARIANTS = {  # name: XLA_FLAGS (flags found in jaxlib 0.10.2's libjax_common.so; see docs/performance.md)
    "default": "",
    "ynn_off": "--xla_cpu_experimental_ynn_fusion_type=",
    "ynn_plus_eltwise_reduce": "--xla_cpu_experimental_ynn_fusion_type=+eltwise,+reduce",
    "ynn_plus_dot": "--xla_cpu_experimental_ynn_fusion_type=+dot",
    "onednn_dot": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_onednn_fusion_type=dot",
    "xnn_graph_greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "vector_width_512": "--xla_cpu_prefer_vector_width=512",
    "max_isa_AVX2": "--xla_cpu_max_isa=AVX2",
}


def worker(harness_args: list[str]) -> dict:
    import gpu_check
    import throughput

    from int_lm import model
    harness = throughput.main(harness_args + ["--json"])
    shape = model.ModelShape(harness["model"]["vocab"], harness["model"]["width"], harness["model"]["layers"])
    rates = common.gemm_roofline(shape, harness["chunk_size"], repeats=20)
    golden = gpu_check.load_golden() or {}
    items = gpu_check.compare({"a_forward": gpu_check.digest_forward(), "b_step": gpu_check.digest_step()}, golden)
    return {"int8_gops": rates["mix_int8_gops"], "float32_gflops": rates["mix_float32_gflops"],
            "shapes": rates["shapes"], "infer_tokens_per_s": harness["infer_tokens_per_s"],
            "train_tokens_per_s": harness["train_tokens_per_s"], "train_over_infer": harness["train_over_infer"],
            "cpu_s": harness.get("cpu_s"), "train_over_infer_cpu": harness.get("train_over_infer_cpu"),
            "compile_s": harness["compile_s"],
            "bit_identical": all(i["status"] == "equal" for i in items.values()),
            "digests": {k: v["status"] for k, v in items.items()}}


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    parser.add_argument("--flags", default=None, help="one custom XLA_FLAGS variant instead")
    parser.add_argument("--repeats", type=int, default=3, help="the harness's timed rounds")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, harness_args = parser.parse_known_args(argv)
    harness_args = harness_args + ["--repeats", str(args.repeats)]
    if args.worker:
        print(json.dumps(worker(harness_args)))
        return []
    variants = {"custom": args.flags} if args.flags is not None else \
        {name: VARIANTS[name] for name in args.variants.split(",")}
    rows = []
    if not args.json:
        print(f"CPU: {backend.describe_cpu()}")
        print(f"harness: {' '.join(harness_args)} (throughput.py defaults otherwise)\n")
        print("| variant | XLA_FLAGS | int8 dot GOP/s (model mix) | float32 GFLOP/s | inference tok/s | "
              "EGGROLL tok/s | train/infer | CPU s: inference / step | train/infer by CPU | bit-identical |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    for name, flags in variants.items():
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()}
        proc = subprocess.run([sys.executable, __file__, "--worker", *harness_args], env=env, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            row = {"variant": name, "xla_flags": flags, "error": proc.stderr.strip().splitlines()[-1:]}
            if not args.json:
                print(f"| {name} | `{flags}` | failed: {row['error']} ||||||||", flush=True)
        else:
            row = {"variant": name, "xla_flags": flags, **json.loads(proc.stdout.strip().splitlines()[-1])}
            if not args.json:
                cpu = row["cpu_s"]
                print(f"| {name} | `{flags or '(none)'}` | {row['int8_gops']:,.0f} | {row['float32_gflops']:,.0f} | "
                      f"{row['infer_tokens_per_s']:,.0f} | {row['train_tokens_per_s']:,.0f} | "
                      f"{row['train_over_infer']:.3f} | {cpu['infer']:.2f} / {cpu['train_step']:.2f} | "
                      f"{row['train_over_infer_cpu']:.3f} | {'yes' if row['bit_identical'] else 'NO'} |", flush=True)
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
