"""Training batches with per-row continuity and exact resumption; evaluation blocks.

Training (:class:`BatchStream`): row r of the batch reads its own position of the
split, advancing by ``tokens_per_update`` each step; a batch is
``(rows, tokens_per_update + 1)`` so consecutive batches of a row overlap by one
token (the last target of a step is the first input of the next) and no target is
skipped. Rows start at seed-dependent offsets spaced ``len(split) / rows`` apart and
wrap around at the end of the split (which ends with a boundary, so a row wraps
from the end of the last document to the start of the first). Position is a pure
function of the step, so the cursor is ``{step, ...}`` and resuming is bit-exact.
A row range gives a process only its rows: the union over processes is the full
batch, exactly.

For a streamed split (hub corpora) rows pull whole documents from the shared
document stream, in row order, whenever they hold fewer than
``tokens_per_update + 1`` tokens; the cursor records which documents each row
holds and where it is in them.

Evaluation: :func:`eval_slice` is a fixed block from the start of a split;
:func:`iter_eval_batches` covers a whole split once, every token predicted exactly
once, with the exact UTF-8 byte count of the covered targets.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from int_lm.data.errors import DataError


def _seed_offset(seed: int, n: int) -> int:
    return int.from_bytes(hashlib.sha256(f"int_lm-rows-{seed}".encode()).digest()[:8], "big") % n


def _check_range(rows: int, row_range: Any) -> tuple[int, int]:
    if rows < 1:
        raise DataError(f"rows must be >= 1, got {rows}")
    lo, hi = (0, rows) if row_range is None else (int(row_range[0]), int(row_range[1]))
    if not 0 <= lo < hi <= rows:
        raise DataError(f"row_range {row_range} must satisfy 0 <= lo < hi <= rows={rows}")
    return lo, hi


def _init_stream(stream, split, rows, tokens_per_update, seed, row_range) -> None:
    """The settings both batch streams share, checked once."""
    stream.split = split
    stream.rows = int(rows)
    stream.T = int(tokens_per_update)
    stream.seed = int(seed)
    stream.lo, stream.hi = _check_range(stream.rows, row_range)
    if stream.T < 1:
        raise DataError(f"tokens_per_update must be >= 1, got {tokens_per_update}")


class BatchStream:
    """Deterministic, resumable training batches of shape (hi - lo, tokens_per_update + 1)."""

    def __new__(cls, split, rows, tokens_per_update, seed, cursor=None, row_range=None):
        if getattr(split, "streamed", False) and cls is BatchStream:
            return StreamBatchStream(split, rows, tokens_per_update, seed, cursor, row_range)
        return super().__new__(cls)

    def __init__(self, split, rows: int, tokens_per_update: int, seed: int,
                 cursor: dict[str, Any] | None = None, row_range: tuple[int, int] | None = None) -> None:
        _init_stream(self, split, rows, tokens_per_update, seed, row_range)
        n = len(split)
        if n < self.T + 1:
            raise DataError(f"the {split.name} split has {n} tokens, fewer than tokens_per_update + 1 = "
                            f"{self.T + 1}; use a bigger corpus or fewer tokens per update")
        self.n = n
        base = _seed_offset(self.seed, n)
        self._starts = (base + (np.arange(self.rows, dtype=np.int64) * n) // self.rows) % n
        self._step = 0
        if cursor is not None:
            self._restore(cursor)
        self._arange = np.arange(self.T + 1, dtype=np.int64)

    def _restore(self, cursor: dict[str, Any]) -> None:
        want = {"kind": "split", "rows": self.rows, "tokens_per_update": self.T, "seed": self.seed,
                "tokens": self.n}
        for k, v in want.items():
            if cursor.get(k) != v:
                raise DataError(f"data cursor was made with {k}={cursor.get(k)!r}, this run has {v!r}; "
                                f"resume with the same data/es settings or start a new run")
        self._step = int(cursor["step"])

    def cursor(self) -> dict[str, Any]:
        return {"kind": "split", "step": self._step, "rows": self.rows, "tokens_per_update": self.T,
                "seed": self.seed, "tokens": self.n}

    def positions(self) -> np.ndarray:
        """Start position in the split of each of this process's rows for the next batch."""
        return (self._starts[self.lo:self.hi] + self._step * self.T) % self.n

    def next(self) -> np.ndarray:
        pos = self.positions()
        idx = pos[:, None] + self._arange[None, :]
        if int(pos.max()) + self.T < self.n:
            out = np.asarray(self.split.tokens[idx])
        else:
            out = np.asarray(self.split.tokens[idx % self.n])
        self._step += 1
        return out.astype(np.int32)

    __next__ = next

    def __iter__(self):
        return self

    def close(self) -> None:
        pass


class StreamBatchStream:
    """BatchStream over a :class:`~int_lm.data.corpus.StreamSplit` (documents pulled on demand)."""

    def __init__(self, split, rows: int, tokens_per_update: int, seed: int,
                 cursor: dict[str, Any] | None = None, row_range: tuple[int, int] | None = None) -> None:
        _init_stream(self, split, rows, tokens_per_update, seed, row_range)
        # per row: list of [doc_id, length], offset into the first doc; tokens kept for own rows only
        self._docs: list[list[list[int]]] = [[] for _ in range(self.rows)]
        self._off = [0] * self.rows
        self._left = np.zeros(self.rows, dtype=np.int64)
        self._toks: dict[int, np.ndarray] = {}
        self._next_doc = 0
        if cursor is not None:
            want = {"kind": "stream", "rows": self.rows, "tokens_per_update": self.T}
            for k, v in want.items():
                if cursor.get(k) != v:
                    raise DataError(f"data cursor was made with {k}={cursor.get(k)!r}, this run has {v!r}; "
                                    f"resume with the same data/es settings or start a new run")
            self._next_doc = int(cursor["next_doc"])
            for r, entry in enumerate(cursor["rows_docs"]):
                self._off[r] = int(entry[0])
                self._docs[r] = [[int(entry[i]), int(entry[i + 1])] for i in range(1, len(entry), 2)]
                self._left[r] = sum(d[1] for d in self._docs[r]) - self._off[r]
        held = [d[0] for r in range(self.rows) for d in self._docs[r]]
        start = min(held) if held else self._next_doc
        self._it = split.docs(start)
        if held:  # re-tokenise the documents own rows still hold
            need = {d[0] for r in range(self.lo, self.hi) for d in self._docs[r]}
            for _ in range(start, self._next_doc):
                idx, toks = next(self._it)
                if idx in need:
                    self._toks[idx] = toks

    def cursor(self) -> dict[str, Any]:
        rows = []
        for r in range(self.rows):
            entry = [self._off[r]]
            for d in self._docs[r]:
                entry.extend(d)
            rows.append(entry)
        return {"kind": "stream", "next_doc": self._next_doc, "rows": self.rows, "tokens_per_update": self.T,
                "seed": self.seed, "rows_docs": rows}

    def _pull(self, r: int) -> None:
        idx, toks = next(self._it)
        assert idx == self._next_doc, (idx, self._next_doc)
        self._next_doc += 1
        self._docs[r].append([idx, int(toks.shape[0])])
        self._left[r] += toks.shape[0]
        if self.lo <= r < self.hi:
            self._toks[idx] = toks

    def next(self) -> np.ndarray:
        need = self.T + 1
        for r in range(self.rows):
            while self._left[r] < need:
                self._pull(r)
        out = np.empty((self.hi - self.lo, need), dtype=np.int32)
        for r in range(self.lo, self.hi):
            pieces, got, off = [], 0, self._off[r]
            for doc_id, length in self._docs[r]:
                t = self._toks[doc_id][off: off + need - got]
                pieces.append(t)
                got += t.shape[0]
                off = 0
                if got >= need:
                    break
            out[r - self.lo] = np.concatenate(pieces)
        for r in range(self.rows):
            self._off[r] += self.T
            self._left[r] -= self.T
            while self._docs[r] and self._off[r] >= self._docs[r][0][1]:
                doc_id, length = self._docs[r].pop(0)
                self._off[r] -= length
                self._toks.pop(doc_id, None)
        return out

    __next__ = next

    def __iter__(self):
        return self

    def close(self) -> None:
        self._it.close()


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------

def _materialised(split) -> None:
    if getattr(split, "streamed", False):
        raise DataError(f"the {split.name} split is streamed; evaluate on validation or test")


def eval_slice(split, rows: int, length: int) -> np.ndarray:
    """Fixed (rows, length + 1) int32 block: row i = tokens[i*length : (i+1)*length + 1]."""
    _materialised(split)
    n = len(split)
    if rows < 1 or length < 1:
        raise DataError(f"eval_slice needs rows >= 1 and length >= 1, got {rows}, {length}")
    if rows * length + 1 > n:
        raise DataError(f"the {split.name} split has {n} tokens, fewer than rows*length+1 = {rows * length + 1}; "
                        f"lower data.val_tokens or use a larger {split.name} split")
    idx = np.arange(rows, dtype=np.int64)[:, None] * length + np.arange(length + 1, dtype=np.int64)[None, :]
    return np.asarray(split.tokens[idx]).astype(np.int32)


def eval_slice_bytes(split, rows: int, length: int) -> int:
    """Exact UTF-8 bytes of the targets of :func:`eval_slice` (tokens 1 .. rows*length)."""
    return split.bytes_between(1, rows * length + 1)


@dataclass
class EvalBatch:
    """One evaluation block: ``tokens[:, :-1]`` inputs, ``tokens[:, 1:]`` targets where ``mask``."""

    tokens: np.ndarray      # (rows, length + 1) int32
    mask: np.ndarray        # (rows, length) bool: targets that count
    num_targets: int
    num_bytes: int          # exact UTF-8 bytes of the counted targets
    index: int              # batch number; reset the recurrent state before index 0


def eval_cuts(split, rows: int, m: int) -> np.ndarray:
    """Row segment starts (token positions) covering [0, m), snapped to document starts when close."""
    cuts = (np.arange(rows + 1, dtype=np.int64) * m) // rows
    if rows > 1 and len(split.doc_ends):
        starts = split.doc_ends + 1
        tol = max(1, (m // rows) // 4)
        for i in range(1, rows):
            j = int(np.searchsorted(starts, cuts[i]))
            best = None
            for k in (j - 1, j):
                if 0 <= k < len(starts) and abs(int(starts[k]) - int(cuts[i])) <= tol and starts[k] <= m:
                    if best is None or abs(int(starts[k]) - int(cuts[i])) < abs(best - int(cuts[i])):
                        best = int(starts[k])
            if best is not None:
                cuts[i] = best
        cuts = np.maximum.accumulate(cuts)
    cuts[0], cuts[-1] = 0, m
    return cuts


def iter_eval_batches(split, rows: int, length: int, max_tokens: int | None = None) -> Iterator[EvalBatch]:
    """Cover the split (or its first ``max_tokens`` tokens) once, every token predicted exactly once.

    The stream is ``[B] + tokens`` (the split starts right after a boundary). Row i
    predicts tokens ``[c_i, c_{i+1})`` as a contiguous segment; a row's input at
    batch ``j`` continues its input at batch ``j - 1``, so carry the recurrent state
    per row across batches (fresh state before batch 0). Cuts are snapped to
    document starts when one is near, so most rows begin with a boundary input.
    Padding (after a row's segment ends) is the boundary token with ``mask`` False.
    """
    _materialised(split)
    n = len(split)
    m = n if max_tokens is None else max(0, min(n, int(max_tokens)))
    if rows < 1 or length < 1:
        raise DataError(f"iter_eval_batches needs rows >= 1 and length >= 1, got {rows}, {length}")
    if m == 0:
        raise DataError(f"the {split.name} split is empty; nothing to evaluate")
    B = split.boundary_token
    cuts = eval_cuts(split, rows, m)
    seg = np.diff(cuts)
    nb = int(-(-int(seg.max()) // length))
    table = split.token_bytes
    b_bytes = int(table[B])
    ar = np.arange(length + 1, dtype=np.int64)
    for j in range(nb):
        # ext position e holds token e - 1 (ext[0] = B); row i's inputs start at ext[c_i + j*length]
        e0 = cuts[:-1] + j * length
        e = e0[:, None] + ar[None, :]
        valid_e = e <= cuts[1:, None]          # ext index of a target must be <= c_{i+1}
        src_idx = np.clip(e - 1, 0, max(n - 1, 0))
        toks = np.where(e == 0, B, np.asarray(split.tokens[src_idx]).astype(np.int64))
        toks = np.where(valid_e, toks, B).astype(np.int32)
        mask = valid_e[:, 1:]
        # target token positions [a, b) per row
        a = np.minimum(cuts[:-1] + j * length, cuts[1:])
        b = np.minimum(a + length, cuts[1:])
        nbytes = int((table[toks[:, 1:]] * mask).sum())
        nbound = np.searchsorted(split.doc_ends, b) - np.searchsorted(split.doc_ends, a)
        nbytes -= b_bytes * int(nbound.sum())
        yield EvalBatch(tokens=toks, mask=mask, num_targets=int(mask.sum()), num_bytes=nbytes, index=j)
