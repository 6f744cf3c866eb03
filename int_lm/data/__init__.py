"""Data layer: corpora, tokenizers, training/eval batches and baselines.

Public API (see docs/data.md)::

    tok = make_tokenizer(cfg.data)                 # bytes or tiktoken BPE cut to K
    corpus = load_corpus(cfg.data, tok)            # split + tokenised + cached (memmap)
    train = corpus.split("train")                  # Split (or StreamSplit for a hub corpus)
    stream = BatchStream(train, rows, T, seed)     # stream.next() -> int32 (rows, T + 1)
    cursor = stream.cursor()                       # JSON; BatchStream(..., cursor=cursor) resumes
    block = eval_slice(corpus.split("validation"), rows, length)
    for eb in iter_eval_batches(val, rows, length): ...   # whole split, exact bytes
    ref = baselines(corpus, tok)                   # unigram / bigram / compressors, bits per byte
"""
from int_lm.data.baselines import baselines, compress_bpb
from int_lm.data.batches import (BatchStream, EvalBatch, StreamBatchStream, eval_slice, eval_slice_bytes,
                                 iter_eval_batches)
from int_lm.data.corpus import Corpus, Split, StreamSplit, dtype_for, load_corpus
from int_lm.data.errors import DataError
from int_lm.data.tokenizers import BPETokenizer, ByteTokenizer, Tokenizer, make_tokenizer

__all__ = [
    "BPETokenizer", "BatchStream", "ByteTokenizer", "Corpus", "DataError", "EvalBatch", "Split",
    "StreamBatchStream", "StreamSplit", "Tokenizer", "baselines", "compress_bpb", "dtype_for",
    "eval_slice", "eval_slice_bytes", "iter_eval_batches", "load_corpus", "make_tokenizer",
]
