"""Checkpoints (orbax), exact resume, and export of trained int8 weights.

A run directory holds::

    RUN_DIR/checkpoints/<step>/{state,meta}   orbax CheckpointManager steps
    RUN_DIR/history.jsonl                      every logged step (appended at each save)
    RUN_DIR/resume_log.jsonl                   one line per resume: step, changed keys
    RUN_DIR/checkpoints_superseded/            checkpoints newer than a --train.resume_from step

One checkpoint = two orbax items:

* ``state``: a PyTree of host NumPy integer arrays, ``{"params": <model.param_shapes
  layout, int8>, "states": (L, N, D) int8, "opt": <the update rule's state, int32 or
  smaller; absent for a stateless rule>}``. Saved from host copies (no device shardings
  are recorded) and restored with ``restore_type=np.ndarray``: explicit host
  placement, so a checkpoint written on a GPU restores on a CPU and back.
* ``meta``: JSON: format tag, step, data cursor, seed, the run metadata
  (resolved config, tokenizer identity, corpus fingerprint, versions) and a
  sha256 of every array. Restoring verifies names, shapes, dtypes and the hashes,
  so a truncated or corrupted checkpoint is refused with one clear message.

Nothing is ever pickled; loading never executes code. Old checkpoints are
garbage-collected by this module (not by orbax's ``max_to_keep``) and only
after a newer save has been committed, so a failed save never removes the
last good checkpoint; a failed restore removes nothing at all.

Public API::

    load_model(path, step=None) -> LoadedModel      # run dir (latest/step) or exported file
    export_model(run_dir_or_loaded, out_path)       # one .safetensors of int8 arrays + JSON
    python -m int_lm.checkpoint export RUN_DIR OUT.safetensors [--step N]
    python -m int_lm.checkpoint list RUN_DIR
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from int_lm import config as C
from int_lm.errors import UserError

CHECKPOINT_FORMAT = "int_lm-checkpoint-v1"
EXPORT_FORMAT = "int_lm-export-v1"
CHECKPOINTS = "checkpoints"
SUPERSEDED = "checkpoints_superseded"
HISTORY = "history.jsonl"
RESUME_LOG = "resume_log.jsonl"

# Keys a resumed run may change: they do not touch the model's shape, the
# tokenizer, the training data, the population layout or the noise.
MUTABLE_KEYS = frozenset({
    "train.steps", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.resume_from", "train.progress", "train.run_dir",
    "es.alpha", "es.alpha_horizon",
    "es.chunk_size",                    # the vote is exact across chunks: memory/speed only
    "data.cache_dir", "data.val_tokens", "data.hub_eval_bytes",
    "dist.coordinator_address", "dist.num_processes", "dist.process_id",
})
# Derived from the tokenizer, never compared on a programmatic resume.
_DERIVED = frozenset({"model.vocab_size", "model.boundary_token"})


class CheckpointError(UserError):
    """A checkpoint that cannot be used (missing, corrupt, incompatible); the message says what to do."""


def _why_locked(key: str) -> str:
    section, _, name = key.partition(".")
    if section == "model":
        return "it changes the model's shape"
    if key in ("data.tokenizer", "data.bpe_merges", "data.encoding_file"):
        return "it changes the tokenizer"
    if section == "data":
        return "it changes the training data"
    if key in ("es.population", "es.group_size", "es.rank", "es.tokens_per_update"):
        return "it changes the population layout (saved recurrent states, data cursor, noise)"
    return "it changes the noise or the update, so the run would not continue the same training"


def _short(err: BaseException) -> str:
    """One short line for an orbax/tensorstore error (they can be kilobytes long)."""
    text = str(err).strip()
    if "No space left on device" in text or getattr(err, "errno", None) == 28:
        return "no space left on device"
    first = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {first[:200]}{'...' if len(first) > 200 else ''}"


def _quiet_orbax() -> None:
    """Orbax logs failures with full tracebacks from its threads; we report each one as a UserError."""
    for name in ("absl", "orbax", "orbax.checkpoint"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    _silence_late_read_callbacks()


def _failed_save_error(step: int, root: Path, err: BaseException | None = None) -> "CheckpointError":
    """The one-line error for a save that failed with ``err`` (None: it did not commit).

    A failed orbax save also leaves unretrieved asyncio futures whose exceptions
    asyncio would log, with the full tensorstore text, when they are collected
    (seen on a full disk); the save is reported here, so mute that.
    """
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    where = f"saving the checkpoint at step {step} to {root}"
    if err is None:
        return CheckpointError(f"{where} did not commit; earlier checkpoints are kept")
    return CheckpointError(f"{where} failed ({_short(err)}); earlier checkpoints are kept; free disk space "
                           f"(or fix the directory), then run the same command to resume")


def _ocp():
    import orbax.checkpoint as ocp
    _quiet_orbax()
    return ocp


# ---------------------------------------------------------------------------
# Array trees: flatten, hash, verify
# ---------------------------------------------------------------------------

def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k in sorted(tree):
        v = tree[k]
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, name + "."))
        else:
            out[name] = v
    return out


def _unflat(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for name, v in flat.items():
        node = out
        parts = name.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _host_array(x, name: str, dtypes: tuple = (np.int8,)) -> np.ndarray:
    """A private host copy (the device buffers are donated by the next step); integers only."""
    a = np.array(x, copy=True)
    if a.dtype not in dtypes:
        raise CheckpointError(f"refusing to save {name} with dtype {a.dtype}: weights and member states are "
                              f"int8 only, optimiser state int32 or smaller")
    return a


OPT_DTYPES = (np.int8, np.int16, np.int32)


def _flat_state(state) -> dict[str, np.ndarray]:
    """The arrays of a train state as ``{name: host array}``: params.*, states, opt.*."""
    flat = {"params." + k: _host_array(v, k) for k, v in _flat(dict(state.params)).items()}
    flat["states"] = _host_array(state.states, "states")
    for k, v in _flat(dict(getattr(state, "opt_state", None) or {})).items():
        flat["opt." + k] = _host_array(v, "opt_state." + k, OPT_DTYPES)
    return flat


def _expected_arrays(cfg: C.Config) -> dict[str, tuple[tuple, np.dtype]]:
    """Name -> (shape, dtype) of every array a checkpoint of ``cfg`` holds."""
    import jax
    from int_lm import model as M
    from int_lm import optim
    shape = M.ModelShape.from_config(cfg.model)
    out = {"params." + k: (tuple(v), np.dtype(np.int8)) for k, v in _flat(M.param_shapes(shape)).items()}
    out["states"] = ((shape.layers, cfg.es.population, shape.width), np.dtype(np.int8))
    params = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, np.int8), M.param_shapes(shape),
                                    is_leaf=lambda x: isinstance(x, tuple))
    opt = jax.eval_shape(optim.make(cfg.es).init, params)
    for k, v in _flat(dict(opt)).items():
        out["opt." + k] = (tuple(v.shape), np.dtype(v.dtype))
    return out


def _param_arrays(cfg: C.Config) -> dict[str, tuple[tuple, np.dtype]]:
    """The weights alone (an exported model), without the ``params.`` prefix."""
    return {k[len("params."):]: v for k, v in _expected_arrays(cfg).items() if k.startswith("params.")}


def _check_arrays(flat: dict[str, np.ndarray], expected: dict[str, tuple[tuple, np.dtype]],
                  digests: dict[str, str] | None, where: str, hint: str) -> None:
    if set(flat) != set(expected):
        raise CheckpointError(f"{where} holds arrays {sorted(flat)}, expected {sorted(expected)}; {hint}")
    for name, a in flat.items():
        shape, dtype = expected[name]
        if not isinstance(a, np.ndarray) or a.dtype != dtype:
            raise CheckpointError(f"{where}: {name} has dtype {getattr(a, 'dtype', type(a))}, expected {dtype} "
                                  f"(never cast silently); {hint}")
        if tuple(a.shape) != tuple(shape):
            raise CheckpointError(f"{where}: {name} has shape {tuple(a.shape)}, expected {shape}; {hint}")
        if digests is not None and digests.get(name) != _digest(a):
            raise CheckpointError(f"{where}: {name} does not match its saved sha256 (corrupted); {hint}")


# ---------------------------------------------------------------------------
# Listing and reading checkpoints
# ---------------------------------------------------------------------------

def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def list_steps(run_dir: str | Path) -> list[int]:
    """Committed checkpoint steps in ``run_dir`` (orbax's finalised step directories), ascending."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    steps = []
    for p in root.iterdir():
        if p.is_dir() and p.name.isdigit():
            steps.append(int(p.name))
    return sorted(steps)


def _read_manager(run_dir: Path):
    ocp = _ocp()
    opts = ocp.CheckpointManagerOptions(read_only=True, create=False, enable_async_checkpointing=False)
    return ocp.CheckpointManager(checkpoint_dir(run_dir).resolve(), options=opts, item_names=("state", "meta"))


def _fallback_hint(run_dir: Path, step: int, steps: list[int]) -> str:
    older = [s for s in steps if s < step]
    if older:
        return (f"nothing was deleted; to resume from an earlier checkpoint pass --train.resume_from "
                f"{older[-1]} (available: {', '.join(map(str, steps))})")
    return "nothing was deleted; there is no earlier checkpoint to fall back to in " + str(run_dir)


def read_meta(run_dir: str | Path, step: int, steps: list[int] | None = None) -> dict:
    """The JSON item of one checkpoint, validated (cheap: no arrays are read)."""
    run_dir = Path(run_dir)
    steps = list_steps(run_dir) if steps is None else steps
    where = f"checkpoint step {step} in {checkpoint_dir(run_dir)}"
    hint = _fallback_hint(run_dir, step, steps)
    path = checkpoint_dir(run_dir) / str(step) / "meta" / "metadata"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{where} has no metadata (incomplete or truncated); {hint}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{where} has unreadable metadata ({type(err).__name__}: {err}); "
                              f"it is corrupted or truncated; {hint}") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{where} is not an {CHECKPOINT_FORMAT} checkpoint "
                              f"(format {meta.get('format') if isinstance(meta, dict) else None!r}); {hint}")
    for key in ("step", "cursor", "seed", "metadata", "sha256"):
        if key not in meta:
            raise CheckpointError(f"{where}: metadata lacks {key!r} (corrupted); {hint}")
    if meta["step"] != step:
        raise CheckpointError(f"{where}: metadata says step {meta['step']} (corrupted); {hint}")
    return meta


_SILENCED = False


def _silence_late_read_callbacks() -> None:
    """After a failed read or write, tensorstore's other in-flight operations may complete into
    orbax's closed asyncio loop and print 'Event loop is closed' tracebacks; the error itself is
    reported as a CheckpointError."""
    global _SILENCED
    if _SILENCED:
        return
    _SILENCED = True
    previous = sys.unraisablehook

    def hook(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
            return
        previous(unraisable)

    sys.unraisablehook = hook


@dataclasses.dataclass
class Restored:
    """One checkpoint read back to the host (NumPy int8), verified."""
    params: dict
    states: np.ndarray
    step: int
    cursor: dict
    seed: int
    config: C.Config
    metadata: dict          # run metadata: config, tokenizer, corpus, versions, ...
    opt_state: dict = dataclasses.field(default_factory=dict)   # the update rule's state ({}: none)


def restore(run_dir: str | Path, step: int | None = None) -> Restored:
    """Read and verify one checkpoint (default: the latest) onto the host."""
    run_dir = Path(run_dir)
    steps = list_steps(run_dir)
    if not steps:
        raise CheckpointError(f"{run_dir} has no checkpoints (expected {checkpoint_dir(run_dir)}/<step>/); "
                              f"train into it first or pass an exported .safetensors file")
    step = steps[-1] if step is None or step < 0 else int(step)
    if step not in steps:
        raise CheckpointError(f"{run_dir} has no checkpoint at step {step}; available: "
                              f"{', '.join(map(str, steps))}")
    meta = read_meta(run_dir, step, steps)
    where = f"checkpoint step {step} in {checkpoint_dir(run_dir)}"
    hint = _fallback_hint(run_dir, step, steps)
    try:
        cfg = C.validate(C.from_dict(meta["metadata"]["config"]))
    except (UserError, KeyError, TypeError) as err:
        raise CheckpointError(f"{where}: its saved config is unusable ({err}); {hint}") from None
    shapes = _expected_arrays(cfg)
    ocp = _ocp()
    template = _unflat({name: 0 for name in shapes})
    restore_args = {name: ocp.RestoreArgs(restore_type=np.ndarray) for name in shapes}
    try:
        mngr = _read_manager(run_dir)
        try:
            out = mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=template, restore_args=_unflat(restore_args))))
        finally:
            mngr.close()
        flat = _flat(dict(out["state"]))
    except CheckpointError:
        raise
    except Exception as err:  # orbax/tensorstore report truncation in many ways
        raise CheckpointError(f"{where} cannot be read ({_short(err)}); it is corrupted or "
                              f"truncated; {hint}") from None
    flat = {k: (np.asarray(v) if not isinstance(v, np.ndarray) else v) for k, v in flat.items()}
    _check_arrays(flat, shapes, meta["sha256"], where, hint)
    tree = _unflat(flat)
    return Restored(params=tree["params"], states=tree["states"], step=step, cursor=meta["cursor"],
                    seed=int(meta["seed"]), config=cfg, metadata=meta["metadata"], opt_state=tree.get("opt", {}))


# ---------------------------------------------------------------------------
# Writing checkpoints (used by the trainer)
# ---------------------------------------------------------------------------

def _fsync_write(path: Path, text: str, mode: str = "w") -> None:
    with open(path, mode) as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    _fsync_write(tmp, text)
    os.replace(tmp, path)


class Checkpointer:
    """Asynchronous orbax saves under ``run_dir/checkpoints``; a context manager that waits on exit.

    ``keep``: how many committed checkpoints to keep. Old ones are deleted only
    after a newer save committed, never when a save fails.

    ``writes_files=False``: a follower, for processes > 0 of a multi-process
    run. It joins orbax's collective saves (all processes must call ``save`` at
    the same steps; orbax writes the arrays and metadata from its primary host,
    process 0) but writes no files of its own: the history file is process 0's.
    """

    def __init__(self, run_dir: str | Path, keep: int, *, resume_step: int | None = None, log=print,
                 writes_files: bool = True):
        self.run_dir = Path(run_dir)
        self.keep = max(1, int(keep))
        self.log = log
        self.writes_files = writes_files
        self.root = checkpoint_dir(self.run_dir)
        self._pending: int | None = None
        self.last_saved: int | None = resume_step
        self._mngr = None
        self._history_written = 0
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if resume_step is None and writes_files:
                _atomic_write(self.run_dir / HISTORY, "")      # a fresh run starts a fresh history
        except OSError as err:
            raise CheckpointError(f"cannot write checkpoints under {self.root} ({err.strerror}); "
                                  f"choose a writable --train.run_dir") from None

    # -- orbax ---------------------------------------------------------------
    def _manager(self):
        if self._mngr is None:
            ocp = _ocp()
            opts = ocp.CheckpointManagerOptions(max_to_keep=None, create=True, enable_async_checkpointing=True,
                                                cleanup_tmp_directories=True)
            self._mngr = ocp.CheckpointManager(self.root.resolve(), options=opts, item_names=("state", "meta"))
        return self._mngr

    def _wait(self) -> None:
        """Wait for the pending save; raise a UserError if it failed (nothing is deleted then)."""
        if self._mngr is None or self._pending is None:
            return
        step, self._pending = self._pending, None
        try:
            self._mngr.wait_until_finished()
            self._mngr.check_for_errors()
        except Exception as err:
            raise _failed_save_error(step, self.root, err) from None
        if step not in list_steps(self.run_dir):
            raise _failed_save_error(step, self.root)
        self.last_saved = step
        self._collect_garbage()

    def _collect_garbage(self) -> None:
        """Delete all but the newest ``keep`` checkpoints, each atomically: the step directory is
        first renamed to ``<step>.deleting`` (no longer listed), then removed, so a kill in the
        middle never leaves a half-deleted checkpoint that looks committed. Process 0 deletes."""
        import jax
        if jax.process_index() != 0:
            return
        removed = False
        for leftover in self.root.glob("*.deleting"):       # from a process killed while deleting
            shutil.rmtree(leftover, ignore_errors=True)
        for old in list_steps(self.run_dir)[:-self.keep]:
            doomed = self.root / f"{old}.deleting"
            try:
                os.replace(self.root / str(old), doomed)
            except OSError as err:  # a leftover old checkpoint is harmless
                self.log(f"warning: could not delete old checkpoint {old}: {err.strerror}")
                continue
            shutil.rmtree(doomed, ignore_errors=True)
            removed = True
        if removed and self._mngr is not None:
            self._mngr.reload()                                 # orbax's view of the steps

    def save(self, state, metadata: dict, history: list[dict] | None = None) -> None:
        """Start an asynchronous save of ``state`` (params, states, opt_state, step, cursor, seed)."""
        step = int(state.step)
        self._wait()
        if step in list_steps(self.run_dir):
            return
        if history is not None:
            try:
                self.append_history(history)
            except OSError as err:
                raise CheckpointError(f"saving the checkpoint at step {step}: cannot write "
                                      f"{self.run_dir / HISTORY} ({_short(err)}); earlier checkpoints are "
                                      f"kept; free disk space (or fix the directory), then run the same "
                                      f"command to resume") from None
        flat = _flat_state(state)
        meta = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "cursor": state.cursor,
            "seed": int(state.seed),
            "saved_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "sha256": {k: _digest(v) for k, v in flat.items()},
            "shapes": {k: list(v.shape) for k, v in flat.items()},
            "metadata": metadata,
        }
        ocp = _ocp()
        try:
            self._manager().save(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(_unflat(flat)), meta=ocp.args.JsonSave(meta)))
        except Exception as err:
            raise _failed_save_error(step, self.root, err) from None
        self._pending = step

    def save_final(self, state, metadata: dict, history: list[dict] | None = None) -> None:
        """At the end or on Ctrl-C: save unless this step is already saved (or nothing was trained)."""
        self._wait()
        if int(state.step) > 0 and int(state.step) != self.last_saved:
            self.save(state, metadata, history)
        self._wait()

    def close(self) -> None:
        try:
            self._wait()
        finally:
            if self._mngr is not None:
                mngr, self._mngr = self._mngr, None
                try:
                    mngr.close()
                except Exception as err:  # a failed save was already reported
                    self.log(f"warning: closing the checkpoint manager: {_short(err)}")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:  # already failing: still wait for a pending save, but do not mask the error
            try:
                self.close()
            except Exception as err:
                print(f"warning: {err}", file=sys.stderr)
        return False

    # -- history -------------------------------------------------------------
    def append_history(self, history: list[dict]) -> None:
        if not self.writes_files:
            return
        new = history[self._history_written:]
        if new:
            _fsync_write(self.run_dir / HISTORY, "".join(json.dumps(h) + "\n" for h in new), "a")
            self._history_written = len(history)

    def history_until(self, step: int) -> list[dict]:
        """Logged history up to ``step`` (entries after it came from steps lost since the checkpoint)."""
        if not self.writes_files:
            return []
        path = self.run_dir / HISTORY
        out = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    break          # a line cut by a kill: everything before it is good
                if entry.get("step", 0) <= step:
                    out.append(entry)
        try:
            _atomic_write(path, "".join(json.dumps(h) + "\n" for h in out))
        except OSError as err:
            raise CheckpointError(f"cannot rewrite {path} ({_short(err)}); free disk space or fix the "
                                  f"directory, then resume again") from None
        self._history_written = len(out)
        if len(out) != step:
            self.log(f"note: {HISTORY} holds {len(out)} of the first {step} steps")
        return out


# ---------------------------------------------------------------------------
# Resume: which checkpoint, which config
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class ResumePlan:
    step: int
    config: C.Config
    changes: dict[str, tuple[Any, Any]]
    steps: list[int]
    metadata: dict


explicit_values = C.explicit_values   # moved to config (which keys the user set); kept for callers


def plan_resume(cfg: C.Config, overrides: dict[str, dict[str, Any]] | None = None) -> ResumePlan | None:
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
        saved = C.validate(C.from_dict(meta["metadata"]["config"]))
    except (UserError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint step {step} in {run_dir}: saved config unusable ({err}); "
                              f"{_fallback_hint(run_dir, step, steps)}") from None
    if overrides is None:
        asked = {sec: {k: v for k, v in vals.items() if f"{sec}.{k}" not in _DERIVED}
                 for sec, vals in C.to_dict(cfg).items()}
    else:
        asked = overrides
    wanted = C.apply_values(saved, asked, "the command line")
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
    final = C.validate(dataclasses.replace(wanted, train=train))
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


# ---------------------------------------------------------------------------
# Loading a trained model, exporting it
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class LoadedModel:
    params: dict            # int8 NumPy arrays, model.param_shapes layout
    config: C.Config
    metadata: dict          # run metadata: config, tokenizer identity, corpus fingerprint, versions, ...
    step: int
    source: str = ""        # the run directory or exported file it came from
    kind: str = "checkpoint"  # "checkpoint" or "export"

    @property
    def shape(self):
        from int_lm import model as M
        return M.ModelShape.from_config(self.config.model)


def load_model(path: str | Path, step: int | None = None) -> LoadedModel:
    """A trained model from a run directory (latest checkpoint, or ``step``) or an exported file."""
    path = Path(path)
    if path.is_dir():
        if not list_steps(path) and list_steps(path.parent) and path.name.isdigit() \
                and path.parent.name == CHECKPOINTS:
            return load_model(path.parent.parent, int(path.name))   # a step directory
        r = restore(path, step)
        return LoadedModel(params=r.params, config=r.config, metadata={**r.metadata, "step": r.step},
                           step=r.step, source=str(path), kind="checkpoint")
    if path.is_file():
        return _load_export(path)
    raise CheckpointError(f"{path} does not exist; pass a run directory with checkpoints or an exported "
                          f".safetensors file")


def _load_export(path: Path) -> LoadedModel:
    from safetensors import safe_open
    hint = "pass a run directory or a file written by `python -m int_lm.checkpoint export`"
    try:
        with safe_open(str(path), framework="numpy") as f:
            header = f.metadata() or {}
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises several kinds for a damaged file
        raise CheckpointError(f"{path} is not a readable exported model ({type(err).__name__}: "
                              f"{str(err)[:200]}); {hint}") from None
    if header.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path} is not an {EXPORT_FORMAT} file (format {header.get('format')!r}); {hint}")
    try:
        metadata = json.loads(header["metadata"])
        cfg = C.validate(C.from_dict(json.loads(header["config"])))
        step = int(header["step"])
        digests = json.loads(header["sha256"])
    except (KeyError, ValueError, UserError) as err:
        raise CheckpointError(f"{path}: its JSON header is damaged ({err}); export it again") from None
    _check_arrays(flat, _param_arrays(cfg), digests, str(path), "export it again")
    return LoadedModel(params=_unflat(flat), config=cfg, metadata={**metadata, "step": step}, step=step,
                       source=str(path), kind="export")


def export_model(src: str | Path | LoadedModel, out_path: str | Path, step: int | None = None) -> Path:
    """Write one portable ``.safetensors``: int8 arrays named ``embed``, ``layers.Wf``, ... and a JSON header.

    Header (all strings, as safetensors requires): ``format``, ``step``,
    ``config`` (JSON), ``tokenizer`` (JSON identity), ``metadata`` (JSON run
    metadata: corpus fingerprint, versions, ...), ``sha256`` (JSON per array).
    Plain NumPy reads it with ``safetensors.numpy.load_file``.
    """
    from safetensors.numpy import save_file
    model = src if isinstance(src, LoadedModel) else load_model(src, step)
    flat = {k: np.ascontiguousarray(v) for k, v in _flat(dict(model.params)).items()}
    _check_arrays(flat, _param_arrays(model.config), None, "the model to export", "it is not an int_lm model")
    metadata = {k: v for k, v in model.metadata.items() if k != "step"}
    header = {
        "format": EXPORT_FORMAT,
        "step": str(model.step),
        "config": json.dumps(C.to_dict(model.config)),
        "tokenizer": json.dumps(metadata.get("tokenizer")),
        "metadata": json.dumps(metadata),
        "sha256": json.dumps({k: _digest(v) for k, v in flat.items()}),
    }
    out = Path(out_path)
    tmp = out.with_name(out.name + ".tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(flat, str(tmp), metadata=header)
        os.replace(tmp, out)
    except OSError as err:
        raise CheckpointError(f"cannot write {out} ({err.strerror}); choose a writable path") from None
    return out


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m int_lm.checkpoint",
                                     description="List checkpoints of a run, or export one as .safetensors.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_exp = sub.add_parser("export", help="write one checkpoint as a portable .safetensors file")
    p_exp.add_argument("run_dir")
    p_exp.add_argument("out")
    p_exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p_list = sub.add_parser("list", help="show the checkpoints of a run directory (or an export's header)")
    p_list.add_argument("run_dir")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "export":
            model = load_model(args.run_dir, args.step)
            out = export_model(model, args.out)
            print(f"exported step {model.step} of {args.run_dir} to {out} "
                  f"({sum(v.size for v in _flat(model.params).values()):,} int8 parameters, "
                  f"{out.stat().st_size:,} bytes)")
        else:
            path = Path(args.run_dir)
            if path.is_file():
                m = load_model(path)
                print(f"{path}: exported model, step {m.step}, tokenizer {m.metadata.get('tokenizer')}")
                return 0
            steps = list_steps(path)
            if not steps:
                raise CheckpointError(f"{path} has no checkpoints")
            for s in steps:
                try:
                    meta = read_meta(path, s, steps)
                    print(f"step {s:>8}  saved {meta.get('saved_at', '?')}")
                except CheckpointError as err:
                    print(f"step {s:>8}  UNREADABLE: {err}")
        return 0
    except UserError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
