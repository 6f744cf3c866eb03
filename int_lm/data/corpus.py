"""Corpora: split, tokenise once, cache as memory-mapped token arrays.

Layout of a split's token stream: every document followed by the boundary token,
``doc0 B doc1 B ... docN B``, so the stream starts right after a (virtual) boundary
and ends with one. ``Split.doc_ends`` holds the positions of those boundary tokens,
which keeps byte accounting exact even when a document contains the boundary id
(a NUL byte with the ``bytes`` tokenizer).

Cache: ``<cache_dir>/<key>/`` with ``meta.json``, ``<split>.bin`` (uint8/16/32 by
vocabulary size) and ``<split>.ends.npy``; ``key`` hashes the corpus fingerprint,
the split settings and the tokenizer identity. It is written to a temporary
directory and renamed into place, so concurrent builders never see half a cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from int_lm.data import sources as src
from int_lm.data.errors import DataError
from int_lm.data.tokenizers import Tokenizer

CACHE_VERSION = 1
SPLITS = src.SPLITS
# number of times a corpus was tokenised in this process (tests check cache reuse with it)
BUILD_COUNT = 0


def dtype_for(vocab_size: int) -> np.dtype:
    if vocab_size <= 256:
        return np.dtype(np.uint8)
    if vocab_size <= 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def default_cache_dir(data_cfg: Any) -> Path:
    d = getattr(data_cfg, "cache_dir", "") or os.environ.get("INT_LM_CACHE_DIR", "") or "~/.cache/int_lm"
    return Path(os.path.expanduser(d))


def hash_unit(text_bytes: bytes) -> float:
    """A document's position in [0, 1) from the sha256 of its content."""
    return int.from_bytes(hashlib.sha256(text_bytes).digest()[:8], "big") / 2.0 ** 64


def hash_split(text_bytes: bytes, val: float, test: float) -> str:
    u = hash_unit(text_bytes)
    if u < val:
        return "validation"
    if u < val + test:
        return "test"
    return "train"


# ---------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------

@dataclass
class Split:
    """One split as a 1-D token array (memory-mapped) plus exact byte/document counts."""

    name: str
    tokens: np.ndarray
    doc_ends: np.ndarray
    num_bytes: int
    num_docs: int
    vocab_size: int
    boundary_token: int
    token_bytes: np.ndarray = field(repr=False)
    decode_bytes: Callable[[Any], bytes] = field(repr=False)
    streamed = False

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_tokens(self) -> int:
        return len(self)

    def boundaries_between(self, a: int, b: int) -> int:
        """Number of real document boundaries at token positions [a, b)."""
        return int(np.searchsorted(self.doc_ends, b) - np.searchsorted(self.doc_ends, a))

    def bytes_between(self, a: int, b: int) -> int:
        """Exact UTF-8 bytes of the text at token positions [a, b) (boundaries count 0)."""
        a, b = max(0, a), min(len(self), b)
        if b <= a:
            return 0
        total = 0
        step = 1 << 24
        for s in range(a, b, step):
            counts = np.bincount(np.asarray(self.tokens[s:min(b, s + step)]), minlength=self.vocab_size)
            total += int(counts[: self.vocab_size] @ self.token_bytes)
        return total - int(self.token_bytes[self.boundary_token]) * self.boundaries_between(a, b)

    def raw_bytes(self, max_bytes: int | None = None) -> bytes:
        """The split's text (documents concatenated, no boundaries), optionally a prefix."""
        n = len(self)
        if n == 0:
            return b""
        end = n
        if max_bytes is not None and max_bytes < self.num_bytes:
            # each token is at least one byte except boundaries: a prefix of max_bytes + docs tokens suffices
            end = min(n, max_bytes + int(np.searchsorted(self.doc_ends, max_bytes * 2)) + 1)
        toks = np.asarray(self.tokens[:end])
        ends = self.doc_ends[self.doc_ends < end]
        keep = np.ones(end, dtype=bool)
        keep[ends] = False
        data = self.decode_bytes(toks[keep])
        return data if max_bytes is None else data[:max_bytes]

    def describe(self) -> dict[str, Any]:
        return {"docs": self.num_docs, "tokens": len(self), "bytes": self.num_bytes,
                "bytes_per_token": round(self.num_bytes / len(self), 4) if len(self) else None}


class _SplitWriter:
    def __init__(self, path: Path, dtype: np.dtype, boundary: int) -> None:
        self.path, self.dtype, self.boundary = path, dtype, boundary
        self.f = open(path, "wb")
        self.n = 0
        self.bytes = 0
        self.docs = 0
        self.ends: list[int] = []
        self._boundary_arr = np.array([boundary], dtype=dtype)

    def add(self, ids: np.ndarray, nbytes: int) -> None:
        self.f.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.f.write(self._boundary_arr.tobytes())
        self.n += int(ids.shape[0]) + 1
        self.ends.append(self.n - 1)
        self.bytes += nbytes
        self.docs += 1

    def close(self) -> dict[str, Any]:
        self.f.close()
        np.save(self.path.with_suffix(".ends.npy"), np.asarray(self.ends, dtype=np.int64))
        return {"tokens": self.n, "bytes": self.bytes, "docs": self.docs, "dtype": self.dtype.name}


def _open_split(cache: Path, name: str, info: dict[str, Any], tok: Tokenizer) -> Split:
    n = int(info["tokens"])
    dtype = np.dtype(info["dtype"])
    path = cache / f"{name}.bin"
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype=dtype)
    ends = np.load(cache / f"{name}.ends.npy")
    return Split(name=name, tokens=tokens, doc_ends=ends, num_bytes=int(info["bytes"]),
                 num_docs=int(info["docs"]), vocab_size=tok.vocab_size, boundary_token=tok.boundary_token,
                 token_bytes=tok.token_bytes(), decode_bytes=tok.decode_bytes)


# ---------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------

class Corpus:
    """A tokenised corpus: ``split(name)`` for train/validation/test, ``describe()``."""

    def __init__(self, *, fingerprint: str, source: str, kind: str, meta: dict[str, Any],
                 splits: dict[str, Any], cache_path: Path, built: bool, tokenizer: Tokenizer) -> None:
        self.fingerprint = fingerprint
        self.source = source
        self.kind = kind
        self.meta = meta
        self._splits = splits
        self.cache_path = cache_path
        self.built = built
        self.tokenizer = tokenizer

    def split(self, name: str):
        alias = src.split_alias(name) or name
        if alias not in self._splits:
            raise DataError(f"unknown split {name!r}; use train, validation or test")
        return self._splits[alias]

    def describe(self) -> dict[str, Any]:
        out = {"source": self.source, "kind": self.kind, "fingerprint": self.fingerprint,
               "tokenizer": self.tokenizer.identity(), "split_mode": self.meta.get("split_mode"),
               "cache": str(self.cache_path), "splits": {}}
        for name, s in self._splits.items():
            out["splits"][name] = s.describe()
        return out


def _cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _finish_cache(tmp: Path, final: Path) -> None:
    try:
        os.rename(tmp, final)
    except OSError:
        if (final / "meta.json").is_file():  # another process won the race: use its cache
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)


def _ensure_cache(cache_root: Path, key: str, tok: Tokenizer, settings: dict[str, Any], build) -> bool:
    """Build ``cache_root/key`` once, atomically: ``build(tmp)`` writes the split files into a
    temporary directory and returns their metadata; the directory is renamed into place only
    when complete, and removed on any failure. Returns whether it was built now."""
    global BUILD_COUNT
    final = cache_root / key
    if (final / "meta.json").is_file():
        return False
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = cache_root / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    try:
        meta = build(tmp)
        meta.update({"version": CACHE_VERSION, "key": key, "tokenizer": tok.identity(), "settings": settings,
                     "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _finish_cache(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    BUILD_COUNT += 1
    return True


def _check_splits(splits: dict[str, Any], data_cfg: Any, ndocs: int, hint: str) -> None:
    if "train" in splits and not getattr(splits["train"], "streamed", False) and len(splits["train"]) == 0:
        raise DataError(f"the train split is empty ({ndocs} documents); {hint}")
    for name, frac in (("validation", data_cfg.val_fraction), ("test", data_cfg.test_fraction)):
        s = splits.get(name)
        if frac > 0 and s is not None and len(s) == 0:
            raise DataError(f"the {name} split is empty ({ndocs} documents); {hint}")


def load_corpus(data_cfg: Any, tokenizer: Tokenizer, *, progress: bool = True) -> Corpus:
    """Open ``data_cfg.source`` split and tokenised, building the cache on first use."""
    cache_root = default_cache_dir(data_cfg)
    source = (data_cfg.source or "stdlib").strip()
    if source == "stdlib":
        s = src.stdlib_source(data_cfg.max_docs, cache_root)
        return _local_corpus(s, data_cfg, tokenizer, cache_root, progress)
    if src.is_hub_name(source):
        return _stream_corpus(source.removeprefix("hf:"), data_cfg, tokenizer, cache_root, progress)
    s = src.local_source(source, data_cfg, cache_root)
    return _local_corpus(s, data_cfg, tokenizer, cache_root, progress)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total or None, unit="B", unit_scale=True, desc=desc, disable=not enabled,
                mininterval=0.5, leave=False)


def _local_corpus(s: src.Source, data_cfg: Any, tok: Tokenizer, cache_root: Path, progress: bool) -> Corpus:
    mode = data_cfg.split_mode
    split_parts = {"mode": mode, "val": repr(data_cfg.val_fraction), "test": repr(data_cfg.test_fraction)}
    key = _cache_key({"v": CACHE_VERSION, "fp": s.fingerprint, "split": split_parts,
                      "tok": tok.identity_hash()})
    final = cache_root / key

    def build(tmp: Path) -> dict[str, Any]:
        meta = _build_local(s, data_cfg, tok, tmp, progress)
        meta.update({"fingerprint": s.fingerprint, "source": s.description, "kind": s.kind})
        return meta

    built = _ensure_cache(cache_root, key, tok, split_parts, build)
    meta = json.loads((final / "meta.json").read_text())
    splits = {name: _open_split(final, name, meta["splits"][name], tok) for name in SPLITS}
    ndocs = sum(v["docs"] for v in meta["splits"].values())
    hint = ("the corpus is too small for this split: add documents, use data.split_mode=contiguous, "
            "or set data.separator to cut files into documents")
    _check_splits(splits, data_cfg, ndocs, hint)
    return Corpus(fingerprint=s.fingerprint, source=s.description, kind=s.kind, meta=meta, splits=splits,
                  cache_path=final, built=built, tokenizer=tok)


def _encode_docs(tok: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    return tok.encode_batch(texts)


def _build_local(s: src.Source, data_cfg: Any, tok: Tokenizer, out: Path, progress: bool) -> dict[str, Any]:
    dtype = dtype_for(tok.vocab_size)
    writers = {name: _SplitWriter(out / f"{name}.bin", dtype, tok.boundary_token) for name in SPLITS}
    val, test = float(data_cfg.val_fraction), float(data_cfg.test_fraction)
    mode = data_cfg.split_mode
    own = s.own_splits
    if mode == "contiguous" and own:
        raise DataError("data.split_mode=contiguous needs a corpus without its own train/validation/test files")
    if mode == "auto":
        mode = "hash"
        if not own:
            first_two = []
            for doc in s.groups["all"]():
                first_two.append(doc)
                if len(first_two) > 1:
                    break
            if len(first_two) == 1:
                mode = "contiguous"

    pending: list[tuple[str, str, bytes]] = []  # (split, text, utf8)
    pending_bytes = 0
    bar = _progress(s.total_bytes, "tokenising", progress)

    def flush() -> None:
        nonlocal pending, pending_bytes
        if not pending:
            return
        ids = _encode_docs(tok, [t for _, t, _ in pending])
        for (name, _, b), arr in zip(pending, ids):
            writers[name].add(arr, len(b))
        bar.update(pending_bytes)
        pending, pending_bytes = [], 0

    def emit(name: str, text: str, b: bytes) -> None:
        nonlocal pending_bytes
        pending.append((name, text, b))
        pending_bytes += len(b)
        if pending_bytes >= (4 << 20) or len(pending) >= 1024:
            flush()

    try:
        if mode == "contiguous":
            total = sum(len(t.encode("utf-8")) for _, t in s.groups["all"]())
            keep = 1 - Fraction(repr(val)) - Fraction(repr(test))
            cuts = [int(total * keep), int(total * (keep + Fraction(repr(val)))), total]
            names = ["train", "validation", "test"]
            pos = 0
            for _, text in s.groups["all"]():
                b = text.encode("utf-8")
                start = 0
                while start < len(b):
                    k = next(i for i, c in enumerate(cuts) if pos + start < c)
                    stop = min(len(b), cuts[k] - pos)
                    while 0 < stop < len(b) and (b[stop] & 0xC0) == 0x80:  # never cut inside a character
                        stop += 1
                    piece = b[start:stop]
                    if piece:
                        emit(names[k], piece.decode("utf-8"), piece)
                    start = stop
                pos += len(b)
        else:
            for group, gen in s.groups.items():
                for _, text in gen():
                    b = text.encode("utf-8")
                    if group == "all":
                        name = hash_split(b, val, test)
                    elif group == "train":
                        # a split the corpus lacks is carved from its train documents by hash
                        name = hash_split(b, val if "validation" not in s.groups else 0.0,
                                          test if "test" not in s.groups else 0.0)
                    else:
                        name = group
                    emit(name, text, b)
        flush()
    finally:
        bar.close()
        infos = {name: w.close() for name, w in writers.items()}
    if sum(i["docs"] for i in infos.values()) == 0:
        raise DataError(f"data.source {s.description} holds no text; point it at non-empty documents")
    return {"splits": infos, "split_mode": "own" if own else mode}


# ---------------------------------------------------------------------------
# Streamed corpora (datasets streaming=True): train on the fly, eval materialised
# ---------------------------------------------------------------------------

class StreamSplit:
    """A train split read from a ``datasets`` stream and tokenised in a background thread.

    ``docs(start)`` yields ``(index, tokens)`` with the boundary token appended, for the
    kept documents in stream order from document ``start`` on, wrapping around at the
    end of the stream (indices keep increasing). Use it through :class:`BatchStream`.
    """

    streamed = True

    def __init__(self, name: str, make_iter: Callable[[], Iterator[str]], tok: Tokenizer,
                 keep: Callable[[bytes], bool] | None, queue_batches: int = 16, batch_docs: int = 64):
        self.name = name
        self._make_iter = make_iter
        self._lock = threading.Lock()
        self._tok = tok
        self._keep = keep
        self.vocab_size = tok.vocab_size
        self.boundary_token = tok.boundary_token
        self.num_bytes = None
        self.num_docs = None
        self.queue_batches = queue_batches
        self.batch_docs = batch_docs

    def __len__(self) -> int:
        raise DataError("a streamed split has no length; use BatchStream on it (eval needs a materialised split)")

    def describe(self) -> dict[str, Any]:
        return {"docs": None, "tokens": None, "bytes": None, "streamed": True}

    def _kept_texts(self, start: int) -> Iterator[tuple[int, str, bytes]]:
        idx = 0
        while True:
            seen = 0
            with self._lock:  # several prefetch threads may read one dataset: one at a time
                texts = iter(self._make_iter())
            while True:
                with self._lock:
                    text = next(texts, _END)
                if text is _END:
                    break
                b = text.encode("utf-8")
                if self._keep is not None and not self._keep(b):
                    continue
                seen += 1
                if idx >= start:
                    yield idx, text, b
                idx += 1
            if seen == 0:
                raise DataError(f"the streamed {self.name} split holds no documents; check the dataset/column")

    def docs(self, start: int = 0) -> "_Prefetcher":
        return _Prefetcher(self, start)


_END = object()  # end of one pass over a streamed split


class _Prefetcher:
    """Background thread: texts -> token arrays in a bounded queue; iterate to consume."""

    def __init__(self, split: StreamSplit, start: int) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=split.queue_batches)
        self._stop = threading.Event()
        self._split = split
        self._buf: list[tuple[int, np.ndarray]] = []
        self._pos = 0
        self._thread = threading.Thread(target=self._run, args=(start,), daemon=True, name="int_lm-tokenise")
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, start: int) -> None:
        sp = self._split
        B = sp.boundary_token
        try:
            batch: list[tuple[int, str]] = []
            for idx, text, _ in sp._kept_texts(start):
                batch.append((idx, text))
                if len(batch) >= sp.batch_docs:
                    ids = sp._tok.encode_batch([t for _, t in batch])
                    out = [(i, np.append(a, B).astype(np.int32)) for (i, _), a in zip(batch, ids)]
                    if not self._put(out):
                        return
                    batch = []
                if self._stop.is_set():
                    return
        except BaseException as err:  # delivered to the consumer
            self._put(err)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, np.ndarray]:
        while self._pos >= len(self._buf):
            item = self._q.get()
            if isinstance(item, BaseException):
                raise item
            self._buf, self._pos = item, 0
        self._pos += 1
        return self._buf[self._pos - 1]

    def close(self) -> None:
        self._stop.set()

    def __del__(self) -> None:
        self._stop.set()


def _stream_corpus(name: str, data_cfg: Any, tok: Tokenizer, cache_root: Path, progress: bool) -> Corpus:
    if data_cfg.split_mode == "contiguous":
        raise DataError("data.split_mode=contiguous is not available for a streamed corpus; use auto or hash")
    streams = src.open_stream(name, data_cfg)
    val, test = float(data_cfg.val_fraction), float(data_cfg.test_fraction)
    carve_val = 0.0 if "validation" in streams else val
    carve_test = 0.0 if "test" in streams else test
    files_fp = ""
    df = src.parse_data_files(data_cfg.data_files)
    if df is not None:  # local files through datasets: hash them so edits invalidate the cache
        globs = df if isinstance(df, list) else [g for v in df.values() for g in v]
        import glob as globmod
        paths = sorted({Path(p).resolve() for g in globs for p in globmod.glob(os.path.expanduser(g), recursive=True)
                        if Path(p).is_file()})
        files_fp = src.fingerprint_files(paths, None, {}, cache_root)
    spec = {"name": name, "config": data_cfg.hub_config, "data_files": data_cfg.data_files, "files": files_fp,
            "column": data_cfg.text_column, "max_docs": data_cfg.max_docs}
    split_parts = {"mode": "hash", "val": repr(carve_val), "test": repr(carve_test),
                   "cap": data_cfg.hub_eval_bytes}
    key = _cache_key({"v": CACHE_VERSION, "stream": spec, "split": split_parts, "tok": tok.identity_hash()})
    final = cache_root / key
    column = data_cfg.text_column
    max_docs = data_cfg.max_docs

    def texts(split: str) -> Iterator[str]:
        n = 0
        for t in src.iter_stream_docs(streams[split], column, f"{name} [{split}]"):
            yield t
            n += 1
            if max_docs and n >= max_docs:
                return

    def build(tmp: Path) -> dict[str, Any]:
        meta = _materialise_eval(texts, streams, tok, tmp, carve_val, carve_test, data_cfg.hub_eval_bytes,
                                 progress)
        h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
        h.update(meta.pop("content_sha256").encode())
        meta.update({"fingerprint": h.hexdigest(), "source": f"hf:{name}", "kind": "stream", "spec": spec,
                     "split_mode": "own+hash",
                     "note": "train is streamed: the fingerprint covers the dataset spec and the "
                             "materialised validation/test text"})
        return meta

    built = _ensure_cache(cache_root, key, tok, split_parts, build)
    meta = json.loads((final / "meta.json").read_text())
    splits: dict[str, Any] = {n: _open_split(final, n, meta["splits"][n], tok) for n in ("validation", "test")}
    keep = None
    if carve_val or carve_test:
        def keep(b: bytes) -> bool:
            return hash_split(b, carve_val, carve_test) == "train"
    splits["train"] = StreamSplit("train", lambda: texts("train"), tok, keep)
    splits = {n: splits[n] for n in SPLITS}
    _check_splits(splits, data_cfg, -1, "raise data.hub_eval_bytes or the fraction, or pick another dataset")
    return Corpus(fingerprint=meta["fingerprint"], source=f"hf:{name}", kind="stream", meta=meta, splits=splits,
                  cache_path=final, built=built, tokenizer=tok)


def _materialise_eval(texts, streams, tok: Tokenizer, out: Path, carve_val: float, carve_test: float,
                      cap: int, progress: bool) -> dict[str, Any]:
    dtype = dtype_for(tok.vocab_size)
    writers = {n: _SplitWriter(out / f"{n}.bin", dtype, tok.boundary_token) for n in ("validation", "test")}
    content = hashlib.sha256()
    bar = _progress(2 * cap, "materialising eval splits", progress)
    try:
        for n in ("validation", "test"):
            if n in streams:
                for text in texts(n):
                    if writers[n].bytes >= cap:
                        break
                    b = text.encode("utf-8")
                    content.update(hashlib.sha256(b).digest())
                    writers[n].add(tok.encode(text), len(b))
                    bar.update(len(b))
        if carve_val or carve_test:
            wanted = [n for n, f in (("validation", carve_val), ("test", carve_test)) if f > 0]
            for text in texts("train"):
                if all(writers[n].bytes >= cap for n in wanted):
                    break
                b = text.encode("utf-8")
                n = hash_split(b, carve_val, carve_test)
                if n != "train" and writers[n].bytes < cap:
                    content.update(hashlib.sha256(b).digest())
                    writers[n].add(tok.encode(text), len(b))
                    bar.update(len(b))
    finally:
        bar.close()
        infos = {n: w.close() for n, w in writers.items()}
    return {"splits": infos, "content_sha256": content.hexdigest()}
