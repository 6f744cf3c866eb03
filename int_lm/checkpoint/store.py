"""The orbax store: list, read and verify checkpoints; write them (asynchronously, atomically); GC.

:class:`Checkpointer` saves under ``RUN_DIR/checkpoints`` and keeps
``RUN_DIR/history.jsonl``: appended and flushed at every step, synced to disk at
every save, cut back to the checkpoint's step on resume (``samples.jsonl`` too); with ``writes_files=False``
it is the follower of a multi-process run (joins orbax's collective saves,
writes no files of its own). :func:`restore` reads one checkpoint back to host
NumPy and verifies it (:mod:`int_lm.checkpoint.arrays`). Orbax, tensorstore
and asyncio report failures with long tracebacks from their threads; they are
quieted here and each failure is raised once, as a one-line CheckpointError.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from int_lm import config
from int_lm.checkpoint.arrays import (CheckpointError, _check_arrays, _digest, _expected_arrays, flatten,
                                      state_arrays, _unflat)
from int_lm.errors import UserError

CHECKPOINT_FORMAT = "int_lm-checkpoint-v1"
CHECKPOINTS = "checkpoints"
HISTORY = "history.jsonl"
SAMPLES = "samples.jsonl"          # the text sample of each evaluation (train.sample_tokens)


# ---------------------------------------------------------------------------
# Quieting orbax, tensorstore and asyncio: one line per failure
# ---------------------------------------------------------------------------

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


@dataclasses.dataclass
class Restored:
    """One checkpoint read back to the host (NumPy int8), verified."""
    params: dict
    states: np.ndarray
    step: int
    cursor: dict
    seed: int
    config: config.Config
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
        cfg = config.validate(config.from_dict(meta["metadata"]["config"]))
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
        flat = flatten(dict(out["state"]))
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


def _append(path: Path, text: str, sync: bool) -> None:
    """Append ``text`` (unbuffered; fsync if ``sync``); a failed write cuts the file back to where it was."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)     # 0644 under umask 022
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            data = memoryview(text.encode())
            while data:
                data = data[os.write(fd, data):]
            if sync:
                os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Replace ``path`` by ``data`` atomically: a new file beside it, written and fsynced, renamed over it.

    The file gets the mode ``open()`` gives a new file (0666 less the umask: 0644 under the
    usual umask 022, readable by colleagues), whatever mode an older ``path`` had. A failed
    write leaves ``path`` as it was and removes the temporary file.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _jsonl_until(path: Path, step: int) -> list[dict]:
    """The entries of a JSON-lines file with ``step <= step``, the file rewritten to hold just them."""
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break          # a line cut by a kill: everything before it is good
            if isinstance(entry, dict) and entry.get("step", 0) <= step:
                out.append(entry)
    atomic_write(path, "".join(json.dumps(h, ensure_ascii=False) + "\n" for h in out))
    return out


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
        self._history_written = 0             # entries of the run's history already in history.jsonl
        self._history_warned = False
        self._samples_warned = False
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if resume_step is None and writes_files:
                atomic_write(self.run_dir / HISTORY, "")      # a fresh run starts a fresh history
                if (self.run_dir / SAMPLES).exists():
                    atomic_write(self.run_dir / SAMPLES, "")  # and fresh samples
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
                self.append_history(history, sync=True)
            except OSError as err:
                raise CheckpointError(f"saving the checkpoint at step {step}: cannot write "
                                      f"{self.run_dir / HISTORY} ({_short(err)}); earlier checkpoints are "
                                      f"kept; free disk space (or fix the directory), then run the same "
                                      f"command to resume") from None
        flat = state_arrays(state)
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
    def append_history(self, history: list[dict], sync: bool = False) -> None:
        """Append the entries of ``history`` not yet in history.jsonl, flushed (``sync``: and on disk).

        A failed write leaves the file as it was. With ``sync`` (a save) it raises; without (every
        step) it warns once and the entries go out with the next call: a log line is not worth a step.
        """
        if not self.writes_files:
            return
        path = self.run_dir / HISTORY
        text = "".join(json.dumps(h) + "\n" for h in history[self._history_written:])
        if not text and not sync:
            return
        try:
            _append(path, text, sync)
        except OSError as err:
            if sync:
                raise
            if not self._history_warned:
                self._history_warned = True
                from int_lm.cli import warn
                warn(f"cannot append to {path} ({_short(err)}); training goes on and retries at every step "
                     f"(a checkpoint save fails if it still cannot write)")
            return
        self._history_written = len(history)

    def append_sample(self, entry: dict) -> None:
        """Append one text sample (``{"step", "prompt", "text"}``) to samples.jsonl, flushed.

        A failed write warns once and the sample is dropped: it never stops a run.
        """
        if not self.writes_files:
            return
        path = self.run_dir / SAMPLES
        try:
            _append(path, json.dumps(entry, ensure_ascii=False) + "\n", sync=False)
        except OSError as err:
            if not self._samples_warned:
                self._samples_warned = True
                from int_lm.cli import warn
                warn(f"cannot append to {path} ({_short(err)}); training goes on without text samples there")

    def history_until(self, step: int) -> list[dict]:
        """Logged history up to ``step`` (entries after it came from steps lost since the checkpoint).

        samples.jsonl is cut back to ``step`` too, so neither file keeps a step that is trained again.
        """
        if not self.writes_files:
            return []
        path = self.run_dir / HISTORY
        try:
            out = _jsonl_until(path, step)
            if (self.run_dir / SAMPLES).exists():
                _jsonl_until(self.run_dir / SAMPLES, step)
        except OSError as err:
            raise CheckpointError(f"cannot rewrite {err.filename or path} ({_short(err)}); free disk space or "
                                  f"fix the directory, then resume again") from None
        self._history_written = len(out)
        if len(out) != step:
            self.log(f"note: {HISTORY} holds {len(out)} of the first {step} steps")
        return out
