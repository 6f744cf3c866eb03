"""int_lm.backend.cpu_flags: what the CPU offers for int8 work, from /proc/cpuinfo (or nothing)."""
from int_lm import backend

X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16 amx_tile amx_int8 amx_bf16

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2
"""

EPYC = """processor\t: 0
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse2 avx avx2 fma
"""

ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes crc32 asimddp sve i8mm bf16
CPU implementer\t: 0x41
"""


def test_reports_the_int8_relevant_flags_in_a_fixed_order(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(X86)
    info = backend.cpu_flags(path)
    assert info["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert info["flags"] == ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                             "amx_tile", "amx_int8", "amx_bf16"]  # the first processor's; fpu, sse2 left out
    assert info["source"] == str(path)
    path.write_text(EPYC)
    info = backend.cpu_flags(path)
    assert info["flags"] == ["avx2", "fma"] and "avx512_vnni" not in info["flags"]
    assert "AMD EPYC 7B12" in backend.describe_cpu(info) and "avx2 fma" in backend.describe_cpu(info)


def test_arm_features_line(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(ARM)
    info = backend.cpu_flags(path)
    assert info["flags"] == ["asimd", "asimddp", "i8mm", "sve", "bf16"]
    assert info["model"]  # no model name line: falls back to platform's


def test_without_cpuinfo_flags_are_unknown_not_absent(tmp_path):
    info = backend.cpu_flags(tmp_path / "missing")
    assert info["source"] is None and info["flags"] == [] and info["model"]
    assert "flags unknown" in backend.describe_cpu(info)


def test_this_machine():
    info = backend.cpu_flags()
    assert set(info) == {"model", "arch", "cpus", "flags", "source"}
    assert all(f in backend.INT8_GEMM_FLAGS for f in info["flags"])


# ---------------------------------------------------------------------------
# The XLA workarounds: an explicit switch, and not a bit of difference
# ---------------------------------------------------------------------------

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from int_lm import eggroll, evaluate, generate, model  # noqa: E402
from int_lm.errors import UserError  # noqa: E402
from conftest import import_benchmark  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def every_workaround_path():
    """Results of every path a workaround touches, at a small size: rank 2 (the joined Wf/Wh factors),
    two chunks (a fused noise draw each), ranked fitness (a second pass redraws the noise), the
    unperturbed forward with logits, an evaluation block and generated text. (The sign-shaped step
    and an update: the golden-digest test below.)"""
    shape = model.ModelShape(64, 32, 1, boundary_token=0)
    params = model.init_params(shape, 1)
    tokens = np.random.default_rng(0).integers(0, 64, (8, 13)).astype(np.int32)
    tokens[:, 6] = 0
    spec = eggroll.EggrollSpec(shape, population=16, rank=2, chunk_size=8, fitness_levels=3)
    votes, scores, states = jax.jit(lambda p, s, t: eggroll.population_votes(spec, p, s, t, 3, 1))(
        params, model.init_state(shape, 16), tokens)
    out = {"votes": {"/".join(k): v for k, v in votes.items()}, "scores": scores, "member_states": states}
    fwd = jax.jit(lambda p, s, x: model.forward(p, s, x[:, :-1], x[:, 1:], 0, return_logits=True))
    out["forward"] = fwd(params, model.init_state(shape, 8), tokens)
    out["eval_block"] = evaluate.make_block_fn(shape)(params, model.init_state(shape, 8), jnp.asarray(tokens))
    out["generate"] = generate.generate(params, shape, [5, 6, 7], max_new_tokens=5, seed=2, num_samples=2)
    return jax.tree_util.tree_map(np.asarray, out)


def test_results_are_bit_identical_with_and_without_the_workarounds():
    with backend.plain_xla(False):
        assert backend.workarounds_enabled() and backend.cpu_workarounds_enabled() == (jax.default_backend() == "cpu")
        with_them = every_workaround_path()
    with backend.plain_xla(True):
        assert not backend.workarounds_enabled() and not backend.cpu_workarounds_enabled()
        without = every_workaround_path()
    flat_with, tree_with = jax.tree_util.tree_flatten_with_path(with_them)
    flat_without, tree_without = jax.tree_util.tree_flatten_with_path(without)
    assert tree_with == tree_without
    for (path, a), (_, b) in zip(flat_with, flat_without):
        assert a.dtype == b.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_the_golden_step_and_forward_digests_hold_without_the_workarounds(tmp_path):
    """benchmarks/gpu_check.py's (a) forward and (b) EGGROLL step (scores, votes, member states, the
    update and its statistics) give the committed CPU digests with the workarounds off as well."""
    gpu_check = import_benchmark("gpu_check")
    golden = json.loads((ROOT / "tests" / "golden" / "gpu_check.json").read_text())["digests"]
    with backend.plain_xla(True):
        got = {"a_forward": gpu_check.digest_forward(), "b_step": gpu_check.digest_step()}
    for part, digests in got.items():
        assert digests == golden[part], part


def test_the_switch_decides_what_is_traced():
    shape = model.ModelShape(64, 32, 1)
    spec = eggroll.EggrollSpec(shape, population=8, rank=2)
    params = model.init_params(shape, 0)
    tokens = jnp.ones((4, 5), jnp.int32)

    def layer_factors(p):
        noise = eggroll.make_noise(spec, 0, 0, jnp.arange(4, dtype=jnp.int32))
        _, factors = eggroll.member_model_inputs(spec, p, noise)
        return backend.join_wf_wh_factors(model.unstack_layers(factors, 1))["layers"]

    def traced():  # traced, never compiled
        jaxpr = jax.make_jaxpr(lambda p, s, t: eggroll.population_votes(spec, p, s, t, 0, 0))(
            params, model.init_state(shape, 8), tokens)
        return str(jaxpr), backend.JOINED_WF_WH_B in jax.eval_shape(layer_factors, params)

    with backend.plain_xla(False):
        text, joined = traced()
    assert joined and "select_n" in text
    assert ("cond[" in text) == (jax.default_backend() == "cpu")  # materialize and the fused noise draw
    with backend.plain_xla(True):
        text, joined = traced()
    assert not joined and "cond[" not in text


@pytest.mark.parametrize("value,plain", [("1", True), ("true", True), ("ON", True), ("0", False), ("", False),
                                         ("no", False)])
def test_plain_xla_environment_variable(monkeypatch, value, plain):
    monkeypatch.setenv(backend.PLAIN_XLA_ENV, value)
    backend._plain_from_env.cache_clear()
    try:
        assert backend.workarounds_enabled() is (not plain)
        with backend.plain_xla(not plain):   # the context manager wins over the environment
            assert backend.workarounds_enabled() is plain
        assert backend.workarounds_enabled() is (not plain)
    finally:
        monkeypatch.undo()
        backend._plain_from_env.cache_clear()


def test_a_value_it_does_not_understand_is_a_user_error(monkeypatch):
    monkeypatch.setenv(backend.PLAIN_XLA_ENV, "maybe")
    backend._plain_from_env.cache_clear()
    try:
        with pytest.raises(UserError, match="INT_LM_PLAIN_XLA='maybe'"):
            backend.workarounds_enabled()
    finally:
        monkeypatch.undo()
        backend._plain_from_env.cache_clear()


def test_the_environment_variable_reaches_a_fresh_process():
    code = ("import jax; from int_lm import backend, model; s = model.ModelShape(16, 8, 1); "
            "j = jax.make_jaxpr(lambda p: model.forward(p, model.init_state(s, 2), jax.numpy.ones((2, 3), 'int32'), "
            "jax.numpy.ones((2, 3), 'int32'), 0))(model.init_params(s, 0)); "
            "print(backend.workarounds_enabled(), 'cond[' in str(j))")
    for value, want in (("1", "False False"), ("0", f"True {jax.default_backend() == 'cpu'}")):
        env = {**__import__("os").environ, backend.PLAIN_XLA_ENV: value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split("\n")[-2] == want
