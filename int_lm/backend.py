"""Backend-specific details in one place: what the machine offers, and the XLA workarounds.

The rest of the package describes the integer model and EGGROLL; whatever depends
on which CPU or accelerator runs them lives here, so that a reader of the model
does not have to learn it first.

* :func:`cpu_flags`: the CPU's model name and the instruction-set flags that decide
  how fast int8 GEMMs and the integer element work run (AVX2, AVX-512, VNNI, AMX; on
  ARM the dot-product and int8-matmul extensions). Benchmarks and run metadata record
  it so every figure says what it ran on (docs/performance.md keeps one table per CPU kind).
* The workarounds: ways of writing the same integer computation that XLA compiles
  faster. None changes a single bit of any result (tests/test_backend.py runs a step
  with and without them). :func:`materialize` and :func:`draw_noise_fused` apply on the
  CPU only; :func:`keep_int8_in_loop` and the joined Wf/Wh factors
  (:func:`join_wf_wh_factors`, :func:`wf_wh_dots`) on every backend, as before they
  moved here. ``INT_LM_PLAIN_XLA=1`` in the environment (read once) turns them all off;
  :func:`plain_xla` does the same for code traced inside it. The measurements behind
  each are in docs/performance.md ("Backend workarounds").
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

from int_lm.errors import UserError

# Flags that bear on integer GEMM and SIMD element-work speed, in the order we report them.
# x86: AVX2 (256-bit integer SIMD), AVX-512 (F: foundation, BW: byte/word ops), VNNI
# (int8 dot-product instructions, in AVX-512 and in the VEX "AVX-VNNI" form), BF16/FP16
# arithmetic, AMX tiles (int8 and bf16 matrix units). ARM: asimddp (int8 dot product),
# i8mm (int8 matrix multiply), SVE/SVE2, bf16.
INT8_GEMM_FLAGS = (
    "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
    "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
    "asimd", "asimddp", "i8mm", "sve", "sve2", "bf16",
)

_MODEL_KEYS = ("model name", "cpu model", "hardware", "processor", "uarch")


def _parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """(model name, set of flags) of the first processor block of /proc/cpuinfo text."""
    model, flags = "", set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key in _MODEL_KEYS and not model and value and not value.isdigit():
            model = value
    return model, flags


def _usable_cpus() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> dict:
    """What this CPU offers for int8 work, from ``/proc/cpuinfo``.

    Returns ``{"model": name, "arch": machine, "cpus": usable logical CPUs,
    "flags": [the INT8_GEMM_FLAGS present, in that order], "source": path}``.
    Where the file cannot be read (macOS, Windows, a sandbox) ``source`` is None,
    ``flags`` is empty (unknown, not absent) and ``model`` comes from ``platform``.
    """
    arch = platform.machine() or "unknown"
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return {"model": platform.processor() or arch, "arch": arch, "cpus": _usable_cpus(), "flags": [],
                "source": None}
    model, present = _parse_cpuinfo(text)
    return {"model": model or platform.processor() or arch, "arch": arch, "cpus": _usable_cpus(),
            "flags": [f for f in INT8_GEMM_FLAGS if f in present], "source": str(cpuinfo)}


def describe_cpu(info: dict | None = None) -> str:
    """One line for logs: ``Intel(R) Xeon(R) Processor, 2 CPUs (x86_64: avx2 avx512f ... amx_int8)``."""
    info = cpu_flags() if info is None else info
    flags = " ".join(info["flags"]) if info["source"] else "flags unknown"
    cpus = f", {info['cpus']} CPUs" if info.get("cpus") else ""
    return f"{info['model']}{cpus} ({info['arch']}: {flags})"


# ---------------------------------------------------------------------------
# XLA workarounds (measurements: docs/performance.md, "Backend workarounds")
# ---------------------------------------------------------------------------

PLAIN_XLA_ENV = "INT_LM_PLAIN_XLA"
_plain_override: bool | None = None  # set by plain_xla()


@functools.lru_cache(maxsize=1)
def _plain_from_env() -> bool:
    """``INT_LM_PLAIN_XLA``, read once (1/true/yes/on: plain XLA; unset, empty, 0/false/no/off: workarounds)."""
    value = os.environ.get(PLAIN_XLA_ENV, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise UserError(f"{PLAIN_XLA_ENV}={value!r} is not understood: set it to 1 to turn the XLA workarounds "
                    f"off, or to 0 (or leave it unset) to keep them")


def workarounds_enabled() -> bool:
    """Whether the workarounds apply to what is traced now (the decision is made at trace time)."""
    plain = _plain_from_env() if _plain_override is None else _plain_override
    return not plain


def cpu_workarounds_enabled() -> bool:
    """Whether the CPU-only workarounds apply: workarounds enabled and JAX's default backend is the CPU."""
    return workarounds_enabled() and jax.default_backend() == "cpu"


@contextlib.contextmanager
def plain_xla(plain: bool = True):
    """Trace without (``plain=True``) or with (``plain=False``) the workarounds, whatever the environment says.

    The choice is read when a function is traced, and jitted functions keep what they
    were traced with; so when this changes the setting, JAX's caches are cleared on
    entering and on leaving (everything is traced again: for tests and measurements).
    """
    global _plain_override
    before, changes = _plain_override, workarounds_enabled() == bool(plain)
    _plain_override = bool(plain)
    if changes:
        jax.clear_caches()
    try:
        yield
    finally:
        _plain_override = before
        if changes:
            jax.clear_caches()


def never(tokens):
    """A predicate that is always false (token ids are >= 0) but that XLA cannot fold away at compile time."""
    return tokens[(0,) * tokens.ndim] < 0


def materialize(x):
    """Store an int8 activation once, on the CPU, instead of letting XLA re-derive it in every consumer.

    XLA's CPU fusion copies cheap element-wise producers into each consumer, and
    ``optimization_barrier`` is dropped by its CPU pipeline; a conditional's result is
    always stored, and this one always takes the identity branch (saturated int8
    activations are never -128). Elsewhere the identity (a GPU conditional syncs with
    the host). Measured: docs/performance.md.
    """
    if not cpu_workarounds_enabled():
        return x
    return lax.cond(x.reshape(-1)[0] != -128, lambda v: v, lambda v: -v, x)


def keep_int8_in_loop(factors, tokens):
    """Tie the low-rank factors to the time loop with a select on ``never(tokens)``, so they stay int8 there.

    Otherwise XLA hoists their loop-invariant int8 -> int32 converts out of the
    loop, which then streams 4x the bytes every token. The select never fires and
    fuses into the factors' consumers. Measured: docs/performance.md.
    """
    if factors is None or not workarounds_enabled():
        return factors
    skip = never(tokens)
    return jax.tree_util.tree_map(lambda v: jnp.where(skip, jnp.zeros_like(v), v), factors)


def draw_noise_fused(draw, tokens):
    """``draw()`` (the step's noise) inside a conditional whose other branch never runs, on the CPU.

    The noise feeds both the forward and the vote, and XLA's CPU fusion then splits
    each draw's table lookups into separate passes over memory; inside a conditional
    branch each draw stays one fused loop. Elsewhere a plain ``draw()``. Measured:
    docs/performance.md.
    """
    if not cpu_workarounds_enabled():
        return draw()
    shapes = jax.eval_shape(draw)
    return lax.cond(never(tokens), lambda: jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes),
                    draw)


# Where join_wf_wh_factors puts the joined B factors among the layer factors (lower case: it sorts after
# the matrix names, which keeps the order of the traced program as it was before the move to this module).
JOINED_WF_WH_B = "wf_wh_joined_b"


def join_wf_wh_factors(factors):
    """Join the Wf and Wh B factors of every layer on the rank axis, once, outside the time loop.

    Wf and Wh multiply the same input x, so one pass of row dots over the joined
    factors gives both ``x . B_Wf`` and ``x . B_Wh`` (:func:`wf_wh_dots`). ``factors``
    is the model's factor tree with per-layer tuples (``model.unstack_layers``).
    Measured: docs/performance.md.
    """
    if factors is None or not workarounds_enabled():
        return factors
    layers = factors.get("layers", {})
    if "Wf" not in layers or "Wh" not in layers:
        return factors
    joined = tuple(jnp.concatenate([bf, bh], axis=1) for bf, bh in zip(layers["Wf"][1], layers["Wh"][1]))
    return {**factors, "layers": {**layers, JOINED_WF_WH_B: joined}}


def wf_wh_dots(x, layer_factors, layer: int, row_dots):
    """``(x . B_Wf, x . B_Wh)`` of one layer from one ``row_dots`` pass over the joined factors.

    ``(None, None)`` when the factors were not joined: each matmul then takes its own row dots.
    """
    if layer_factors is None or JOINED_WF_WH_B not in layer_factors:
        return None, None
    both, rank = row_dots(x, layer_factors[JOINED_WF_WH_B][layer]), layer_factors["Wf"][1][layer].shape[1]
    return both[:, :rank], both[:, rank:]
