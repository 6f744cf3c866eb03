"""Tokenisation throughput (MB/s) for bytes and BPE, and a corpus report with baselines.

    python benchmarks/data_throughput.py                       # stdlib corpus, bytes + cl100k_base K=4096
    python benchmarks/data_throughput.py --source ../shared/corpora/tinyshakespeare.txt \
        --split_mode contiguous --val_fraction 0.05 --test_fraction 0.05
    python benchmarks/data_throughput.py --json                # one JSON object

Throughput is measured on the corpus's own documents, read into memory first:
``encode`` one document at a time (one thread) and ``encode_batch`` (tiktoken's
threads; same as the cache builder). The report tokenises the corpus into the cache
(once) and prints tokens, bytes and the unigram/bigram/compressor bits per byte for
each tokenizer.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from int_lm.config import DataConfig  # noqa: E402
from int_lm.data import baselines, load_corpus, make_tokenizer  # noqa: E402
from int_lm.data import sources  # noqa: E402


def corpus_texts(cfg: DataConfig, limit_bytes: int) -> list[str]:
    if cfg.source == "stdlib":
        src = sources.stdlib_source(cfg.max_docs, sources.Path(os.path.expanduser(cfg.cache_dir or "~/.cache/int_lm")))
    else:
        src = sources.local_source(cfg.source, cfg, sources.Path(os.path.expanduser(cfg.cache_dir or "~/.cache/int_lm")))
    out, got = [], 0
    for gen in src.groups.values():
        for _, text in gen():
            out.append(text)
            got += len(text.encode())
            if got >= limit_bytes:
                return out
    return out


def throughput(tok, texts: list[str], repeats: int = 2) -> dict[str, float]:
    nbytes = sum(len(t.encode()) for t in texts)
    best_one = best_batch = float("inf")
    ntok = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        ntok = sum(len(tok.encode(t)) for t in texts)
        best_one = min(best_one, time.perf_counter() - t0)
        t0 = time.perf_counter()
        tok.encode_batch(texts)
        best_batch = min(best_batch, time.perf_counter() - t0)
    return {"MB": round(nbytes / 1e6, 3), "tokens": ntok, "bytes_per_token": round(nbytes / ntok, 3),
            "MB_per_s_one_thread": round(nbytes / 1e6 / best_one, 2),
            "MB_per_s_batch": round(nbytes / 1e6 / best_batch, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default="stdlib")
    ap.add_argument("--bpe", default="cl100k_base", help="tiktoken encoding for the BPE measurement")
    ap.add_argument("--K", type=int, default=4096, help="BPE ranks kept (V = K + 1)")
    ap.add_argument("--split_mode", default="auto")
    ap.add_argument("--val_fraction", type=float, default=0.05)
    ap.add_argument("--test_fraction", type=float, default=0.05)
    ap.add_argument("--cache_dir", default="")
    ap.add_argument("--max_mb", type=float, default=64.0, help="text used for the throughput measurement")
    ap.add_argument("--no_report", action="store_true", help="throughput only")
    ap.add_argument("--no_compress", action="store_true", help="skip the compressor baselines")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    base = DataConfig(source=args.source, split_mode=args.split_mode, val_fraction=args.val_fraction,
                      test_fraction=args.test_fraction, cache_dir=args.cache_dir)
    configs = {"bytes": base,
               f"{args.bpe}_K{args.K}": dataclasses.replace(base, tokenizer=args.bpe, bpe_merges=args.K)}
    texts = corpus_texts(base, int(args.max_mb * 1e6))
    result = {"source": args.source, "cpus": os.cpu_count(), "throughput": {}, "report": {}}
    for name, cfg in configs.items():
        tok = make_tokenizer(cfg)
        result["throughput"][name] = throughput(tok, texts)
        if not args.no_report:
            t0 = time.perf_counter()
            corpus = load_corpus(cfg, tok, progress=not args.json)
            t_load = time.perf_counter() - t0
            t0 = time.perf_counter()
            ref = baselines(corpus, tok, compress=not args.no_compress)
            result["report"][name] = {"corpus": corpus.describe(), "load_s": round(t_load, 2),
                                      "built": corpus.built,
                                      "baselines_s": round(time.perf_counter() - t0, 2), "baselines": ref}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"source: {args.source}   ({result['cpus']} CPUs)")
    for name, r in result["throughput"].items():
        print(f"tokenise {name:>22}: {r['MB_per_s_one_thread']:8.2f} MB/s one thread, "
              f"{r['MB_per_s_batch']:8.2f} MB/s batch   ({r['MB']} MB, {r['bytes_per_token']} bytes/token)")
    for name, rep in result["report"].items():
        d, b = rep["corpus"], rep["baselines"]
        print(f"\n[{name}] fingerprint {d['fingerprint'][:16]}  split {d['split_mode']}  "
              f"(load {rep['load_s']} s, {'built' if rep['built'] else 'from cache'})")
        for s, v in d["splits"].items():
            print(f"  {s:>10}: {v['docs']} docs, {v['tokens']} tokens, {v['bytes']} bytes")
        for s in ("validation", "test"):
            if s not in b["unigram"]:
                continue
            comp = b["compress"].get(s, {})
            ctext = (f"  best compressor {comp['best']:.3f} ({comp['best_name']}; lzma {comp['lzma']:.3f}, "
                     f"bz2 {comp['bz2']:.3f}, zlib {comp['zlib']:.3f})") if comp else ""
            print(f"  {s:>10} bits/byte: unigram {b['unigram'][s]:.3f}  bigram {b['bigram'][s]:.3f}{ctext}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
