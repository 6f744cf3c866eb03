"""Checkpoints (orbax), exact resume, and export of trained int8 weights.

A run directory holds::

    RUN_DIR/checkpoints/<step>/{state,meta}   orbax CheckpointManager steps
    RUN_DIR/history.jsonl                      every logged step (appended at each step)
    RUN_DIR/samples.jsonl                      the text sample of each evaluation: step, prompt, text
    RUN_DIR/resume_log.jsonl                   one line per resume: step, changed keys
    RUN_DIR/checkpoints_superseded/            checkpoints newer than a --train.resume_from step
    RUN_DIR/.lock                              held (flock) by the trainer writing the directory

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
garbage-collected by this package (not by orbax's ``max_to_keep``) and only
after a newer save has been committed, so a failed save never removes the
last good checkpoint; a failed restore removes nothing at all.

One idea per module:

    arrays.py    the arrays of a checkpoint: flatten, names/shapes/dtypes from the config, sha256, verify
    store.py     orbax: list, read_meta, restore; Checkpointer (async saves, GC, history); quiet logs
    resume.py    plan_resume (MUTABLE_KEYS), compatibility checks, supersede_newer, resume log, resume()
    export.py    LoadedModel, load_model (run dir or export), export_model (.safetensors)
    lock.py      lock_run_dir: one trainer per run directory
    __main__.py  the command line below

Public API (all importable from ``int_lm.checkpoint``)::

    load_model(path, step=None) -> LoadedModel      # run dir (latest/step) or exported file
    export_model(run_dir_or_loaded, out_path)       # one .safetensors of int8 arrays + JSON
    python -m int_lm.checkpoint export RUN_DIR OUT.safetensors [--step N]
    python -m int_lm.checkpoint list RUN_DIR
    restore(run_dir, step=None) -> Restored         # params, states, opt_state, cursor, seed, config
    flatten(tree) -> {dotted name: array}           # a nested dict of arrays, flat
    state_arrays(restored) -> {name: array}         # every array a checkpoint holds (params.*, states, opt.*)

Note: ``int_lm.checkpoint.resume`` is the function :func:`resume`; import the
module's other names with ``from int_lm.checkpoint.resume import ...``.
"""
from int_lm.checkpoint.arrays import OPT_DTYPES, CheckpointError, flatten, state_arrays  # noqa: F401
from int_lm.checkpoint.export import EXPORT_FORMAT, LoadedModel, export_model, load_model  # noqa: F401
from int_lm.checkpoint.lock import LOCK_FILE, RunDirBusy, RunDirLock, lock_run_dir, unwritable_run_dir  # noqa: F401
from int_lm.checkpoint.resume import (MUTABLE_KEYS, RESUME_LOG, SUPERSEDED, ResumePlan,  # noqa: F401
                                      check_compatible, explicit_values, mark_tensorboard_restart,
                                      plan_resume, record_resume, resume, supersede_newer)
from int_lm.checkpoint.store import (CHECKPOINT_FORMAT, CHECKPOINTS, HISTORY, SAMPLES, Checkpointer,  # noqa: F401
                                     Restored, atomic_write, checkpoint_dir, list_steps, read_meta, restore)
