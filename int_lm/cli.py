"""Shared plumbing of the entry points: config resolution and user-facing errors."""
from __future__ import annotations

import errno
import sys
import traceback

from int_lm import config as C
from int_lm.errors import UserError


def run_main(parser, body, argv=None) -> int:
    """Parse ``--section.key value`` overrides plus the parser's own flags, then run ``body``.

    A :class:`UserError` prints one ``error:`` line and exits 2 (traceback with --debug).
    """
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        values, rest = C.parse_overrides(argv)
        args = parser.parse_args(rest)
        # What the user set explicitly (a resumed run keeps its saved config for everything else).
        args.overrides = values
        args.config_given = any(a == "--config" or a.startswith("--config=") for a in rest)
        cfg = C.load_file(args.config) if getattr(args, "config", None) else C.Config()
        cfg = C.validate(C.apply_values(cfg, values, "the command line"))
        body(args, cfg)
        return 0
    except UserError as err:
        if debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # A full disk or quota is the user's to fix wherever the write happened (history,
        # metadata, TensorBoard, caches); anything else is a bug and keeps its traceback.
        if err.errno not in (errno.ENOSPC, errno.EDQUOT) or debug:
            raise
        where = f" writing {err.filename}" if err.filename else ""
        print(f"error: no space left on device{where}; checkpoints already saved are kept; free disk "
              f"space, then run the same command to resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
