#!/usr/bin/env python
"""One prepared check for a machine with an accelerator: bit-exactness, throughput, a short run.

    python benchmarks/gpu_check.py OUT_DIR --corpus PATH/tinyshakespeare.txt   # one GPU: < 8 minutes
    python benchmarks/gpu_check.py OUT_DIR --quick                             # the CPU, reduced sizes
    python benchmarks/gpu_check.py --write-golden                              # CPU: regenerate the digests

Writes OUT_DIR/gpu_check.json (everything, rewritten after every part) and
OUT_DIR/gpu_check.md (a short summary). The parts, in this order of priority:

1. **Digests** (bit-exactness across backends): SHA-256 of (a) the logits, integer
   log-likelihoods and final states of a 2 x 128 model over a fixed token block (and its
   seed-0 weights); (b) one full EGGROLL step at N = 256 (2 chunks of 128, the "sign"
   rule): the exact votes, scores, member states, updated weights and update statistics;
   (c) 5 training steps of configs/tiny.toml through ``trainer.train`` (es.optimizer =
   "sign" set explicitly; a corpus generated here, not the stdlib sources, whose text
   changes with the Python version): final weights, member states and the logged train
   losses. Compared with tests/golden/gpu_check.json, computed on the CPU; each item
   reads equal or different (with the parts that differ).
2. **Throughput**: ``benchmarks/throughput.py`` for the 6 x 256 model at N = 2^16,
   2^14 and 2^18 in chunks of 2^14, T = 100: inference and EGGROLL population-tokens/s,
   train_over_infer, device peak memory, compile time. Each N in its own process.
3. **Training**: ``train.py --config configs/paper_minipile_gpu.toml`` on ``--corpus``
   for 2 minutes from its start-up banner (then SIGTERM: it finishes the step and saves),
   then ``eval.py`` for the exact validation bits/byte at the end.
4. **Roofline** (if time is left): ``throughput.py --roofline`` at N = one chunk.

Every part runs in its own process with a timeout inside the total budget
(``--budget_s``, default 450 s): a part that fails, crashes or runs out of time is
recorded in the JSON and the check goes on with the next. The exit status is 0 when
every part ran and every digest is equal. ``--quick`` runs everything on the CPU at a
small size (the digests at full size: they are small) on a generated corpus; it is a
test in the default suite (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # puts this checkout's int_lm first on the path (imports jax; starts no backend)

ROOT = common.ROOT
HERE = Path(__file__).resolve().parent
GOLDEN = ROOT / "tests" / "golden" / "gpu_check.json"
REGENERATE = "python benchmarks/gpu_check.py --write-golden"
TARGET_TOKENS_PER_S = 20e6   # N = 2^16 on one H200 (issue 16)
TARGET_TRAIN_OVER_INFER = 0.90


# ---------------------------------------------------------------------------
# Fixed inputs (pure integer arithmetic: the same on every machine)
# ---------------------------------------------------------------------------

def token_block(rows: int, length: int, vocab: int = 256, salt: int = 0):
    """(rows, length) int32 tokens from a multiplicative hash of the position; about 1 in 256 is
    the boundary token 0 (so state resets are exercised)."""
    import numpy as np
    idx = np.arange(rows * length, dtype=np.uint64) + np.uint64(salt * 1_000_003)
    x = (idx * np.uint64(2654435761) + np.uint64(0x7F4A7C15)) % np.uint64(2**32)
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(2246822519)) % np.uint64(2**32)
    x ^= x >> np.uint64(13)
    return (x % np.uint64(vocab)).astype(np.int32).reshape(rows, length)


WORDS = ("the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on",
         "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they")


def write_corpus(root: Path, docs: int = 40, words: int = 400) -> Path:
    """A folder of ``docs`` plain-text documents of hashed word sequences (deterministic, ~2 KB each)."""
    root.mkdir(parents=True, exist_ok=True)
    for d in range(docs):
        ids = token_block(1, words, len(WORDS), salt=d + 1)[0]
        lines = [" ".join(WORDS[i] for i in ids[k:k + 12]) for k in range(0, words, 12)]
        (root / f"doc{d:03d}.txt").write_text(".\n".join(lines) + ".\n")
    return root


# ---------------------------------------------------------------------------
# Digests (run in a worker process, or in-process by the test and --write-golden)
# ---------------------------------------------------------------------------

def sha256_of(items) -> str:
    """SHA-256 over (name, dtype, shape, little-endian C-order bytes) of each (name, array), in order."""
    import numpy as np
    h = hashlib.sha256()
    for name, value in items:
        a = np.ascontiguousarray(np.asarray(value))
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def tree_items(tree, prefix: str = "") -> list:
    """(path, leaf) of a nested dict of arrays, paths sorted (independent of insertion order)."""
    if isinstance(tree, dict):
        return [item for key in sorted(tree) for item in tree_items(tree[key], f"{prefix}/{key}")]
    if isinstance(tree, (tuple, list)):
        return [item for i, v in enumerate(tree) for item in tree_items(v, f"{prefix}[{i}]")]
    return [(prefix, tree)]


def digest_forward() -> dict:
    """(a) A 2 x 128 model (seed-0 weights) over a fixed 4 x 128 token block: logits, log-likelihoods, states."""
    import jax
    import numpy as np

    from int_lm import model
    shape = model.ModelShape(256, 128, 2)
    params = model.init_params(shape, 0)
    block = token_block(4, 129)
    fwd = jax.jit(lambda p, s, x, y: model.forward(p, s, x, y, shape.boundary_token, return_logits=True))
    ll, states, logits = fwd(params, model.init_state(shape, 4), block[:, :-1], block[:, 1:])
    return {"init_weights": sha256_of(tree_items(params)), "logits": sha256_of([("logits", logits)]),
            "log_likelihood": sha256_of([("ll", ll)]), "states": sha256_of([("states", states)]),
            "ll_sum": int(np.asarray(ll, np.int64).sum())}


def step_config():
    """The (b) setting: 2 x 128, N = 256 in 2 chunks of 128, rank 1, sigma 2^-4, alpha 0.5, the sign rule."""
    from int_lm import config
    return config.validate(config.apply_values(config.Config(), {
        "model": {"layers": 2, "width": 128, "vocab_size": 256},
        "es": {"population": 256, "rank": 1, "sigma_shift": 4, "alpha": 0.5, "group_size": 2,
               "tokens_per_update": 16, "chunk_size": 128, "optimizer": "sign"},
    }, "gpu_check"))


def digest_step() -> dict:
    """(b) One full EGGROLL step (noise, perturbed forward, fitness, exact votes, update) at N = 256."""
    import jax
    import numpy as np

    from int_lm import eggroll
    from int_lm import model
    from int_lm import optim
    cfg = step_config()
    spec = eggroll.EggrollSpec.from_config(cfg)
    eggroll.check_limits(spec)
    shape = spec.shape
    params = model.init_params(shape, 0)
    tokens = token_block(spec.population // spec.group_size, cfg.es.tokens_per_update + 1, salt=7)
    votes_fn = jax.jit(lambda p, s, x, seed, epoch: eggroll.population_votes(spec, p, s, x, seed, epoch))
    votes, scores, states = votes_fn(params, model.init_state(shape, spec.population), tokens, np.uint32(7),
                                     np.uint32(3))
    rule = optim.make(cfg.es)
    hyper = {k: np.int32(v) for k, v in rule.schedule(0)[0].items()}
    new_params, _, stats = jax.jit(rule.update)(rule.init(params), params, votes, hyper)
    z = {"/".join(path): np.asarray(hi, np.int64) * (1 << eggroll.CARRY_BITS) + np.asarray(lo, np.int64)
         for path, (hi, lo) in votes.items()}  # the exact sum Z, whatever its carried representation
    return {"votes": sha256_of(tree_items(z)), "scores": sha256_of([("scores", scores)]),
            "states": sha256_of([("states", states)]), "weights": sha256_of(tree_items(new_params)),
            "update_stats": sha256_of(sorted((k, np.asarray(v, np.int64)) for k, v in stats.items())),
            "moved_matrix": int(stats["moved_matrix"])}


def digest_train(workdir: Path) -> dict:
    """(c) 5 steps of configs/tiny.toml via ``trainer.train`` on a generated corpus (sign rule)."""
    import numpy as np

    from int_lm import config
    from int_lm.trainer import train
    corpus = write_corpus(workdir / "corpus")
    cfg = config.validate(config.apply_values(config.load_file(ROOT / "configs" / "tiny.toml"), {
        "es": {"optimizer": "sign"},
        "data": {"source": str(corpus), "cache_dir": str(workdir / "cache")},
        "train": {"steps": 5, "run_dir": str(workdir / "run"), "progress": False},
    }, "gpu_check"))
    summary = train(cfg, log=lambda *a, **k: None)
    state = summary["state"]
    keys = ("train/bits_per_byte_mean", "train/bits_per_byte_min", "train/bits_per_byte_max")
    losses = [[h["step"]] + [repr(float(h[k])) for k in keys] for h in summary["history"]]
    return {"weights": sha256_of(tree_items(state.params)), "member_states": sha256_of([("states", state.states)]),
            "train_losses": hashlib.sha256(json.dumps(losses).encode()).hexdigest(),
            "last_train_bits_per_byte": float(summary["history"][-1][keys[0]])}


# Values kept beside the digests for a reader; only the digests are compared.
INFORMATIVE = ("ll_sum", "moved_matrix", "last_train_bits_per_byte")


def compute_digests(workdir: Path) -> dict:
    out, seconds = {}, {}
    for name, fn in (("a_forward", digest_forward), ("b_step", digest_step),
                     ("c_train", lambda: digest_train(workdir))):
        t0 = time.perf_counter()
        out[name] = fn()
        seconds[name] = time.perf_counter() - t0
    return {"digests": out, "seconds": seconds}


def compare(digests: dict, golden: dict | None) -> dict:
    """Per item: equal / different (naming the parts) / no golden."""
    items = {}
    for name, got in digests.items():
        want = (golden or {}).get(name)
        parts = {k: v for k, v in got.items() if k not in INFORMATIVE}
        if want is None:
            items[name] = {"status": "no golden", "digests": got}
            continue
        differ = sorted(k for k in parts if want.get(k) != parts[k])
        items[name] = {"status": "different" if differ else "equal", "differs": differ, "digests": got,
                       **({"golden": want} if differ else {})}
    return items


def load_golden() -> dict | None:
    try:
        return json.loads(GOLDEN.read_text())["digests"]
    except (OSError, ValueError, KeyError):
        return None


def write_golden() -> dict:
    """Compute the digests on the CPU and write tests/golden/gpu_check.json."""
    import jax
    jax.config.update("jax_platforms", "cpu")
    import numpy as np

    from int_lm import backend
    if jax.default_backend() != "cpu":
        raise SystemExit("the golden digests are computed on the CPU (JAX_PLATFORMS=cpu)")
    with tempfile.TemporaryDirectory(prefix="int_lm_golden_") as tmp:
        result = compute_digests(Path(tmp))
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps({
        "about": "SHA-256 digests of today's integer semantics, computed on the CPU; benchmarks/gpu_check.py "
                 "compares every backend with them and tests/test_gpu_check.py recomputes them. After a deliberate "
                 f"change to the integer semantics regenerate with: {REGENERATE}",
        "generated_with": {"jax": jax.__version__, "numpy": np.__version__, "python": sys.version.split()[0],
                           "cpu": backend.cpu_flags()["model"]},
        "digests": result["digests"],
    }, indent=1) + "\n")
    return result


# ---------------------------------------------------------------------------
# The orchestrator: every part in its own process, within the time budget
# ---------------------------------------------------------------------------

class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.monotonic(), seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def timeout(self, cap: float, reserve: float = 0.0) -> float:
        return max(0.0, min(cap, self.left() - reserve))


def tail(text: str, lines: int = 15) -> str:
    return "\n".join((text or "").strip().splitlines()[-lines:])


def run_json(cmd: list[str], env: dict, timeout: float) -> dict:
    """Run ``cmd``; its last stdout line is one JSON object. Failures come back as {"ok": False, ...}."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as err:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s",
                "stderr_tail": tail(err.stderr.decode() if isinstance(err.stderr, bytes) else err.stderr)}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"ok": False, "error": f"exit status {proc.returncode}", "wall_s": wall,
                "stderr_tail": tail(proc.stderr)}
    try:
        return {"ok": True, "wall_s": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}
    except (ValueError, IndexError):
        return {"ok": False, "error": "no JSON on stdout", "wall_s": wall, "stdout_tail": tail(proc.stdout),
                "stderr_tail": tail(proc.stderr)}


def throughput_part(sizes: dict, population: int, env: dict, timeout: float, roofline: bool = False) -> dict:
    chunk = min(sizes["chunk"], population)
    cmd = [sys.executable, str(HERE / "throughput.py"), "--json", "--model.layers", str(sizes["layers"]),
           "--model.width", str(sizes["width"]), "--es.population", str(population), "--es.chunk_size", str(chunk),
           "--es.tokens_per_update", str(sizes["tokens"]), "--repeats", str(sizes["repeats"])]
    if roofline:
        cmd.append("--roofline")
    r = run_json(cmd, env, timeout)
    if not r["ok"]:
        return r
    keep = ("population", "chunk_size", "tokens_per_update", "infer_tokens_per_s", "infer_one_batch_tokens_per_s",
            "train_tokens_per_s", "train_over_infer", "step_s", "split_s", "compile_s", "device_peak_mb",
            "peak_rss_mb", "device", "backend", "wall_s", "cpu_s", "train_over_infer_cpu", "roofline", "breakdown_s")
    return {"ok": True, **{k: r[k] for k in keep if k in r}}


def training_part(args, sizes: dict, corpus: str, env: dict, budget: Budget, workdir: Path) -> dict:
    """train.py on the corpus for ``train_s`` seconds after its set-up (metadata.json written or the
    start-up banner printed, whichever comes first), then SIGTERM (it finishes the step and saves), then eval.py."""
    run_dir = workdir / "train_run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "paper_minipile_gpu.toml"),
           "--data.source", corpus, "--data.cache_dir", str(workdir / "cache"), "--train.run_dir", str(run_dir),
           "--train.steps", "1000000", "--train.progress", "false", "--train.checkpoint_every", "0",
           *sizes["train_overrides"]]
    log_path = workdir / "train.log"
    deadline = time.monotonic() + budget.timeout(sizes["train_s"] + 240, reserve=60)
    t0 = time.monotonic()
    setup_at = banner_at = interrupted_at = None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT,
                                cwd=ROOT)
        while proc.poll() is None:
            now = time.monotonic()
            if banner_at is None and "int_lm: EGGROLL training" in log_path.read_text(errors="replace"):
                banner_at = now  # printed just before the loop installs its stop-signal handlers
            if setup_at is None and (banner_at is not None or (run_dir / "metadata.json").exists()):
                setup_at = now
            # SIGTERM once the loop runs (banner seen; 30 s grace should its wording change). Not
            # SIGINT: a check started in the background (`... &` from a script) has SIGINT ignored,
            # and the trainer keeps an ignored signal ignored.
            if (interrupted_at is None and setup_at is not None and now - setup_at >= sizes["train_s"]
                    and (banner_at is not None or now - setup_at >= sizes["train_s"] + 30)):
                proc.send_signal(signal.SIGTERM)  # the trainer finishes this step, saves, writes history
                interrupted_at = now
            if now > deadline:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.2)
    wall = time.monotonic() - t0
    # A run stopped by our SIGTERM saves and then exits 0 or, by the shell's convention, 128 + SIGTERM.
    stopped = interrupted_at is not None and proc.returncode == 128 + signal.SIGTERM
    finished = (proc.returncode == 0 or stopped) and (run_dir / "history.jsonl").exists()
    out = {"ok": finished, "returncode": proc.returncode, "wall_s": wall,
           "train_s": (interrupted_at - setup_at) if interrupted_at and setup_at else None,
           "startup_s": (setup_at - t0) if setup_at else None, "command": " ".join(cmd[1:])}
    log_text = log_path.read_text(errors="replace")
    if not finished:
        out["error"] = ("killed at the time budget" if proc.returncode < 0 else
                        f"exit status {proc.returncode}" + ("" if proc.returncode else ", no history.jsonl"))
        out["log_tail"] = tail(log_text)
        return out
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines() if line.strip()]
    rates = sorted(h["perf/population_tokens_per_s"] for h in history[1:])
    vals = [h for h in history if "val/bits_per_byte" in h]
    out.update({
        "steps": history[-1]["step"] if history else 0,
        "train_bits_per_byte_last": history[-1]["train/bits_per_byte_mean"] if history else None,
        "population_tokens_per_s_median": rates[len(rates) // 2] if rates else None,
        "val_bits_per_byte_logged": [[h["step"], h["val/bits_per_byte"]] for h in vals],
        "baselines": {k.split("/")[-1]: v for k, v in (vals[-1] if vals else {}).items()
                      if k.startswith("val/baseline_")},
    })
    ev = run_json([sys.executable, str(ROOT / "eval.py"), str(run_dir), "--json", "--no_tb", "--no_progress"], env,
                  budget.timeout(240, reserve=10))
    if ev["ok"]:
        out["eval"] = {k: ev.get(k) for k in ("step", "split", "bits_per_byte", "bits_per_token", "tokens", "bytes",
                                              "baselines", "wall_s")}
        out["val_bits_per_byte"] = ev.get("bits_per_byte")
    else:
        out.update(ok=False, error="eval.py failed", eval=ev)
    return out


QUICK = {"layers": 1, "width": 32, "chunk": 256, "tokens": 8, "repeats": 1, "populations": [64, 128, 256],
         "train_s": 4.0, "budget_s": 600.0,
         "train_overrides": ["--model.layers", "1", "--model.width", "32", "--es.population", "64",
                             "--es.chunk_size", "32", "--es.tokens_per_update", "16", "--data.val_tokens", "2048",
                             "--train.eval_every", "0"]}
FULL = {"layers": 6, "width": 256, "chunk": 2**14, "tokens": 100, "repeats": 2, "populations": [2**14, 2**16, 2**18],
        "train_s": 120.0, "budget_s": 450.0, "train_overrides": []}


def sizes_for(args) -> dict:
    """The full sizes, or the quick ones, with whatever the command line set explicitly."""
    sizes = dict(QUICK if args.quick else FULL)
    sizes.update({k: getattr(args, k) for k in FULL if getattr(args, k, None) is not None})
    sizes["labels"] = [f"N=2^{p.bit_length() - 1}" if p >= 1024 and p & (p - 1) == 0 else f"N={p}"
                       for p in sizes["populations"]]
    return sizes


def summary_markdown(result: dict) -> str:
    m = result.get("machine", {})
    lines = [f"# gpu_check ({result['mode']}), {result['started']}", "",
             f"- device: {m.get('device', '?')} x{m.get('device_count', '?')} ({m.get('backend', '?')}), "
             f"jax {m.get('jax', '?')}; CPU: {m.get('cpu_line', '?')}",
             f"- wall time {result.get('wall_s', 0):.0f} s of a {result['budget_s']:.0f} s budget; "
             f"exit status {result.get('exit_status', '?')}", ""]
    dig = result.get("digests", {})
    lines += ["## Digests against the CPU's (tests/golden/gpu_check.json)", "", "| item | status | differs |",
              "|---|---|---|"]
    for name, item in dig.get("items", {}).items():
        lines.append(f"| {name} | {item['status']} | {', '.join(item.get('differs', [])) or '-'} |")
    if not dig.get("items"):
        lines.append(f"| - | not run: {dig.get('error', 'not in --parts')} | |")
    lines += ["", "## Throughput (population-tokens/s)", "",
              "| N | chunk | inference | EGGROLL | train/infer | step s | compile s (infer / step) | device peak MB |",
              "|---|---|---|---|---|---|---|---|"]
    for label, r in result.get("throughput", {}).items():
        if not r.get("ok"):
            lines.append(f"| {label} | failed: {r.get('error', '?')} | | | | | | |")
            continue
        peak = f"{r['device_peak_mb']:,.0f}" if r.get("device_peak_mb") else "-"
        lines.append(f"| {label} | {r['chunk_size']} | {r['infer_tokens_per_s']:,.0f} | {r['train_tokens_per_s']:,.0f}"
                     f" | {r['train_over_infer']:.3f} | {r['step_s']:.3f} | {r['compile_s']['infer']:.1f} / "
                     f"{r['compile_s']['train_step']:.1f} | {peak} |")
    tr = result.get("training", {})
    lines += ["", "## Training run", ""]
    if tr.get("ok"):
        base = {k: v for k, v in (tr.get("eval", {}).get("baselines") or tr.get("baselines") or {}).items()
                if isinstance(v, (int, float))}
        rate = tr.get("population_tokens_per_s_median")
        lines.append(f"{tr['steps']} steps in {tr['train_s'] or 0:.0f} s after set-up ({tr['startup_s'] or 0:.0f} s), "
                     f"median {f'{rate:,.0f}' if rate else '-'} population-tokens/s; validation bits/byte at the "
                     f"end **{tr['val_bits_per_byte']:.4f}** "
                     f"(baselines: {', '.join(f'{k} {v:.3f}' for k, v in base.items()) or '-'})")
    else:
        lines.append(f"failed or not run: {tr.get('error', 'not in --parts')}")
    rl = result.get("roofline", {})
    if rl.get("ok") and "roofline" in rl:
        r = rl["roofline"]
        lines += ["", "## Roofline", "",
                  f"int8 dot mix {r['mix_int8_gops']:,.0f} GOP/s, float32 {r['mix_float32_gflops']:,.0f} GFLOP/s; "
                  f"inference {r['infer_of_int8']:.3f} of int8, training {r['train_of_int8']:.3f} of int8"]
    t = result.get("targets", {})
    lines += ["", "## Targets", "", *(f"- {k}: {v}" for k, v in t.items())]
    if result.get("errors"):
        lines += ["", "## Errors", "", *(f"- {e}" for e in result["errors"])]
    return "\n".join(lines) + "\n"


def targets(result: dict) -> dict:
    items = result.get("digests", {}).get("items", {})
    t = {"digests equal to the CPU's": bool(items) and all(i["status"] == "equal" for i in items.values())}
    r = result.get("throughput", {}).get("N=2^16", {})
    if r.get("ok"):
        t[f"N=2^16 >= {TARGET_TOKENS_PER_S / 1e6:.0f}M population-tokens/s"] = (
            f"{r['train_tokens_per_s'] >= TARGET_TOKENS_PER_S} ({r['train_tokens_per_s'] / 1e6:.2f}M)")
        t[f"N=2^16 train_over_infer >= {TARGET_TRAIN_OVER_INFER}"] = (
            f"{r['train_over_infer'] >= TARGET_TRAIN_OVER_INFER} ({r['train_over_infer']:.3f})")
    return t


def orchestrate(args) -> int:
    from int_lm import backend
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)
    env = dict(os.environ)
    if args.quick:
        env["JAX_PLATFORMS"] = "cpu"
    sizes = sizes_for(args)
    result: dict = {"check": "gpu_check", "mode": "quick" if args.quick else "full",
                    "started": datetime.datetime.now().isoformat(timespec="seconds"), "budget_s": args.budget_s,
                    "command": " ".join(sys.argv), "machine": {"cpu": backend.cpu_flags(),
                                                               "cpu_line": backend.describe_cpu()},
                    "errors": []}

    def save():
        result["wall_s"] = time.monotonic() - budget.start
        result["targets"] = targets(result)
        (out_dir / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
        (out_dir / "gpu_check.md").write_text(summary_markdown(result))

    def note(part: str, r: dict):
        if not r.get("ok"):
            result["errors"].append(f"{part}: {r.get('error', 'failed')}")
        print(f"[gpu_check {budget.seconds - budget.left():5.0f} s] {part}: "
              f"{'ok' if r.get('ok') else 'FAILED ' + str(r.get('error'))}", flush=True)
        save()

    def skip(need: float):
        return {"ok": False, "error": f"skipped: {budget.left():.0f} s of the budget left"} \
            if budget.left() < need else None

    def digests_part(workdir: Path) -> dict:
        r = skip(60) or run_json([sys.executable, __file__, "--worker", "digests", "--workdir",
                                  str(workdir / "digests")], env, budget.timeout(240, reserve=30))
        if not r.get("ok"):
            return r
        result["machine"].update(r["machine"])  # what the JAX of the parts runs on
        items = compare(r["digests"], load_golden())
        different = [k for k, v in items.items() if v["status"] != "equal"]
        return {"ok": not different, "items": items, "seconds": r["seconds"], "wall_s": r["wall_s"],
                **({"error": f"{', '.join(different)} not equal to the CPU's"} if different else {})}

    with tempfile.TemporaryDirectory(prefix="int_lm_gpu_check_") as tmp:
        workdir = Path(tmp)
        corpus = args.corpus
        if corpus is None and args.quick:  # one generated text file stands in for tinyshakespeare
            docs = write_corpus(workdir / "quick_corpus", docs=60)
            corpus = str(workdir / "quick_corpus.txt")
            Path(corpus).write_text("\n".join(p.read_text() for p in sorted(docs.glob("*.txt"))))
        # In order of priority: digests, the target size, the training run, the other sizes, the roofline.
        sized = list(zip(sizes["labels"], sizes["populations"]))
        first = sized[1] if len(sized) > 1 else sized[0]
        plan = [("digests", None), ("throughput", first), ("training", None)]
        plan += [("throughput", item) for item in sized if item != first] + [("roofline", None)]
        for kind, item in plan:
            if kind not in args.parts:
                continue
            name = f"throughput {item[0]}" if kind == "throughput" else kind
            try:
                if kind == "digests":
                    r = digests_part(workdir)
                elif kind == "throughput":
                    r = skip(30 if args.quick else 60) or throughput_part(
                        sizes, item[1], env, budget.timeout(args.part_timeout_s, reserve=20))
                elif kind == "training":
                    r = ({"ok": False, "error": "skipped: no --corpus given"} if corpus is None else
                         skip(sizes["train_s"] + 30) or training_part(args, sizes, corpus, env, budget, workdir))
                else:
                    r = skip(30 if args.quick else 90) or throughput_part(
                        sizes, sizes["chunk"], env, budget.timeout(args.part_timeout_s, reserve=5), roofline=True)
            except Exception as err:  # noqa: BLE001 (recorded; the check goes on with the next part)
                r = {"ok": False, "error": f"{type(err).__name__}: {err}"}
            if kind == "throughput":
                result.setdefault("throughput", {})[item[0]] = r
            else:
                result[kind] = r
            note(name, r)
    ok = not result["errors"]
    result["exit_status"] = 0 if ok else 1
    save()
    print(f"wrote {out_dir / 'gpu_check.json'} and {out_dir / 'gpu_check.md'}")
    print(summary_markdown(result))
    return result["exit_status"]


def worker(args) -> None:
    if args.worker == "digests":
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        result = compute_digests(workdir)
        print(json.dumps({**result, "machine": common.machine()}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", help="where gpu_check.json and gpu_check.md go")
    parser.add_argument("--corpus", default=None, help="a local text file for the training run (tinyshakespeare)")
    parser.add_argument("--quick", action="store_true",
                        help="on the CPU at a small size (a generated corpus; the digests at full size)")
    parser.add_argument("--write-golden", action="store_true", help=f"write {GOLDEN.relative_to(ROOT)} (CPU)")
    parser.add_argument("--budget_s", type=float, default=None, help="total time budget in s (450; quick 600)")
    parser.add_argument("--part_timeout_s", type=float, default=240, help="cap on one throughput part")
    g = parser.add_argument_group("sizes (defaults: the full check's; --quick has its own; set any to scale down)")
    g.add_argument("--layers", type=int, default=None, help="model layers of the throughput parts (6)")
    g.add_argument("--width", type=int, default=None, help="model width of the throughput parts (256)")
    g.add_argument("--populations", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="comma-separated (2^14,2^16,2^18); the second is the target size and runs first")
    g.add_argument("--chunk", type=int, default=None, help="es.chunk_size of the throughput parts (2^14)")
    g.add_argument("--tokens", type=int, default=None, help="tokens per member per step (100)")
    g.add_argument("--repeats", type=int, default=None, help="timed rounds per throughput part (2)")
    g.add_argument("--train_s", type=float, default=None, help="training seconds after set-up (120)")
    g.add_argument("--train_overrides", type=shlex.split, default=None,
                   help='one string of --section.key value pairs for train.py: --train_overrides="--model.layers 1"')
    parser.add_argument("--parts", default="digests,throughput,training,roofline",
                        help="comma-separated parts to run (default: all)")
    parser.add_argument("--no_roofline", dest="roofline", action="store_false", help="skip the roofline part")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.write_golden:
        result = write_golden()
        print(f"wrote {GOLDEN} ({', '.join(f'{k} {v:.1f} s' for k, v in result['seconds'].items())})")
        return 0
    if not args.out_dir:
        parser.error("give OUT_DIR (or --write-golden)")
    if args.budget_s is None:
        args.budget_s = (QUICK if args.quick else FULL)["budget_s"]
    if args.quick:
        args.roofline = False
    args.parts = set(args.parts.split(","))
    if not args.roofline:
        args.parts.discard("roofline")
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
