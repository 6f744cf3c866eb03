"""The training loop: data -> EGGROLL step -> metrics, validation, checkpoints.

Read top to bottom: :func:`train` sets up (tokenizer, corpus, baselines,
model, population state, run directory), then loops over steps. Each step
draws one batch of rows (one row per group of members), runs the population
and votes (``eggroll.population_votes``), applies the integer update
(``optim``: the rule ``es.optimizer`` names), and logs. Ctrl-C finishes the current step and
stops cleanly.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from int_lm import __version__
from int_lm import checkpoint as CK
from int_lm import config as C
from int_lm import data as D
from int_lm import distributed as DIST
from int_lm import eggroll as E
from int_lm import intmath
from int_lm import model as M
from int_lm import optim, train_state
from int_lm.errors import UserError
from int_lm.logging import NullTracker, TensorBoardTracker


def resolve_model_config(cfg: C.Config, tokenizer) -> C.Config:
    """The vocabulary size and boundary token come from the tokenizer."""
    model = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size,
                                boundary_token=tokenizer.boundary_token)
    return C.validate(dataclasses.replace(cfg, model=model))


def package_versions() -> dict[str, str]:
    import importlib.metadata as md
    out = {"python": platform.python_version(), "int_lm": __version__}
    for name in ("jax", "jaxlib", "numpy", "datasets", "tiktoken", "orbax-checkpoint", "tensorboard"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def run_metadata(cfg: C.Config, tokenizer, corpus, shape: M.ModelShape) -> dict[str, Any]:
    return {
        "config": C.to_dict(cfg),
        "tokenizer": tokenizer.identity(),
        "corpus": corpus.describe(),
        "versions": package_versions(),
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "device_count": jax.device_count(),
        "param_count": M.param_count(shape),
    }


@contextmanager
def stop_on_interrupt():
    """Ctrl-C sets a flag the loop checks after each step; a second Ctrl-C aborts at once."""
    flag = {"stop": False}

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True
        print("\nstopping after this step (Ctrl-C again to abort now)", file=sys.stderr, flush=True)

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: no handler
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def make_validator(shape: M.ModelShape, block: np.ndarray, num_bytes: int):
    """Bits per byte of the unperturbed model on a fixed validation block (state carried).

    Reported exactly (float64 on the host from the integer logits), since the
    integer loss reads up to ~0.13 bit per token optimistic.
    """
    inputs, targets = jnp.asarray(block[:, :-1]), jnp.asarray(block[:, 1:])
    state0 = M.init_state(shape, block.shape[0])

    @jax.jit
    def logits_of(params):
        _, _, logits = M.forward(params, state0, inputs, targets, shape.boundary_token, return_logits=True)
        return logits

    def validate(params) -> float:
        bits = intmath.bits_per_token_f64(np.asarray(logits_of(params)), block[:, 1:])
        return float(bits.sum()) / num_bytes

    return validate


def summary_lines(title: str, items: dict[str, Any]) -> str:
    width = max(len(k) for k in items)
    return "\n".join([title] + [f"  {k:<{width}}  {v}" for k, v in items.items()])


def train(cfg: C.Config, *, tracker=None, progress: bool | None = None, log=print,
          overrides: dict | None = None) -> dict[str, Any]:
    """Train per ``cfg``; returns a summary dict (final metrics, paths, timings).

    If ``cfg.train.run_dir`` has checkpoints the run resumes (``checkpoint.plan_resume``):
    the saved config wins; ``overrides`` are the keys the user set explicitly
    (None: every key of ``cfg``).
    """
    DIST.initialize(cfg.dist)      # joins a multi-process run if dist.* / JAX_* / SLURM say so
    main = DIST.is_main()          # process 0 logs and writes the run's files
    if not main:
        log = lambda *a, **k: None  # noqa: E731
    plan = CK.plan_resume(cfg, overrides)
    if plan is not None:
        cfg = dataclasses.replace(plan.config, dist=cfg.dist)  # this launch's processes, not the saved ones
    progress = (cfg.train.progress if progress is None else progress) and main
    tokenizer = D.make_tokenizer(cfg.data)
    cfg = resolve_model_config(cfg, tokenizer)
    corpus = D.load_corpus(cfg.data, tokenizer, progress=progress)
    shape = M.ModelShape.from_config(cfg.model)
    spec = E.EggrollSpec.from_config(cfg)
    E.check_limits(spec)
    es, tc = cfg.es, cfg.train

    run_dir = Path(tc.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if main:
            (run_dir / "config.toml").write_text(C.to_toml(cfg))
    except OSError as err:
        raise UserError(f"cannot write the run directory {run_dir} ({err.strerror}); "
                        f"choose a writable --train.run_dir") from None
    meta = run_metadata(cfg, tokenizer, corpus, shape)
    if main:
        (run_dir / "metadata.json").write_text(json.dumps(meta, indent=2))
    tracker = tracker if tracker is not None else TensorBoardTracker(run_dir / "tb") if main else NullTracker()

    ref = D.baselines(corpus, tokenizer)
    val_ref = {"unigram": ref["unigram"]["validation"], "bigram": ref["bigram"]["validation"]}
    if "compress" in ref:
        val_ref["compressor"] = ref["compress"]["validation"]["best"]

    # --- state -------------------------------------------------------------
    rows = es.population // es.group_size
    layout = DIST.Layout.create(spec)  # the population over every device; trivial on one device
    rule = optim.make(es)
    state = train_state.init(shape, es.population, rule, tc.seed)
    stream = D.BatchStream(corpus.split("train"), rows, es.tokens_per_update, tc.seed, row_range=layout.row_range)
    if plan is not None:
        r = DIST.resume(plan, run_dir, tokenizer, corpus, log=log)
        state = train_state.from_restored(r, rule)
        stream = D.BatchStream(corpus.split("train"), rows, es.tokens_per_update, tc.seed, cursor=r.cursor,
                               row_range=layout.row_range)
        CK.mark_tensorboard_restart(tracker, r.step)
    state = layout.place(state)
    ckpt = DIST.checkpointer(run_dir, tc.keep_checkpoints, resume_step=plan and plan.step, log=log)
    token_bytes = tokenizer.token_bytes()

    val_split = corpus.split("validation")
    val_rows = max(1, min(16, cfg.data.val_tokens // 256))
    val_len = max(1, min(cfg.data.val_tokens // val_rows, (len(val_split) - 1) // val_rows))
    validate = make_validator(shape, D.eval_slice(val_split, val_rows, val_len),
                              D.eval_slice_bytes(val_split, val_rows, val_len))

    votes_fn = layout.votes_fn()   # jit of E.population_votes; shard_map'd over the mesh if several devices
    update_fn = jax.jit(rule.update, donate_argnums=(0, 1))

    log(summary_lines("int_lm: EGGROLL training", {
        "model": f"{shape.layers} layers x {shape.width} wide, V={shape.vocab_size} "
                 f"({M.param_count(shape):,} int8 parameters)",
        "population": f"{es.population} ({es.population // 2} antithetic pairs, group size {es.group_size}, "
                      f"rank {es.rank}, sigma 2^-{es.sigma_shift})",
        "tokens per step": f"{es.population * es.tokens_per_update:,} ({es.tokens_per_update} per member)",
        "data": f"{cfg.data.source} / {tokenizer.name}: {len(corpus.split('train')):,} train tokens",
        "baselines (val bits/byte)": ", ".join(f"{k} {v:.3f}" for k, v in val_ref.items()),
        "device": f"{meta['device']} x{jax.device_count()}" + (f" ({layout.describe()})" if layout.mesh else ""),
        "run dir": str(run_dir),
    }))

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=tc.steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True)

    history: list[dict[str, float]] = ckpt.history_until(state.step) if plan is not None else []
    val_bpb = float("nan")
    t_start = time.perf_counter()
    compile_s = None
    with ckpt, stop_on_interrupt() as interrupt:
        while state.step < tc.steps and not layout.agree_stop(interrupt["stop"]):
            step = state.step
            tokens_np = stream.next()
            hyper, logged_hyper = rule.schedule(step)
            epoch = step // es.noise_reuse

            t0 = time.perf_counter()
            votes, scores, states = votes_fn(state.params, state.states, layout.put_tokens(tokens_np),
                                             np.uint32(tc.seed), np.uint32(epoch))
            scores = np.asarray(scores)
            t1 = time.perf_counter()
            params, opt_state, stats = update_fn(state.opt_state, state.params, votes,
                                                 {k: np.int32(v) for k, v in hyper.items()})
            stats = jax.tree_util.tree_map(int, stats)
            t2 = time.perf_counter()
            if compile_s is None:
                compile_s = t2 - t0
            state = dataclasses.replace(state, params=params, states=states, opt_state=opt_state, step=step + 1,
                                        cursor=stream.cursor())
            tokens_np = layout.all_rows(tokens_np)   # every process's rows, for the metrics

            member_bytes = token_bytes[tokens_np[:, 1:]].sum(axis=1).repeat(es.group_size)
            bpb = -scores / 16.0 / np.maximum(member_bytes, 1)
            metrics = {
                "train/bits_per_byte_mean": float(bpb.mean()),
                "train/bits_per_byte_min": float(bpb.min()),
                "train/bits_per_byte_max": float(bpb.max()),
                "update/moved_matrix_fraction": stats["moved_matrix"] / stats["count_matrix"],
                "update/moved_vector_fraction": stats["moved_vector"] / stats["count_vector"],
                "update/saturated_fraction": stats["saturated"] / (stats["count_matrix"] + stats["count_vector"]),
                **{f"update/{k}": v for k, v in logged_hyper.items()},
                "perf/population_tokens_per_s": es.population * es.tokens_per_update / (t2 - t0),
                "perf/forward_s": t1 - t0,
                "perf/update_s": t2 - t1,
            }
            if tc.eval_every and (state.step % tc.eval_every == 0 or state.step == tc.steps):
                val_bpb = validate(layout.local(state.params))
                metrics["val/bits_per_byte"] = val_bpb
                for k, v in val_ref.items():
                    metrics[f"val/baseline_{k}"] = v
                for path in (("embed",), ("layers", "Wf"), ("head",)):
                    leaf = state.params[path[0]] if len(path) == 1 else state.params[path[0]][path[1]]
                    tracker.histogram(state.step, "weights/" + "/".join(path), np.asarray(leaf))
            tracker.scalars(state.step, metrics)
            history.append({"step": state.step, "time_s": time.perf_counter() - t_start, **metrics})
            if tc.checkpoint_every and state.step % tc.checkpoint_every == 0:
                ckpt.save(layout.host_state(state), meta, history)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(train=f"{metrics['train/bits_per_byte_mean']:.3f}",
                                val="-" if np.isnan(val_bpb) else f"{val_bpb:.3f}", tok_s=f"{metrics['perf/population_tokens_per_s']:,.0f}")
        ckpt.save_final(layout.host_state(state), meta, history)  # at the end and after Ctrl-C
    if bar is not None:
        bar.close()
    tracker.flush()
    elapsed = time.perf_counter() - t_start
    last = history[-1] if history else {}
    summary = {
        "steps": state.step,
        "interrupted": state.step < tc.steps,
        "wall_s": elapsed,
        "first_step_s": compile_s,
        "train_bits_per_byte": last.get("train/bits_per_byte_mean"),
        "val_bits_per_byte": val_bpb,
        "baselines": val_ref,
        "population_tokens_per_s": float(np.median([h["perf/population_tokens_per_s"] for h in history[1:]]))
        if len(history) > 1 else None,
        "run_dir": str(run_dir),
    }
    if main:
        (run_dir / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    log(summary_lines("int_lm: done" + (" (interrupted)" if summary["interrupted"] else ""), {
        "steps": summary["steps"],
        "wall clock": f"{elapsed:.1f} s",
        "train bits/byte": f"{summary['train_bits_per_byte']:.4f}" if history else "-",
        "val bits/byte": f"{val_bpb:.4f}",
        "throughput": f"{summary['population_tokens_per_s'] or 0:,.0f} population-tokens/s",
        "run dir": str(run_dir),
    }))
    summary["state"] = state
    summary["history"] = history
    return summary
