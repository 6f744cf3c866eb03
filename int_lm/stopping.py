"""Stopping a run on a signal: finish the current step, save it, exit with 128 + the signal number.

The signals users and schedulers send to end a run:

* SIGINT: Ctrl-C (to the terminal's whole foreground job, ``tee`` included);
* SIGTERM: ``kill PID``, ``docker stop``, systemd, Kubernetes, SLURM at preemption and at the time limit;
* SIGHUP: the terminal or SSH session is gone;
* SIGUSR1: SLURM's advance warning (``#SBATCH --signal=USR1@120``).

:class:`StopSignals` handles all four around a whole run. Until :meth:`StopSignals.defer`
(start-up: data loading, restore; nothing trained yet) a signal stops at once with
:class:`Interrupted`. After it, the first signal only sets :attr:`StopSignals.requested`,
which the trainer checks after each step (agreed across processes, so every process stops
after the same step) before it saves and returns.

A second signal stops the process at once, even in the middle of a long XLA computation
(where Python's own handlers cannot run, and where two signals would merge into one): a
thread reads every delivery from :func:`signal.set_wakeup_fd` and ends the process with
``os._exit(128 + signal)``. The last completed checkpoint is intact (orbax commits a
checkpoint by an atomic rename; a save in flight is abandoned and its temporary directory
removed at the next start). A second SIGHUP does not count: a lost terminal sends SIGHUP
to the job and its shell sends it again. A signal ignored when the run starts (``nohup``
ignores SIGHUP) stays ignored. Outside the main thread nothing is installed.
"""
from __future__ import annotations

import os
import signal
import threading

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1")
                if hasattr(signal, name))


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def exit_status(sig: int | str) -> int:
    """The conventional exit status of a program stopped by ``sig`` (a number or a name): 128 + its number."""
    return 128 + int(signal.Signals[sig] if isinstance(sig, str) else sig)


class Interrupted(KeyboardInterrupt):
    """A signal that stops the run at once (during start-up, or the second one); the message says what is kept."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return exit_status(self.signum)


def _notice(signum: int) -> str:
    name = signal_name(signum)
    again = "Ctrl-C" if signum == signal.SIGINT else name
    return f"\n{name}: stopping after this step, then saving it ({again} again to stop at once)\n"


def _say(text: str) -> None:
    """From a signal handler: straight to file descriptor 2 (no buffered stream is re-entered); never raises."""
    try:
        os.write(2, text.encode())
    except OSError:
        pass


class StopSignals:
    """Context manager: SIGINT, SIGTERM, SIGHUP and SIGUSR1 stop the run cleanly (see the module doc)."""

    def __init__(self):
        self.signum: int | None = None       # the first signal received
        self._deferred = False
        self._previous: dict[int, object] = {}
        self._wakeup: tuple[int, int] | None = None    # the watcher's pipe (read, write)

    @property
    def requested(self) -> bool:
        """A signal asked the run to stop after the current step."""
        return self.signum is not None

    def defer(self) -> None:
        """From now on the first signal stops after the current step (the loop is about to start)."""
        self._deferred = True

    def _handle(self, signum, frame) -> None:
        """Python's handler: in the main thread, between bytecodes (after a running XLA call returns)."""
        name = signal_name(signum)
        if self.signum is None and self._deferred:
            self.signum = signum
            if self._wakeup is None:
                _say(_notice(signum))        # else the watcher said it, the moment the signal came
            return
        if self.signum is None:
            self.signum = signum
            raise Interrupted(signum, f"stopped by {name} during start-up, before any step; nothing to save")
        if signum == getattr(signal, "SIGHUP", None) or self._wakeup is not None:
            return      # a repeated hang-up does not count; the watcher ends the process on a second signal
        raise Interrupted(signum, f"stopped at once by a second signal ({name}); checkpoints already saved "
                                  f"are kept")

    def _watch(self, read_fd: int) -> None:
        """A thread that sees every delivery of our signals as it happens: it says that the run will
        stop after the step (the main thread may be inside a long XLA call), and ends the process on
        a second one."""
        count = 0
        try:
            while data := os.read(read_fd, 64):        # b"": the context has ended
                for signum in data:
                    if signum not in self._previous or (count and signum == getattr(signal, "SIGHUP", None)):
                        continue
                    count += 1
                    if count == 1 and self._deferred:
                        _say(_notice(signum))
                    elif count >= 2:
                        _say(f"\nstopped at once by a second signal ({signal_name(signum)}); checkpoints "
                             f"already saved are kept\n")
                        os._exit(exit_status(signum))
        except OSError:
            pass
        finally:
            os.close(read_fd)

    def __enter__(self) -> "StopSignals":
        for signum in SIGNALS:
            try:
                if signal.getsignal(signum) is signal.SIG_IGN:
                    continue                 # nohup (SIGHUP), a shell's background job (SIGINT): keep ignoring
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:               # not the main thread: no handlers
                return self
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        if previous != -1:                   # someone else's (an asyncio loop): leave it to them
            signal.set_wakeup_fd(previous)
            os.close(read_fd)
            os.close(write_fd)
            return self
        self._wakeup = (read_fd, write_fd)
        threading.Thread(target=self._watch, args=(read_fd,), name="int_lm-stop-signals", daemon=True).start()
        return self

    def reinstall(self) -> None:
        """Take the signals back from C code that replaced the handlers (``jax.distributed.initialize``
        installs a SIGTERM handler of its own, its preemption notifier)."""
        for signum in self._previous:
            signal.signal(signum, self._handle)

    def __exit__(self, *exc) -> bool:
        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            os.close(self._wakeup[1])        # the watcher reads end-of-file and returns
            self._wakeup = None
        self._previous.clear()
        return False

    def agreed(self, layout) -> str | None:
        """The name of the signal that stopped the run, the same on every process (collective when several)."""
        signum = self.signum or 0
        if layout.multiprocess:
            import numpy as np
            from jax.experimental import multihost_utils
            signum = int(np.max(multihost_utils.process_allgather(np.int32(signum))))
        return signal_name(signum) if signum else None
