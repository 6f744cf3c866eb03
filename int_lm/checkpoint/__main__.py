"""The command line: ``python -m int_lm.checkpoint export RUN_DIR OUT.safetensors [--step N]`` or ``list RUN_DIR``."""
from __future__ import annotations

import sys
from pathlib import Path

from int_lm.checkpoint.arrays import flatten
from int_lm.checkpoint.export import export_model, load_model
from int_lm.checkpoint.store import CheckpointError, list_steps, read_meta
from int_lm.cli import tolerant_output
from int_lm.errors import UserError


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
    with tolerant_output(warn_when_lost=False):     # `... | head` ends quietly
        return _run(parser.parse_args(argv))


def _run(args) -> int:
    try:
        if args.cmd == "export":
            model = load_model(args.run_dir, args.step)
            out = export_model(model, args.out)
            print(f"exported step {model.step} of {args.run_dir} to {out} "
                  f"({sum(v.size for v in flatten(model.params).values()):,} int8 parameters, "
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
