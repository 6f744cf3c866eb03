#!/usr/bin/env python
"""How throughput and memory grow with population, width and layers: a Markdown table.

    python benchmarks/scaling.py                  # the grid below, T = 20 tokens per member
    python benchmarks/scaling.py --tokens 100

Each row runs benchmarks/throughput.py in a fresh process (so peak RSS is that
configuration's own) and prints one table row as it finishes.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import common  # noqa: F401 (puts this checkout's int_lm first on the path)

from int_lm import backend

HERE = Path(__file__).resolve().parent

GRID = [  # (layers, width, population)
    (2, 128, 256), (2, 128, 1024), (2, 128, 4096), (2, 128, 8192),
    (6, 256, 256), (6, 256, 1024), (6, 256, 4096),
    (2, 256, 1024), (2, 512, 1024), (4, 256, 1024),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=20, help="tokens per member per step")
    parser.add_argument("--chunk", type=int, default=256, help="es.chunk_size (0 = whole population)")
    args = parser.parse_args()
    print(f"CPU: {backend.describe_cpu()}\n")
    print("| layers x width | population | inference tok/s | EGGROLL tok/s | train/infer | step s "
          "| compile s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for layers, width, pop in GRID:
        chunk = min(args.chunk, pop) if args.chunk else 0
        cmd = [sys.executable, str(HERE / "throughput.py"), "--model.layers", str(layers), "--model.width",
               str(width), "--es.population", str(pop), "--es.tokens_per_update", str(args.tokens),
               "--es.chunk_size", str(chunk), "--repeats", "1", "--json"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"| {layers} x {width} | {pop} | failed: {out.stderr.strip().splitlines()[-1]} |||||")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {layers} x {width} | {pop} | {r['infer_tokens_per_s']:,.0f} | {r['train_tokens_per_s']:,.0f} "
              f"| {r['train_over_infer']:.2f} | {r['step_s']:.2f} | {r['compile_s']['train_step']:.1f} "
              f"| {r['peak_rss_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
