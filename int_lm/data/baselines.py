"""Reference bits per byte: unigram, bigram and standard-library compressors.

* unigram: add-one smoothed token frequencies fitted on train;
* bigram: ``p(t | s) = (c(s, t) + V * u(t)) / (c(s) + V)`` fitted on train, where ``u``
  is the add-one unigram (add-one smoothing with its pseudo-counts spread by the
  unigram instead of uniformly; for a uniform ``u`` it is exactly add-one);
* compressors: lzma (preset 9 | extreme), bz2 (level 9), zlib (level 9) on each split's
  raw UTF-8 text (documents concatenated, no boundaries); the best is reported.

Everything is in bits per UTF-8 byte, whatever the tokenizer: total bits over all
targets of the split (boundary tokens included: the model predicts them too) divided
by the split's exact byte count. The first token of a split is predicted from the
boundary token (the split starts right after a boundary), as in evaluation.
"""
from __future__ import annotations

import bz2
import json
import lzma
import math
import zlib
from typing import Any

import numpy as np

BASELINES_VERSION = 1
DENSE_MAX_V = 4097           # V*V int32 counts fit in ~67 MB
COMPRESS_MAX_BYTES = 32 << 20
STREAM_FIT_TOKENS = 16 << 20


def _train_tokens(corpus) -> tuple[np.ndarray, str]:
    tr = corpus.split("train")
    if not getattr(tr, "streamed", False):
        return np.asarray(tr.tokens), "train"
    parts, got = [], 0
    it = tr.docs(0)
    try:
        for idx, toks in it:
            parts.append(toks)
            got += toks.shape[0]
            if got >= STREAM_FIT_TOKENS or (idx > 0 and idx % 1_000_000 == 0):
                break
    finally:
        it.close()
    return np.concatenate(parts), f"first {got} tokens of the streamed train split"


def _with_context(tokens: np.ndarray, boundary: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(tokens).astype(np.int64)
    prev = np.empty_like(t)
    if t.size:
        prev[0] = boundary
        prev[1:] = t[:-1]
    return prev, t


class NGramBaseline:
    """Unigram and bigram models fitted on a token array."""

    def __init__(self, train: np.ndarray, vocab_size: int, boundary: int) -> None:
        V = vocab_size
        self.V, self.B = V, boundary
        counts = np.bincount(np.asarray(train), minlength=V).astype(np.float64)
        self.uni = (counts + 1.0) / (counts.sum() + V)
        prev, cur = _with_context(train, boundary)
        self.ctx = np.bincount(prev, minlength=V).astype(np.float64)
        if V <= DENSE_MAX_V:
            self.dense = np.bincount(prev * V + cur, minlength=V * V).astype(np.int32)
            self.keys = self.vals = None
        else:
            self.dense = None
            self.keys, self.vals = np.unique(prev * V + cur, return_counts=True)

    def _pair_counts(self, pairs: np.ndarray) -> np.ndarray:
        if self.dense is not None:
            return self.dense[pairs].astype(np.float64)
        if self.keys.size == 0:
            return np.zeros(pairs.shape, dtype=np.float64)
        pos = np.clip(np.searchsorted(self.keys, pairs), 0, self.keys.size - 1)
        return np.where(self.keys[pos] == pairs, self.vals[pos], 0).astype(np.float64)

    def unigram_bits(self, tokens: np.ndarray) -> float:
        return float(-np.log2(self.uni[np.asarray(tokens).astype(np.int64)]).sum())

    def bigram_bits(self, tokens: np.ndarray) -> float:
        total = 0.0
        step = 1 << 22
        t = np.asarray(tokens)
        for s in range(0, t.shape[0], step):
            cur = t[s:s + step].astype(np.int64)
            prev = np.empty_like(cur)
            prev[0] = self.B if s == 0 else int(t[s - 1])
            prev[1:] = cur[:-1]
            c = self._pair_counts(prev * self.V + cur)
            p = (c + self.V * self.uni[cur]) / (self.ctx[prev] + self.V)
            total += float(-np.log2(p).sum())
        return total


def compress_bpb(data: bytes) -> dict[str, float]:
    """Bits per byte of lzma/bz2/zlib at their maximum levels, and the best."""
    if not data:
        return {}
    n = len(data)
    out = {
        "lzma": 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / n,
        "bz2": 8 * len(bz2.compress(data, 9)) / n,
        "zlib": 8 * len(zlib.compress(data, 9)) / n,
    }
    best = min(out, key=out.get)
    out = {k: round(v, 4) for k, v in out.items()}
    out["best"] = out[best]
    out["best_name"] = best
    out["bytes"] = n
    return out


def baselines(corpus, tokenizer=None, *, compress: bool = True, use_cache: bool = True) -> dict[str, Any]:
    """Unigram/bigram bits per byte (fit on train) and compressor bits per byte per split."""
    tok = tokenizer or corpus.tokenizer
    cache_file = corpus.cache_path / f"baselines-v{BASELINES_VERSION}{'' if compress else '-nocomp'}.json"
    if use_cache and cache_file.is_file():
        try:
            return json.loads(cache_file.read_text())
        except ValueError:
            pass
    train, fitted_on = _train_tokens(corpus)
    model = NGramBaseline(train, tok.vocab_size, tok.boundary_token)
    out: dict[str, Any] = {"fitted_on": fitted_on, "tokenizer": tok.identity(),
                           "fingerprint": corpus.fingerprint, "unigram": {}, "bigram": {},
                           "unigram_bits_per_token": {}, "bigram_bits_per_token": {}, "compress": {}}
    for name in ("validation", "test"):
        s = corpus.split(name)
        if len(s) == 0 or s.num_bytes == 0:
            continue
        toks = np.asarray(s.tokens)
        ub, bb = model.unigram_bits(toks), model.bigram_bits(toks)
        out["unigram"][name] = round(ub / s.num_bytes, 4)
        out["bigram"][name] = round(bb / s.num_bytes, 4)
        out["unigram_bits_per_token"][name] = round(ub / len(s), 4)
        out["bigram_bits_per_token"][name] = round(bb / len(s), 4)
    if compress:
        for name in ("train", "validation", "test"):
            s = corpus.split(name)
            if getattr(s, "streamed", False) or len(s) == 0:
                continue
            data = s.raw_bytes(COMPRESS_MAX_BYTES)
            res = compress_bpb(data)
            if res:
                res["prefix"] = len(data) < s.num_bytes
                out["compress"][name] = res
    if not math.isfinite(sum(out["unigram"].values() or [0.0])):
        raise AssertionError("non-finite baseline")  # pragma: no cover
    try:
        cache_file.write_text(json.dumps(out, indent=1))
    except OSError:
        pass
    return out
