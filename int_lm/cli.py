"""Shared plumbing of the entry points: config resolution, user-facing errors, output that never fails.

:func:`run_main` parses, runs, and turns a :class:`UserError` into one ``error:`` line (exit 2).
:func:`tolerant_output` makes ``sys.stdout`` and ``sys.stderr`` writes that cannot fail: a
closed descriptor, a broken pipe (``| tee`` after Ctrl-C, ``| head``) or a terminal that is
gone (EIO) switch that stream to ``/dev/null``, with at most one warning (:func:`warn`) to
whichever stream still works. A run never ends, and a checkpoint is never skipped, because
its output cannot be written.
"""
from __future__ import annotations

import errno
import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

from int_lm import config
from int_lm.errors import UserError

_WARNING = False     # a warning is being written (a stream lost while warning must not warn again)


def warn(message: str) -> None:
    """One ``warning: ...`` line on stderr, else on stdout if stderr is gone; never raises."""
    global _WARNING
    if _WARNING:
        return
    _WARNING = True
    try:
        for stream in (sys.stderr, sys.stdout):
            if stream is None or getattr(stream, "gone", False):
                continue
            try:
                stream.write(f"warning: {message}\n")
                stream.flush()
            except (OSError, ValueError):
                continue
            if not getattr(stream, "gone", False):
                return
    finally:
        _WARNING = False


def _why(err: BaseException) -> str:
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


class TolerantStream:
    """A text stream whose writes never raise: the first failure sends the descriptor to /dev/null."""

    def __init__(self, stream, name: str, warn_when_lost: bool):
        self.name, self.warn_when_lost = name, warn_when_lost
        self.gone = stream is None               # closed before the program started: quietly nowhere
        self._stream = open(os.devnull, "w") if stream is None else stream

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self._stream.write(text)
            except (OSError, ValueError) as err:
                self._lost(err)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self.gone:
            try:
                self._stream.flush()
            except (OSError, ValueError) as err:
                self._lost(err)

    def _lost(self, err: BaseException) -> None:
        self.gone = True
        try:      # later writes, the buffered rest and the interpreter's final flush go to /dev/null
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)
            self._stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
        if self.warn_when_lost:
            warn(f"cannot write to {self.name} ({_why(err)}); its output is dropped from now on, "
                 f"the run goes on")

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextmanager
def tolerant_output(warn_when_lost: bool = True):
    """``sys.stdout`` / ``sys.stderr`` as :class:`TolerantStream` for the duration (see the module doc)."""
    for fd in (0, 1, 2):   # a descriptor closed at start would be reused by the next file opened: fill it
        try:
            os.fstat(fd)
        except OSError:
            try:
                null = os.open(os.devnull, os.O_RDWR)
                if null != fd:
                    os.dup2(null, fd)
                    os.close(null)
            except OSError:
                pass
    saved = sys.stdout, sys.stderr
    sys.stdout = TolerantStream(sys.stdout, "stdout", warn_when_lost)
    sys.stderr = TolerantStream(sys.stderr, "stderr", warn_when_lost)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
            stream.warn_when_lost = False   # still held by log handlers, flushed again at exit: quietly
        sys.stdout, sys.stderr = saved


def _line(err: BaseException) -> str:
    """The error's message with its notes (e.g. what was saved) on one line."""
    return "; ".join([str(err), *getattr(err, "__notes__", [])])


def _config_file_named(parser, rest: list[str]) -> str | None:
    """The ``--config`` file of this command line (else the parser's default), without parsing it."""
    for i, arg in enumerate(rest):
        if arg == "--config" and i + 1 < len(rest):
            return rest[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return parser.get_default("config") if any("--config" in a.option_strings for a in parser._actions) else None


def config_help(parser, rest: list[str], sections=None, defaults: bool = True, note: str = "") -> str:
    """The config keys part of ``--help``: defaults after the ``--config`` file when there is one."""
    name = _config_file_named(parser, rest) if defaults else None
    if not name:
        return config.help_text(config.Config(), sections=sections, defaults=defaults, note=note)
    path = config.find_file(name).resolve()
    for base in (Path.cwd(), config.REPO_ROOT):            # configs/tiny.toml for --config tiny
        if path.is_relative_to(base):
            path = path.relative_to(base)
            break
    return config.help_text(config.load_file(name), source=str(path), sections=sections, defaults=defaults, note=note)


def _unknown(parser, unknown: list[str], sections=None) -> config.ConfigError:
    """One line for arguments the parser does not know, with a "did you mean" for a near miss."""
    import difflib
    arg = next((a for a in unknown if a.startswith("-")), unknown[0])
    name = arg.split("=", 1)[0]
    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    config_keys = {k.name: k.option for k in config.keys(sections=sections)}
    if not name.startswith("-"):
        return config.ConfigError(f"unexpected argument {arg!r} (python {parser.prog} --help lists the arguments)")
    bare = name.lstrip("-")
    if bare in config_keys:                                    # --steps: a config key without its section
        hint = f"; did you mean {config_keys[bare]}?"
    else:
        close = difflib.get_close_matches(name, options + list(config_keys.values()), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
    return config.ConfigError(f"unknown option {name}{hint} (python {parser.prog} --help lists every option and "
                         f"config key)")


def run_main(parser, body, argv=None, *, warn_when_output_lost: bool = True, sections=None,
             help_defaults: bool = True, help_note: str = "") -> int:
    """Parse ``--section.key value`` overrides plus the parser's own flags, then run ``body``.

    ``body(args, cfg)`` may return an exit status (None: 0). A :class:`UserError` prints one
    ``error:`` line and exits 2 (traceback with --debug); a stop by a signal
    (:class:`int_lm.stopping.Interrupted`) prints its line and exits 128 + the signal number.
    Output runs through :func:`tolerant_output`. ``--help`` ends with every config key (of
    ``sections``, default all) from :func:`int_lm.config.help_text`: its type, its default
    after the ``--config`` file (``help_defaults=False``: no default column) and its meaning
    (``help_note`` ends its first paragraph).
    Arguments the parser does not know, overrides outside ``sections`` and the parser's own
    errors are one ``error:`` line too, with a "did you mean" for a near miss.
    """
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv

    def parser_error(message):
        raise config.ConfigError(f"{message} (python {parser.prog} --help lists the arguments)")

    with tolerant_output(warn_when_output_lost):
        try:
            values, rest = config.parse_overrides(argv)
            if "-h" in rest or "--help" in rest:
                parser.epilog = config_help(parser, rest, sections, help_defaults, help_note)
            parser.error = parser_error
            args, unknown = parser.parse_known_args(rest)
            if unknown:
                raise _unknown(parser, unknown, sections)
            extra = sorted(f"--{s}.{k}" for s, keys in values.items() if sections and s not in sections for k in keys)
            if extra:
                raise config.ConfigError(f"{parser.prog} takes only {' and '.join(f'--{s}.KEY' for s in sections)} "
                                    f"overrides; remove {', '.join(extra)} (python {parser.prog} --help lists them)")
            # What the user set explicitly (a resumed run keeps its saved config for everything else).
            args.overrides = values
            args.config_given = any(a == "--config" or a.startswith("--config=") for a in rest)
            cfg = config.load_file(args.config) if getattr(args, "config", None) else config.Config()
            cfg = config.validate(config.apply_values(cfg, values, "the command line"))
            status = body(args, cfg)
            return status if isinstance(status, int) else 0
        except UserError as err:
            if debug:
                traceback.print_exc()
            print(f"error: {_line(err)}", file=sys.stderr)
            return 2
        except OSError as err:
            # A full disk or quota is the user's to fix wherever the write happened (metadata,
            # caches, ...); anything else is a bug and keeps its traceback.
            if err.errno not in (errno.ENOSPC, errno.EDQUOT) or debug:
                raise
            where = f" writing {err.filename}" if err.filename else ""
            notes = "".join(f"; {n}" for n in getattr(err, "__notes__", []))
            print(f"error: no space left on device{where}; checkpoints already saved are kept; free disk "
                  f"space, then run the same command to resume{notes}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as err:   # Ctrl-C; a stop signal (int_lm.stopping.Interrupted) names itself
            print(str(err) or "interrupted", file=sys.stderr)
            return getattr(err, "exit_status", 130)
