"""One trainer per run directory: an advisory lock on ``RUN_DIR/.lock`` while a run trains.

Two trainers on one run directory would interleave their checkpoints, history and
TensorBoard events. The second one now stops at start-up with one line naming the
first one's process id. The lock is ``flock`` on an open file, so the kernel drops it
however the holder ends (Ctrl-C, SIGTERM, SIGKILL, a crash): a stale lock never
blocks a resume. Where the file system has no locks (some network mounts) training
goes on unlocked, as before.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

from int_lm.errors import UserError

LOCK_FILE = ".lock"


class RunDirBusy(UserError):
    """Another live process holds the run directory's lock."""


def unwritable_run_dir(run_dir, err: OSError) -> UserError:
    """The one message for a run directory that cannot be created or written."""
    return UserError(f"cannot write the run directory {run_dir} ({err.strerror}); choose a writable --train.run_dir")


class RunDirLock:
    """The held lock (a context manager; :meth:`release` also runs when the object is collected)."""

    def __init__(self, fd: int | None):
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)       # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self) -> "RunDirLock":
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

    def __del__(self):
        self.release()


def lock_run_dir(run_dir: str | Path) -> RunDirLock:
    """Take ``run_dir``'s lock (creating the directory), or raise :class:`RunDirBusy` naming the holder."""
    import fcntl   # POSIX only: imported here so the package imports everywhere

    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise unwritable_run_dir(run_dir, err) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)                           # no locks on this file system: go on unlocked
            return RunDirLock(None)
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise RunDirBusy(f"another trainer (process {holder}) is training in {run_dir}; wait for it to end "
                         f"(or stop it: it saves a checkpoint and exits), or choose another --train.run_dir") from None
    try:                                            # who holds it, for the next one's message
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    except OSError:                                 # a full disk: the lock holds all the same
        pass
    return RunDirLock(fd)
