"""What the benchmark scripts share: config parsing, the EGGROLL spec, random tokens,
timing, peak memory, the machine's description, and the GEMM roofline.

Imported as ``import common`` by the scripts in this folder (run them as
``python benchmarks/NAME.py``: Python puts the script's folder first on the path).
Importing it puts this checkout first on the path, so a benchmark measures the
``int_lm`` beside it, whether or not (or wherever else) the package is installed.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path[:1]:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from int_lm import backend, config, eggroll, model  # noqa: E402


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

def parse_config(parser: argparse.ArgumentParser, argv, defaults: dict):
    """The built-in config <- the benchmark's ``defaults`` <- ``--config FILE`` <- ``--section.key value``.

    ``--config`` takes train.py's files (``configs/tinyshakespeare.toml``, or a name from
    ``configs/``), so a benchmark measures the settings a run uses. Returns (validated
    Config, the parser's own args with ``args.config``, the override values as given).
    """
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="a TOML config (train.py's; a path or a name from configs/) applied "
                             "over this benchmark's defaults, before --section.key overrides")
    try:
        values, rest = config.parse_overrides(sys.argv[1:] if argv is None else list(argv))
        args = parser.parse_args(rest)
        cfg = config.apply_values(config.Config(), defaults, "benchmark defaults")
        if args.config:
            cfg = config.load_file(args.config, cfg)
        cfg = config.validate(config.apply_values(cfg, values, "the command line"))
    except config.ConfigError as err:   # a bad key, value or file: one usage line, exit 2
        parser.error(str(err))
    return cfg, args, values


def make_spec(cfg) -> eggroll.EggrollSpec:
    """The EGGROLL spec of ``cfg``, refused (UserError) where int32 could overflow."""
    spec = eggroll.EggrollSpec.from_config(cfg)
    eggroll.check_limits(spec)
    return spec


def random_tokens(rng: np.random.Generator, vocab: int, rows: int, length: int, low: int = 1,
                  dtype=None) -> np.ndarray:
    """(rows, length) int32 token ids in [low, vocab): throughput does not depend on the text.

    ``low = 1`` keeps the boundary token 0 out (no state resets); ``dtype`` is the
    dtype NumPy draws in (int64 by default; each gives its own stream).
    """
    if dtype is None:
        return rng.integers(low, vocab, (rows, length)).astype(np.int32)
    return rng.integers(low, vocab, (rows, length), dtype=dtype).astype(np.int32)


# ---------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------

def timed(fn, *args, repeats: int):
    """(first-call seconds incl. compile, best steady-state seconds (the first call's
    when repeats is 0), last result)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    best = first if repeats == 0 else float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return first, best, out


def cpu_seconds() -> float:
    """User + system CPU time of this process (steadier than wall time on a shared machine)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def best_cpu_and_wall(fn, *args, repeats: int):
    """Best (CPU seconds, wall seconds) over ``repeats`` calls after a compiling call."""
    jax.block_until_ready(fn(*args))
    cpu = wall = float("inf")
    for _ in range(repeats):
        c0, w0 = cpu_seconds(), time.perf_counter()
        jax.block_until_ready(fn(*args))
        cpu, wall = min(cpu, cpu_seconds() - c0), min(wall, time.perf_counter() - w0)
    return cpu, wall


def alternate(calls: dict, repeats: int, best: dict, best_cpu: dict | None = None) -> dict:
    """``repeats`` rounds of every call in turn (a slow spell of the machine hits them all);
    lowers ``best[name]`` to each call's best wall seconds (and ``best_cpu[name]`` to its
    best CPU seconds of this process, if given)."""
    for _ in range(repeats):
        for name, (fn, fn_args) in calls.items():
            c0 = cpu_seconds()
            best[name] = min(best.get(name, float("inf")), timed(fn, *fn_args, repeats=0)[0])
            if best_cpu is not None:
                best_cpu[name] = min(best_cpu.get(name, float("inf")), cpu_seconds() - c0)
    return best


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def device_peak_mb():
    """Peak device memory of the first device (MB), where the backend reports it (GPU, TPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def machine() -> dict:
    """Backend, device, device count, CPU (model, flags) and XLA_FLAGS: what a figure ran on."""
    return {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
            "device_count": jax.device_count(), "cpu": backend.cpu_flags(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__}


# ---------------------------------------------------------------------------
# The GEMM roofline: XLA's dot rates at the model's shapes
# ---------------------------------------------------------------------------

def model_gemms(shape: model.ModelShape) -> list[tuple[str, int, int, int]]:
    """The weight matmuls of one token step per member row: (name, count, n (inner), out).

    Per layer: Wf, Uf, Wh, Uh (D x D), up (4D x D), down (D x 4D); then the head (V x D).
    The embedding is a row lookup (no multiply-adds).
    """
    d, v, layers = shape.width, shape.vocab_size, shape.layers
    return [("D x D (Wf Uf Wh Uh)", 4 * layers, d, d), ("up 4D x D", layers, d, 4 * d),
            ("down D x 4D", layers, 4 * d, d), ("head V x D", 1, d, v)]


def ops_per_token(shape: model.ModelShape, rank: int = 1) -> dict:
    """Operations per member per token, counting 2 per multiply-add of the weight matmuls.

    ``dense``: the matmuls inference and every member do (12 L D^2 + V D multiply-adds).
    ``lowrank``: EGGROLL's extra u.B and (u.B).A multiply-adds, r (n + out) per
    perturbed matrix plus r D for the embedding row; not counted in the rates below
    (element work: norms, saturation, log-softmax, noise, is not counted either).
    """
    dense = sum(count * n * out for _, count, n, out in model_gemms(shape))
    lowrank = sum(count * rank * (n + out) for _, count, n, out in model_gemms(shape)) + rank * shape.width
    return {"dense": 2 * dense, "lowrank": 2 * lowrank}


def int8_dot(x, w):
    """The model's dot (``intmath.dot_i32``): x (B, n) int8 . w (out, n)^T -> (B, out) int32."""
    return lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)


def f32_dot(x, w):
    return lax.dot_general(x, w, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST)


def dot_seconds(fn, rows: int, n: int, out: int, dtype, repeats: int, seed: int = 0) -> float:
    """Best wall seconds of one jitted ``fn(x (rows, n), w (out, n))`` call over ``repeats`` calls
    (after compiling); includes one dispatch (tens of microseconds on CPU)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.integers(-127, 128, (rows, n)).astype(np.int8)).astype(dtype)
    w = jnp.asarray(rng.integers(-127, 128, (out, n)).astype(np.int8)).astype(dtype)
    return timed(jax.jit(fn), x, w, repeats=max(repeats, 1))[1]


def gemm_roofline(shape: model.ModelShape, rows: int, repeats: int = 20) -> dict:
    """XLA's int8 x int8 -> int32 and float32 GEMM rates at the model's shapes, ``rows`` member rows.

    Per shape: GOP/s of each. ``mix``: the rate of one token step's matmuls in the
    model's proportions (time of ``count`` dots of each shape summed), which is the
    fastest the model's dense ops could run if nothing but the GEMMs took time.
    """
    shapes, secs = {}, {"int8": 0.0, "float32": 0.0}
    ops = 0
    for name, count, n, out in model_gemms(shape):
        op = 2 * rows * n * out
        t8 = dot_seconds(int8_dot, rows, n, out, jnp.int8, repeats)
        t32 = dot_seconds(f32_dot, rows, n, out, jnp.float32, repeats)
        shapes[name] = {"rows": rows, "n": n, "out": out, "count": count,
                        "int8_gops": op / t8 / 1e9, "float32_gflops": op / t32 / 1e9}
        secs["int8"] += count * t8
        secs["float32"] += count * t32
        ops += count * op
    return {"shapes": shapes, "mix_int8_gops": ops / secs["int8"] / 1e9,
            "mix_float32_gflops": ops / secs["float32"] / 1e9}
