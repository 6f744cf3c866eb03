"""The training loop: data -> EGGROLL step -> metrics, validation, checkpoints.

:func:`build_run` sets up once (tokenizer, corpus, baselines, model, population
state, run directory, resume) and returns a :class:`Run`; :func:`run_step` does
one step: the next batch (one row per group of members), the population's votes
(``eggroll.population_votes``) and the update rule's move (``optim``, the rule
``es.optimizer`` names); :func:`train` is the loop, readable in one screen;
:class:`RunRecord` keeps the run's record (``history.jsonl`` appended and flushed
every step, tracker scalars, progress bar, summary).

Stopping: SIGINT (Ctrl-C), SIGTERM, SIGHUP and SIGUSR1 finish the current step,
save it and stop (:mod:`int_lm.stopping`); an exception in the loop first saves
the state after the last completed step (:func:`save_after_error`). Output that
cannot be written (a broken pipe, a full disk under ``tb/``) never stops a run
(:class:`int_lm.logging.TolerantTracker`, :func:`int_lm.cli.tolerant_output`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from int_lm import __version__, backend, checkpoint, data, eggroll, intmath, optim, stopping, train_state
from int_lm import config
from int_lm import distributed
from int_lm import generate
from int_lm import model
from int_lm.logging import NullTracker, TensorBoardTracker, TolerantTracker


def resolve_model_config(cfg: config.Config, tokenizer) -> config.Config:
    """The vocabulary size and boundary token come from the tokenizer."""
    model_cfg = dataclasses.replace(cfg.model, vocab_size=tokenizer.vocab_size,
                                    boundary_token=tokenizer.boundary_token)
    return config.validate(dataclasses.replace(cfg, model=model_cfg))


def package_versions() -> dict[str, str]:
    import importlib.metadata as md
    out = {"python": platform.python_version(), "int_lm": __version__}
    for name in ("jax", "jaxlib", "numpy", "datasets", "tiktoken", "orbax-checkpoint", "tensorboard"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def run_metadata(cfg: config.Config, tokenizer, corpus, shape: model.ModelShape) -> dict[str, Any]:
    return {
        "config": config.to_dict(cfg),
        "tokenizer": tokenizer.identity(),
        "corpus": corpus.describe(),
        "versions": package_versions(),
        "device": str(jax.devices()[0].device_kind),
        "cpu": backend.cpu_flags(),
        "backend": jax.default_backend(),
        "device_count": jax.device_count(),
        "param_count": model.param_count(shape),
    }


def make_validator(shape: model.ModelShape, block: np.ndarray, num_bytes: int):
    """Bits per byte of the unperturbed model on a fixed validation block (state carried).

    Reported exactly (float64 on the host from the integer logits), since the
    integer loss reads up to ~0.13 bit per token optimistic.
    """
    inputs, targets = jnp.asarray(block[:, :-1]), jnp.asarray(block[:, 1:])
    state0 = model.init_state(shape, block.shape[0])

    @jax.jit
    def logits_of(params):
        _, _, logits = model.forward(params, state0, inputs, targets, shape.boundary_token, return_logits=True)
        return logits

    def validate(params) -> float:
        bits = intmath.bits_per_token_f64(np.asarray(logits_of(params)), block[:, 1:])
        return float(bits.sum()) / num_bytes

    return validate


def summary_lines(title: str, items: dict[str, Any]) -> str:
    width = max(len(k) for k in items)
    return "\n".join([title] + [f"  {k:<{width}}  {v}" for k, v in items.items()])


@dataclasses.dataclass
class Run:
    """Everything the loop needs besides the train state, built once by :func:`build_run`."""
    cfg: config.Config
    shape: model.ModelShape
    rule: optim.UpdateRule
    layout: distributed.Layout
    stream: Any              # data.BatchStream: this process's rows of each step
    run_dir: Path
    meta: dict               # metadata.json, also saved in every checkpoint
    tracker: Any             # logging.TolerantTracker: TensorBoard on process 0, nothing elsewhere
    ckpt: Any                # checkpoint.Checkpointer (a follower on processes > 0)
    validate: Any            # params -> validation bits/byte
    val_ref: dict            # baseline bits/byte on the validation split
    token_bytes: np.ndarray  # bytes per token id
    votes_fn: Any            # jit of eggroll.population_votes (shard_map'd over a mesh)
    update_fn: Any           # jit of rule.update
    resumed: bool
    progress: bool           # show a progress bar (process 0 only)
    sampler: Any = None      # generate.FixedPromptSampler (train.sample_tokens); None when off or process > 0


def build_run(cfg: config.Config, *, tracker=None, progress: bool | None = None, log=print,
              overrides: dict | None = None) -> tuple[Run, train_state.TrainState]:
    """Set up a run (resuming ``cfg.train.run_dir`` if it has checkpoints): returns (run, first state)."""
    main = distributed.is_main()          # process 0 logs and writes the run's files
    plan = checkpoint.plan_resume(cfg, overrides)
    if plan is not None:
        cfg = dataclasses.replace(plan.config, dist=cfg.dist)  # this launch's processes, not the saved ones
    progress = (cfg.train.progress if progress is None else progress) and main
    tokenizer = data.make_tokenizer(cfg.data)
    cfg = resolve_model_config(cfg, tokenizer)
    corpus = data.load_corpus(cfg.data, tokenizer, progress=progress)
    shape = model.ModelShape.from_config(cfg.model)
    spec = eggroll.EggrollSpec.from_config(cfg)
    eggroll.check_limits(spec)
    es, tc = cfg.es, cfg.train

    run_dir = Path(tc.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if main:
            checkpoint.atomic_write(run_dir / "config.toml", config.to_toml(cfg))
    except OSError as err:
        raise checkpoint.unwritable_run_dir(run_dir, err) from None
    meta = run_metadata(cfg, tokenizer, corpus, shape)
    if main:
        checkpoint.atomic_write(run_dir / "metadata.json", json.dumps(meta, indent=2))
    if tracker is None and main:   # a failed write warns once and switches the tracker off; training goes on
        tracker = TolerantTracker(lambda: TensorBoardTracker(run_dir / "tb"), f"TensorBoard events to {run_dir / 'tb'}")
    else:
        tracker = TolerantTracker(lambda given=tracker or NullTracker(): given, "metrics to the tracker")

    ref = data.baselines(corpus, tokenizer)
    val_ref = {"unigram": ref["unigram"]["validation"], "bigram": ref["bigram"]["validation"]}
    if "compress" in ref:
        val_ref["compressor"] = ref["compress"]["validation"]["best"]

    rows = es.population // es.group_size
    layout = distributed.Layout.create(spec)  # the population over every device; trivial on one device
    rule = optim.make(es)
    state = train_state.init(shape, es.population, rule, tc.seed)
    cursor = None
    if plan is not None:
        restored = distributed.resume(plan, run_dir, tokenizer, corpus, log=log)
        state, cursor = train_state.from_restored(restored, rule), restored.cursor
        checkpoint.mark_tensorboard_restart(tracker, restored.step)
    stream = data.BatchStream(corpus.split("train"), rows, es.tokens_per_update, tc.seed, cursor=cursor,
                              row_range=layout.row_range)

    val_split = corpus.split("validation")
    val_rows = max(1, min(16, cfg.data.val_tokens // 256))   # up to 16 rows of >= 256 tokens
    val_len = max(1, min(cfg.data.val_tokens // val_rows, (len(val_split) - 1) // val_rows))
    validate = make_validator(shape, data.eval_slice(val_split, val_rows, val_len),
                              data.eval_slice_bytes(val_split, val_rows, val_len))
    sampler = None
    if tc.sample_tokens and main:
        prompt = generate.line_start_prompt(val_split.tokens, shape.boundary_token, tokenizer.decode_bytes)
        sampler = generate.FixedPromptSampler(shape, tuple(int(t) for t in prompt), tokenizer.decode_bytes,
                                              tc.sample_tokens)
    run = Run(cfg=cfg, shape=shape, rule=rule, layout=layout, stream=stream, run_dir=run_dir, meta=meta,
              tracker=tracker, validate=validate, val_ref=val_ref, token_bytes=tokenizer.token_bytes(),
              ckpt=distributed.checkpointer(run_dir, tc.keep_checkpoints, resume_step=plan and plan.step, log=log),
              votes_fn=layout.votes_fn(), update_fn=jax.jit(rule.update, donate_argnums=(0, 1)),
              resumed=plan is not None, progress=progress, sampler=sampler)
    log(summary_lines("int_lm: EGGROLL training", {
        "model": f"{shape.layers} layers x {shape.width} wide, V={shape.vocab_size} "
                 f"({model.param_count(shape):,} int8 parameters"
                 f"{', head tied to the embedding' if shape.tie_head else ''})",
        "population": f"{es.population} ({es.population // 2} antithetic pairs, group size {es.group_size}, "
                      f"rank {es.rank}, sigma 2^-{es.sigma_shift})",
        "update rule": es.optimizer,
        "tokens per step": f"{es.population * es.tokens_per_update:,} ({es.tokens_per_update} per member)",
        "data": f"{cfg.data.source} / {tokenizer.name}: {len(corpus.split('train')):,} train tokens",
        "baselines (val bits/byte)": ", ".join(f"{k} {v:.3f}" for k, v in val_ref.items()),
        "device": f"{meta['device']} x{jax.device_count()}" + (f" ({layout.describe()})" if layout.mesh else ""),
        "run dir": str(run_dir),
    }))
    return run, layout.place(state)


def run_step(run: Run, state: train_state.TrainState) -> tuple[train_state.TrainState, dict[str, float]]:
    """One EGGROLL step: the next batch, the population's votes, the rule's update; returns the metrics."""
    es = run.cfg.es
    tokens = run.stream.next()
    hyper, logged_hyper = run.rule.schedule(state.step)
    t0 = time.perf_counter()
    votes, scores, states = run.votes_fn(state.params, state.states, run.layout.put_tokens(tokens),
                                         np.uint32(state.seed), np.uint32(state.step // es.noise_reuse))
    scores = np.asarray(scores)
    t1 = time.perf_counter()
    params, opt_state, stats = run.update_fn(state.opt_state, state.params, votes,
                                             {k: np.int32(v) for k, v in hyper.items()})
    stats = jax.tree_util.tree_map(int, stats)
    t2 = time.perf_counter()
    state = dataclasses.replace(state, params=params, states=states, opt_state=opt_state, step=state.step + 1,
                                cursor=run.stream.cursor())

    tokens = run.layout.all_rows(tokens)   # every process's rows, for the metrics
    member_bytes = run.token_bytes[tokens[:, 1:]].sum(axis=1).repeat(es.group_size)
    bpb = -scores / 16.0 / np.maximum(member_bytes, 1)    # scores are 1/16 bits
    return state, {
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


HISTOGRAMS = (("embed",), ("layers", "Wf"), ("head",))   # weight histograms written at each evaluation


SAMPLE_TAG = "samples/val_prompt"   # the evaluation's text sample: TensorBoard tag; samples.jsonl by step


def evaluate(run: Run, state: train_state.TrainState) -> dict[str, Any]:
    """Validation bits/byte (with the baselines as reference lines); weight histograms to the tracker;
    with a sampler, the text sample (under SAMPLE_TAG, for :meth:`RunRecord.step`) and its seconds."""
    params = run.layout.local(state.params)
    val_bpb = run.validate(params)
    for path in (p for p in HISTOGRAMS if p[0] in state.params):   # a tied model has no head
        run.tracker.histogram(state.step, "weights/" + "/".join(path), np.asarray(model.get_leaf(state.params, path)))
    out = {"val/bits_per_byte": val_bpb, **{f"val/baseline_{k}": v for k, v in run.val_ref.items()}}
    if run.sampler is not None:
        t0 = time.perf_counter()
        out[SAMPLE_TAG] = run.sampler(params)
        out["perf/sample_s"] = time.perf_counter() - t0
    return out


def sample_markdown(prompt: str, text: str, how: str) -> str:
    """Prompt and sample as two preformatted blocks (TensorBoard renders text as Markdown)."""
    def block(s: str) -> str:
        return "\n".join("    " + line for line in s.split("\n"))
    return f"prompt (validation split):\n\n{block(prompt)}\n\nsample ({how}):\n\n{block(text)}"


class RunRecord:
    """The run's record on this process: history, tracker scalars, the progress bar and the summary.

    ``history.jsonl`` gets each step's line as it is logged (appended and flushed; a resume
    first cuts it back to the checkpoint's step), so a killed run leaves the history of every
    step it completed. A context manager: the bar is closed and the tracker flushed however
    the loop ends.
    """

    def __init__(self, run: Run, state, progress: bool, log):
        self.run, self.log = run, log
        self.history: list[dict[str, Any]] = run.ckpt.history_until(state.step) if run.resumed else []
        # A resumed run reports its last evaluation until it makes a new one (a finished run makes none).
        self.val_bpb = next((h["val/bits_per_byte"] for h in reversed(self.history) if "val/bits_per_byte" in h),
                            float("nan"))
        self.t_start = time.perf_counter()
        self.first_step_s = None
        self.bar = None
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=run.cfg.train.steps, initial=state.step, desc="train", unit="step",
                            dynamic_ncols=True)

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        metrics = dict(metrics)
        text = metrics.pop(SAMPLE_TAG, None)
        if self.first_step_s is None:
            self.first_step_s = metrics["perf/forward_s"] + metrics["perf/update_s"]
        self.val_bpb = metrics.get("val/bits_per_byte", self.val_bpb)
        self.run.tracker.scalars(step, metrics)
        self.history.append({"step": step, "time_s": time.perf_counter() - self.t_start, **metrics})
        self.run.ckpt.append_history(self.history)        # flushed; a failed write warns and is retried
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(train=f"{metrics['train/bits_per_byte_mean']:.3f}",
                                 val="-" if np.isnan(self.val_bpb) else f"{self.val_bpb:.3f}",
                                 tok_s=f"{metrics['perf/population_tokens_per_s']:,.0f}")
        if text is not None:
            self.sample(step, text)

    def sample(self, step: int, text: str) -> None:
        """The evaluation's sample: TensorBoard text, a line of samples.jsonl (history.jsonl has the
        step), and one log line when there is no progress bar. A failed write never stops the run."""
        sampler = self.run.sampler
        self.run.tracker.text(step, SAMPLE_TAG, sample_markdown(sampler.prompt, text, sampler.describe()))
        self.run.ckpt.append_sample({"step": step, "prompt": sampler.prompt, "text": text})
        if self.bar is None:
            short = text if len(text) <= 120 else text[:120] + "..."
            self.log(f"sample at step {step}: " + short.replace("\n", "\\n").replace("\t", "\\t"))

    def __enter__(self) -> "RunRecord":
        return self

    def __exit__(self, *exc) -> bool:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.run.tracker.flush()
        return False

    def finish(self, state, signal: str | None = None) -> dict[str, Any]:
        """Log and return the summary (``signal``: the name of the signal that stopped the run, if any)."""
        elapsed = time.perf_counter() - self.t_start
        history, steps = self.history, self.run.cfg.train.steps
        last = history[-1] if history else {}
        rates = [h["perf/population_tokens_per_s"] for h in history[1:]]
        summary = {
            "steps": state.step,
            "interrupted": state.step < steps or signal is not None,
            "signal": signal,
            "wall_s": elapsed,
            "first_step_s": self.first_step_s,
            "train_bits_per_byte": last.get("train/bits_per_byte_mean"),
            "val_bits_per_byte": self.val_bpb,
            "baselines": self.run.val_ref,
            "population_tokens_per_s": float(np.median(rates)) if rates else None,
            "run_dir": str(self.run.run_dir),
        }
        stopped = f" (stopped by {signal})" if signal else " (interrupted)" if summary["interrupted"] else ""
        self.log(summary_lines("int_lm: done" + stopped, {
            "steps": summary["steps"],
            "wall clock": f"{elapsed:.1f} s",
            "train bits/byte": f"{summary['train_bits_per_byte']:.4f}" if history else "-",
            "val bits/byte": "-" if np.isnan(self.val_bpb) else f"{self.val_bpb:.4f}",
            "throughput": f"{summary['population_tokens_per_s'] or 0:,.0f} population-tokens/s",
            "run dir": str(self.run.run_dir),
        }))
        if signal:
            saved = self.run.ckpt.last_saved
            self.log(f"stopped by {signal} at step {state.step}; " + (
                f"checkpoint {saved} is saved in {self.run.ckpt.root}; run the same command to resume"
                if saved is not None else "nothing was trained, nothing to save"))
        return {**summary, "state": state, "history": history}


def save_after_error(run: Run, state: train_state.TrainState, record: RunRecord, err: Exception) -> None:
    """An exception in the loop: save ``state`` (the state after the last completed step) unless it
    is saved already, and add a note to ``err`` saying what was saved."""
    last = run.ckpt.last_saved
    kept = f"the last checkpoint is step {last}" if last is not None else "no checkpoint was saved"
    if isinstance(err, checkpoint.CheckpointError) or state.step == 0 or state.step == last:
        return                                  # the store itself failed, or nothing new to save
    if run.layout.multiprocess:
        err.add_note(f"not saved after the error (the other processes cannot join a save now); {kept}")
        return
    leaves = jax.tree_util.tree_leaves((state.params, state.states, state.opt_state))
    if any(getattr(x, "is_deleted", lambda: False)() for x in leaves):
        err.add_note(f"the state after step {state.step} was consumed by the failing step and could not be "
                     f"saved; {kept}")
        return
    try:
        run.ckpt.save_final(run.layout.host_state(state), run.meta, record.history)
    except Exception as save_err:
        err.add_note(f"saving the state after step {state.step} failed too ({save_err}); {kept}")
        return
    err.add_note(f"the state after step {state.step} (the last completed step) is saved as a checkpoint in "
                 f"{run.ckpt.root}; run the same command to resume")


def train(cfg: config.Config, *, tracker=None, progress: bool | None = None, log=print,
          overrides: dict | None = None) -> dict[str, Any]:
    """Train per ``cfg``; returns a summary dict (final metrics, paths, timings, the final state).

    If ``cfg.train.run_dir`` has checkpoints the run resumes (``checkpoint.plan_resume``):
    the saved config wins; ``overrides`` are the keys the user set explicitly
    (None: every key of ``cfg``). A stop signal (:mod:`int_lm.stopping`) during the loop
    finishes the step, saves it and returns (``summary["signal"]`` names it); during
    start-up it raises :class:`int_lm.stopping.Interrupted`.
    """
    with stopping.StopSignals() as stop:        # until stop.defer(): a signal stops at once, nothing to save
        if distributed.initialize(cfg.dist):   # joins a multi-process run if dist.* / JAX_* / SLURM say so
            stop.reinstall()            # over jax.distributed's own SIGTERM handler
        main = distributed.is_main()
        if not main:
            log = lambda *a, **k: None  # noqa: E731
        # One trainer per run directory (process 0 writes it); the kernel drops the lock however we end.
        lock = checkpoint.lock_run_dir(cfg.train.run_dir) if main else contextlib.nullcontext()
        with lock:
            return _train(cfg, stop, tracker=tracker, progress=progress, log=log, overrides=overrides)


def _train(cfg, stop, *, tracker, progress, log, overrides) -> dict[str, Any]:
    """The body of :func:`train`, inside its stop signals and the run directory's lock."""
    run, state = build_run(cfg, tracker=tracker, progress=progress, log=log, overrides=overrides)
    tc = run.cfg.train
    stop.defer()                            # from here on: finish the step, save, then stop
    with run.ckpt, RunRecord(run, state, run.progress, log) as record:
        try:
            while state.step < tc.steps and not run.layout.agree_stop(stop.requested):
                state, metrics = run_step(run, state)
                if tc.eval_every and (state.step % tc.eval_every == 0 or state.step == tc.steps):
                    metrics.update(evaluate(run, state))
                record.step(state.step, metrics)
                if tc.checkpoint_every and state.step % tc.checkpoint_every == 0:
                    run.ckpt.save(run.layout.host_state(state), run.meta, record.history)
        except Exception as err:
            save_after_error(run, state, record, err)
            raise
        run.ckpt.save_final(run.layout.host_state(state), run.meta, record.history)  # at the end, or stopped
    return record.finish(state, stop.agreed(run.layout))
