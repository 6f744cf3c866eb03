"""Resume: which checkpoint, which config, and the record of it.

:func:`plan_resume` picks the step (the latest, or ``train.resume_from``) and
the config: the saved one wins, and a key the user set explicitly may differ
only if it is in :data:`MUTABLE_KEYS` (else refused, saying why it is locked).
:func:`resume` restores that step, checks the tokenizer and corpus against the
checkpoint, moves newer checkpoints aside (never deletes them) and appends one
line to ``RUN_DIR/resume_log.jsonl``.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from int_lm import config
from int_lm.checkpoint.store import (CheckpointError, Restored, _fallback_hint, _fsync_write, checkpoint_dir,
                                     list_steps, read_meta, restore)
from int_lm.errors import UserError

SUPERSEDED = "checkpoints_superseded"
RESUME_LOG = "resume_log.jsonl"


# Keys a resumed run may change: they do not touch the model's shape, the
# tokenizer, the training data, the population layout or the noise.
MUTABLE_KEYS = frozenset({
    "train.steps", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.resume_from", "train.progress", "train.run_dir", "train.sample_tokens",
    "es.alpha", "es.alpha_horizon", "es.lr", "es.lr_power",   # the schedule only
    "es.chunk_size",                    # the vote is exact across chunks: memory/speed only
    "data.cache_dir", "data.val_tokens", "data.hub_eval_bytes",
    "dist.coordinator_address", "dist.num_processes", "dist.process_id",
})
# Derived from the tokenizer, never compared on a programmatic resume.
_DERIVED = frozenset({"model.vocab_size", "model.boundary_token"})


def _why_locked(key: str) -> str:
    section, _, name = key.partition(".")
    if key in ("model.head_init_std", "model.embed_init_std"):
        return "it only sets the initial weights, which the checkpoint replaces (its value is the run's record)"
    if section == "model":
        return "it changes the model's shape"
    if key in ("data.tokenizer", "data.bpe_merges", "data.encoding_file"):
        return "it changes the tokenizer"
    if section == "data":
        return "it changes the training data"
    if key in ("es.population", "es.group_size", "es.rank", "es.tokens_per_update"):
        return "it changes the population layout (saved recurrent states, data cursor, noise)"
    return "it changes the noise or the update, so the run would not continue the same training"


@dataclasses.dataclass
class ResumePlan:
    step: int
    config: config.Config
    changes: dict[str, tuple[Any, Any]]
    steps: list[int]
    metadata: dict


explicit_values = config.explicit_values   # moved to config (which keys the user set); kept for callers


def plan_resume(cfg: config.Config, overrides: dict[str, dict[str, Any]] | None = None) -> ResumePlan | None:
    """Decide whether ``cfg.train.run_dir`` resumes, from which step, with which config.

    ``overrides``: the ``{section: {key: value}}`` the user set explicitly (the
    command line); ``None`` means every key of ``cfg`` is what the caller wants
    (programmatic use). The saved config wins; an explicit key that differs is
    applied if it is in :data:`MUTABLE_KEYS`, else refused naming the key.
    """
    run_dir = Path(cfg.train.run_dir)
    steps = list_steps(run_dir)
    want = cfg.train.resume_from
    if not steps:
        if want >= 0:
            raise CheckpointError(f"--train.resume_from {want}: {run_dir} has no checkpoints; "
                                  f"drop --train.resume_from to start a new run")
        return None
    step = steps[-1] if want < 0 else want
    if step not in steps:
        raise CheckpointError(f"--train.resume_from {step}: no such checkpoint in {checkpoint_dir(run_dir)}; "
                              f"available: {', '.join(map(str, steps))}")
    meta = read_meta(run_dir, step, steps)
    try:
        saved = config.validate(config.from_dict(meta["metadata"]["config"]))
    except (UserError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint step {step} in {run_dir}: saved config unusable ({err}); "
                              f"{_fallback_hint(run_dir, step, steps)}") from None
    if overrides is None:
        asked = {sec: {k: v for k, v in vals.items() if f"{sec}.{k}" not in _DERIVED}
                 for sec, vals in config.to_dict(cfg).items()}
    else:
        asked = overrides
    wanted = config.apply_values(saved, asked, "the command line")
    changes: dict[str, tuple[Any, Any]] = {}
    for section, entries in asked.items():
        for key in entries:
            name = f"{section}.{key}"
            old, new = getattr(getattr(saved, section), key), getattr(getattr(wanted, section), key)
            if old == new or name in ("train.run_dir", "train.resume_from"):
                continue
            if name not in MUTABLE_KEYS:
                raise CheckpointError(
                    f"cannot change {name} when resuming {run_dir} (the checkpoint has {old!r}, you asked "
                    f"{new!r}): {_why_locked(name)}; drop --{name} to resume, or start a new run in "
                    f"another --train.run_dir")
            changes[name] = (old, new)
    train = dataclasses.replace(wanted.train, run_dir=cfg.train.run_dir, resume_from=-1)
    final = config.validate(dataclasses.replace(wanted, train=train))
    return ResumePlan(step=step, config=final, changes=changes, steps=steps, metadata=meta["metadata"])


def supersede_newer(run_dir: str | Path, step: int, log=print) -> list[int]:
    """Move checkpoints newer than ``step`` aside (never delete): the resumed run writes those steps again."""
    run_dir = Path(run_dir)
    newer = [s for s in list_steps(run_dir) if s > step]
    if not newer:
        return []
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    dest = run_dir / SUPERSEDED / stamp
    dest.mkdir(parents=True, exist_ok=True)
    for s in newer:
        shutil.move(str(checkpoint_dir(run_dir) / str(s)), str(dest / str(s)))
    log(f"moved checkpoints {', '.join(map(str, newer))} (newer than step {step}) to {dest}")
    return newer


def check_compatible(plan_meta: dict, tokenizer, corpus, where: str) -> None:
    """The tokenizer and corpus of this run must be the checkpoint's."""
    saved_tok = plan_meta.get("tokenizer")
    if saved_tok != tokenizer.identity():
        raise CheckpointError(f"{where} was trained with tokenizer {saved_tok}, this run builds "
                              f"{tokenizer.identity()}; resume with the same data.tokenizer / data.bpe_merges")
    saved_fp = (plan_meta.get("corpus") or {}).get("fingerprint")
    now_fp = corpus.describe().get("fingerprint")
    if saved_fp != now_fp:
        raise CheckpointError(f"{where} was trained on corpus {saved_fp}, this run reads {now_fp} "
                              f"(data.source or its files changed); resume with the same corpus or start "
                              f"a new run in another --train.run_dir")


def record_resume(run_dir: str | Path, plan: ResumePlan, superseded: list[int]) -> None:
    entry = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
             "resumed_from_step": plan.step, "changes": {k: list(v) for k, v in plan.changes.items()},
             "superseded": superseded, "command": sys.argv}
    _fsync_write(Path(run_dir) / RESUME_LOG, json.dumps(entry) + "\n", "a")


def resume(plan: ResumePlan, run_dir: str | Path, tokenizer, corpus, log=print) -> Restored:
    """Restore ``plan.step`` (verified), check tokenizer/corpus, move newer checkpoints aside, log it."""
    run_dir = Path(run_dir)
    restored = restore(run_dir, plan.step)
    check_compatible(restored.metadata, tokenizer, corpus, f"checkpoint step {plan.step} in {run_dir}")
    superseded = supersede_newer(run_dir, plan.step, log=log)
    record_resume(run_dir, plan, superseded)
    changed = "; changed: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in plan.changes.items()) \
        if plan.changes else ""
    log(f"resuming {run_dir} from checkpoint step {plan.step}{changed}")
    return restored


def mark_tensorboard_restart(tracker, step: int) -> None:
    """Tell TensorBoard to drop events logged after ``step`` (alias of ``tracker.mark_restart``)."""
    tracker.mark_restart(step)
